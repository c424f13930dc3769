"""Paired devices: each browser that opened the pairing link holds a session id of its own, never the token.

The token pairs (the link's `?token=`) and lets programs in (`Authorization: Bearer`); a browser that
opened the link gets a random device id in a cookie, and the server keeps only its SHA-256 in a list
(a 0600 file next to the token), so that one device can be forgotten alone, all of them at once, and a
copied file pairs nothing. A device's cookie lasts 30 days and is set again, for 30 more, when it is used
a day or more after its last renewal; a device unseen for 30 days is dropped from the list.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import msgspec
from litestar.datastructures import Cookie, MutableScopeHeaders
from litestar.types import Message, Scope

from app.web import lan

log = logging.getLogger(__name__)

# __Host-: the browser takes it only with Secure and Path=/ and no Domain, so it is this host's alone,
# never shared with (or set by) a sibling domain; still shared by the host's ports, which is why it holds
# a device id that only this server's list knows.
COOKIE = "__Host-va_device"
DEVICE_DAYS = 30  # a cookie's lifetime, renewed on use; a device unseen for this long is dropped
RENEW_S = 86_400  # renew a device's cookie (and its last-seen time on disk) at most once a day
DEVICES_NAME = "devices.json"
RENEWAL = "va.renew_cookie"  # scope key: the Set-Cookie header a request's response should carry
LABEL_CHARS = 60


class Device(msgspec.Struct, frozen=True):
    """A paired browser, as the list on disk keeps it."""

    id_hash: str  # sha256 hex of the device id (the cookie's value): the id itself is never stored
    handle: str  # public: names the device on the page and in its forget route
    label: str  # from its User-Agent, e.g. "Chrome on Android"
    created: float  # Unix time of the pairing
    last_seen: float  # Unix time of the cookie's last renewal


class DeviceList:
    """The paired devices, read once and written (0600) on every change. One event loop uses it."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path, self.clock = path, clock
        self._devices = {d.id_hash: d for d in _read(path)}
        if self._prune():
            self._save()

    def pair(self, user_agent: str) -> str:
        """A new device; returns its id, for its cookie (and nowhere else)."""
        device_id, now = secrets.token_urlsafe(32), self.clock()
        handles = {d.handle for d in self._devices.values()}
        handle = secrets.token_hex(4)
        while handle in handles:
            handle = secrets.token_hex(4)
        device = Device(_hash(device_id), handle, device_label(user_agent), now, now)
        self._devices[device.id_hash] = device
        self._save()
        log.info("pairing: paired a device (%s, %s)", device.label, device.handle)
        return device_id

    def find(self, device_id: str | None) -> Device | None:
        """The device this id belongs to, while it is still paired."""
        device = self._devices.get(_hash(device_id)) if device_id else None
        if device is None or self._expired(device):
            return None
        return device

    def renew(self, device: Device) -> bool:
        """Mark the device as seen; True when its cookie should be set again (a day since the last time)."""
        now = self.clock()
        if now - device.last_seen < RENEW_S:
            return False
        self._devices[device.id_hash] = msgspec.structs.replace(device, last_seen=now)
        self._save()
        return True

    def forget(self, handle: str) -> Device | None:
        """Unpair one device; the one forgotten, or None when no device has that handle."""
        device = next((d for d in self._devices.values() if d.handle == handle), None)
        if device is not None:
            del self._devices[device.id_hash]
            self._save()
            log.info("pairing: forgot the device %s (%s)", device.handle, device.label)
        return device

    def forget_all(self) -> int:
        count = len(self._devices)
        self._devices.clear()
        self._save()
        if count:
            log.info("pairing: forgot every paired device (%d)", count)
        return count

    def listed(self) -> list[Device]:
        """The devices still paired, most recently seen first."""
        self._prune()
        return sorted(self._devices.values(), key=lambda d: d.last_seen, reverse=True)

    def _expired(self, device: Device) -> bool:
        return self.clock() - device.last_seen > DEVICE_DAYS * 86_400

    def _prune(self) -> bool:
        gone = [h for h, d in self._devices.items() if self._expired(d)]
        for id_hash in gone:
            del self._devices[id_hash]
        return bool(gone)

    def _save(self) -> None:
        lan.write_private(self.path, msgspec.json.encode(list(self._devices.values())))


class Pairing(NamedTuple):
    """What a server that listens beyond this computer pairs with: the token and the devices it paired."""

    token: str
    devices: DeviceList


def open_pairing(folder: Path | None = None, *, new: bool = False) -> Pairing:
    """The kept token and device list (made on first use); `new` replaces the token and forgets every device."""
    folder = folder or lan.default_tls_dir()
    token = lan.pairing_token(folder, new=new)
    devices = DeviceList(folder / DEVICES_NAME)
    if new:
        devices.forget_all()
    return Pairing(token, devices)


def _read(path: Path) -> list[Device]:
    if not path.is_file():
        return []
    try:
        return msgspec.json.decode(path.read_bytes(), type=list[Device])
    except (OSError, msgspec.DecodeError) as exc:  # a damaged list pairs nobody: each device pairs again
        log.warning("pairing: could not read %s (%s); every device must pair again", path, exc)
        return []


def _hash(device_id: str) -> str:
    return hashlib.sha256(device_id.encode()).hexdigest()


BROWSERS = [("Edg/", "Edge"), ("OPR/", "Opera"), ("FxiOS", "Firefox"), ("Firefox/", "Firefox"),
            ("CriOS", "Chrome"), ("Chrome/", "Chrome"), ("Safari/", "Safari")]
SYSTEMS = [("iPhone", "iPhone"), ("iPad", "iPad"), ("Android", "Android"), ("Windows", "Windows"),
           ("CrOS", "ChromeOS"), ("Mac OS X", "Mac"), ("Linux", "Linux")]


def device_label(user_agent: str) -> str:
    """A name a person recognises ("Safari on iPhone"), from the User-Agent's well-known words only:
    the header is the client's to choose, so nothing of it is shown as it came."""
    browser = next((name for word, name in BROWSERS if word in user_agent), "")
    system = next((name for word, name in SYSTEMS if word in user_agent), "")
    if browser and system:
        return f"{browser} on {system}"
    plain = re.sub(r"[^A-Za-z0-9 ./()-]", "", user_agent.split(" ", 1)[0])[:LABEL_CHARS]
    return browser or system or plain or "A browser"


def device_cookie(device_id: str) -> Cookie:
    return Cookie(key=COOKIE, value=device_id, max_age=DEVICE_DAYS * 86_400, path="/", secure=True,
                  httponly=True, samesite="strict")


def cleared_cookie() -> Cookie:
    """Tells the browser to drop its device cookie (a forgotten device)."""
    return Cookie(key=COOKIE, value="", max_age=0, path="/", secure=True, httponly=True, samesite="strict")


async def renew_cookie(message: Message, scope: Scope) -> None:
    """App hook before each message: the response to a request whose device was due a renewal
    (access.paired marks it) carries its cookie again, whichever route answered."""
    renewal = scope.get(RENEWAL)
    if renewal is not None and message["type"] == "http.response.start":
        MutableScopeHeaders.from_message(message).add("set-cookie", renewal)
