"""The Wyoming server's settings (VA_WYOMING__<FIELD>, or `serve --wyoming PORT`)."""

from __future__ import annotations

import ipaddress

import msgspec


class WyomingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # TCP port of the Wyoming server (Home Assistant's default for a Wyoming service is 10300); 0: no server.
    # It listens where the web server does (host): loopback unless --lan or --host say otherwise.
    port: int = 0
    # Wyoming has no authentication. On a server that listens beyond loopback, only these addresses (IPs or
    # networks, comma-separated: 192.168.1.20,10.0.0.0/24) may use it, besides this computer itself.
    allowed_peers: tuple[str, ...] | str = ()
    # Announce the server on the local network as _wyoming._tcp.local. (mDNS), for Home Assistant to discover;
    # only on a server that listens beyond loopback.
    zeroconf: bool = False
    # A conversation (Home Assistant's conversation_id) unused this long is forgotten; at most this many are kept
    # (the least recently used goes first).
    conversation_idle_s: float = 300.0
    max_conversations: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError("wyoming port must be between 0 (off) and 65535")
        items = self.allowed_peers.split(",") if isinstance(self.allowed_peers, str) else self.allowed_peers
        peers = tuple(item.strip() for item in items if item.strip())
        for peer in peers:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError:
                raise ValueError(f"wyoming allowed_peers: {peer!r} is not an IP address or network") from None
        msgspec.structs.force_setattr(self, "allowed_peers", peers)
        if self.conversation_idle_s <= 0 or self.max_conversations < 1:
            raise ValueError("wyoming conversation_idle_s > 0, max_conversations >= 1")

    def allows(self, peer: str) -> bool:
        """Whether `peer` (an IP address) is one of allowed_peers."""
        try:
            address = ipaddress.ip_address(peer.removeprefix("::ffff:"))
        except ValueError:
            return False
        return any(address in ipaddress.ip_network(p, strict=False) for p in self.allowed_peers)
