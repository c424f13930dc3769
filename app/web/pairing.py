"""The pairing routes: the link that pairs a browser as a device, and the page's list of paired devices.

A server that listens beyond loopback pairs (access.py, devices.py). Opening the link from the log
(`/?token=...`) makes a device and leaves its id in a `__Host-` cookie, then goes on to the clean address.
Such a cookie needs a secure page: https, or this computer's own http://localhost; over plain http to a LAN
address the browser would drop it, so the page says how to pair instead of pairing nothing.
"""

from __future__ import annotations

import time

from litestar import Request, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath
from litestar.response import Redirect, Template

from app.web import access, devices
from app.web.devices import Device, Pairing
from app.web.lan import LOOPBACK_NAMES

TITLE = "Voice assistant"


def pairing_step(request: Request, state: State) -> Template | Redirect | None:
    """For GET /: the pairing link pairs this browser and redirects to the clean address (no token in the
    address bar or the history); an unpaired browser gets the page that says how to pair. None: go on."""
    pairing: Pairing | None = state.pairing
    if pairing is None:
        return None
    given = request.query_params.get("token")
    if given is not None and access.same_secret(given, pairing.token) and can_keep_cookie(request):
        cookies = []
        if pairing.devices.find(request.cookies.get(devices.COOKIE)) is None:  # paired already: no second entry
            cookies.append(devices.device_cookie(pairing.devices.pair(request.headers.get("user-agent", ""))))
        return Redirect("/", cookies=cookies, status_code=303, headers={"cache-control": "no-store"})
    if access.paired(request):
        return None
    context = {"title": TITLE, "fingerprint": state.fingerprint, "needs_https": not can_keep_cookie(request),
               "port": request.url.port or 80}
    return Template("pairing.html", context=context, status_code=401)


def can_keep_cookie(request: Request) -> bool:
    """Whether the browser will keep a Secure cookie from this page: https, or http on localhost."""
    return request.url.scheme == "https" or access.host_name(request.headers.get("host", "")) in LOOPBACK_NAMES


def pairing_on(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard of the device routes: they exist only on a server that pairs."""
    if connection.app.state.pairing is None:
        raise NotFoundException()


GUARDS = [pairing_on, access.same_origin, access.require_pairing]


@get("/devices", include_in_schema=False, guards=GUARDS)
async def device_list(request: Request, state: State) -> Template:
    """The settings dialog's list of paired devices (an htmx fragment)."""
    return _listed(request, state.pairing)


@post("/devices/{handle:str}/forget", include_in_schema=False, guards=GUARDS, status_code=200)
async def forget_device(request: Request, state: State, handle: FromPath[str]) -> Template:
    """Unpair one device; the one in use unpairs itself (the page reloads into the pairing page)."""
    pairing: Pairing = state.pairing
    mine = pairing.devices.find(request.cookies.get(devices.COOKIE))
    pairing.devices.forget(handle)
    return _listed(request, pairing, unpaired=mine is not None and mine.handle == handle)


@post("/devices/forget-all", include_in_schema=False, guards=GUARDS, status_code=200)
async def forget_all_devices(request: Request, state: State) -> Template:
    """Unpair every device, this one included (the pairing link stays the same: --new-token changes it)."""
    pairing: Pairing = state.pairing
    mine = pairing.devices.find(request.cookies.get(devices.COOKIE))
    pairing.devices.forget_all()
    return _listed(request, pairing, unpaired=mine is not None)


def _listed(request: Request, pairing: Pairing, *, unpaired: bool = False) -> Template:
    """The list as it now stands; when the device in use was just forgotten, its cookie goes too and
    htmx reloads the page (HX-Refresh), which then asks to pair."""
    mine = pairing.devices.find(request.cookies.get(devices.COOKIE))
    rows = [_row(d, mine) for d in pairing.devices.listed()]
    if not unpaired:
        return Template("devices.html", context={"devices": rows})
    return Template("devices.html", context={"devices": rows}, cookies=[devices.cleared_cookie()],
                    headers={"hx-refresh": "true"})


def _row(device: Device, mine: Device | None) -> dict[str, object]:
    return {"handle": device.handle, "label": device.label, "created": _day(device.created),
            "last_seen": _day(device.last_seen), "mine": mine is not None and device.handle == mine.handle}


def _day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.localtime(when))


ROUTES = [device_list, forget_device, forget_all_devices]
