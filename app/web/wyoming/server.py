"""The Wyoming server: a TCP port beside the web server, on the same event loop and the same loaded engines.

It listens where the web server does (settings.host): loopback by default. Wyoming has no authentication, so on a
server that listens beyond loopback (whose web clients must pair) a peer is served only if it is this computer
(access.trust_loopback) or one of wyoming.allowed_peers; any other is told so in an `error` event and disconnected.
With wyoming.zeroconf the port is announced on the network as _wyoming._tcp.local. for Home Assistant to find.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from app.config import Settings
from app.core.metrics import Metrics
from app.engines.loaded import Engines
from app.web.lan import is_loopback, lan_ip
from app.web.wyoming.chats import Chats
from app.web.wyoming.connection import Connection
from app.web.wyoming.wire import HEADER_BYTES, BadFrame

log = logging.getLogger(__name__)
SERVICE = "_wyoming._tcp.local."


class WyomingServer:
    def __init__(self, state) -> None:  # state: the Litestar app's State (settings, engines, loading, metrics)
        self._state = state
        self.settings: Settings = state.settings
        metrics: Metrics = state.metrics
        self.chats = Chats(self.settings, metrics)
        self._server: asyncio.Server | None = None
        self._zeroconf = None
        self._refused: set[str] = set()
        self._connections: set[asyncio.Task[None]] = set()

    def engines(self) -> Engines | None:
        return self._state.engines if self._state.loading.state.phase == "ready" else None

    async def start(self) -> None:
        host, port = self.settings.host, self.settings.wyoming.port
        self._server = await asyncio.start_server(self._accept, host, port, limit=HEADER_BYTES)
        log.info("wyoming: listening on %s:%d (Home Assistant: add the Wyoming integration with this host and port)",
                 host, port)
        if not is_loopback(host) and not self.settings.wyoming.allowed_peers:
            log.warning("wyoming: only this computer may use it; allow Home Assistant's address with "
                        "VA_WYOMING__ALLOWED_PEERS=<its IP>")
        if self.settings.wyoming.zeroconf:
            await self._announce(host, port)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            await self._zeroconf.async_unregister_all_services()
            await self._zeroconf.async_close()
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self.chats.close()

    def allowed(self, peer: str) -> bool:
        """This computer (unless access.trust_loopback is off on a server beyond loopback), or an allowed peer."""
        if is_loopback(self.settings.host):
            return True
        if self.settings.access.trust_loopback and is_loopback(peer.removeprefix("::ffff:")):
            return True
        return self.settings.wyoming.allows(peer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = (writer.get_extra_info("peername") or ("",))[0]
        connection = Connection(reader, writer, self)
        try:
            if not self.allowed(peer):
                await self._turn_away(connection, peer)
                return
            await connection.serve()
        except BadFrame as exc:
            log.info("wyoming: %s sent something that is not a Wyoming event (%s); disconnected", peer, exc)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _turn_away(self, connection: Connection, peer: str) -> None:
        if peer not in self._refused and len(self._refused) < 100:  # once per address: a retrying peer cannot flood
            self._refused.add(peer)
            log.warning("wyoming: refused %s (not this computer, not in wyoming.allowed_peers)", peer)
        await connection.refuse("not_allowed", f"This address ({peer}) may not use the assistant: add it to "
                                               "VA_WYOMING__ALLOWED_PEERS on the assistant's server.")

    async def _announce(self, host: str, port: int) -> None:
        """mDNS: the address Home Assistant will connect to is the LAN's (a loopback server has none to offer)."""
        if is_loopback(host):
            log.warning("wyoming: zeroconf is off: the server listens on loopback only (use --lan or --host)")
            return
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        address = lan_ip() if host in ("0.0.0.0", "::", "") else host
        name = f"voice-assistant-{socket.gethostname()}"[:63]
        info = AsyncServiceInfo(SERVICE, f"{name}.{SERVICE}", addresses=[socket.inet_aton(address)], port=port)
        self._zeroconf = AsyncZeroconf()
        await self._zeroconf.async_register_service(info)
        log.info("wyoming: announced as %s.%s at %s:%d", name, SERVICE, address, port)
