"""Paired devices against the real server: each has a cookie of its own, renewed on use and dropped after
30 days unseen; the settings dialog lists them, and one or all can be forgotten from a same-origin page."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import msgspec
import pytest
from websockets.sync.client import connect

from app.config import Settings
from app.engines.loaded import Engines
from app.web import access, devices, lan
from tests.support import serving
from tests.web.test_access import get, pair

PHONE = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 Version/17.5 Mobile Safari/604.1"
LAPTOP = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
DAY = 86_400


class Server(NamedTuple):
    url: str
    pairing: devices.Pairing
    now: list[float]  # the device list's clock: move it to age the devices


@pytest.fixture
def server(tmp_path: Path, cpu_settings: Settings, engines: Engines) -> Iterator[Server]:
    """A server that pairs (all interfaces, this computer not trusted), on plain http://127.0.0.1 (where a
    browser keeps a Secure cookie), with a device list whose clock the test moves."""
    from app.web.server import create_app

    now = [time.time()]
    token = lan.pairing_token(tmp_path)
    pairing = devices.Pairing(token, devices.DeviceList(tmp_path / devices.DEVICES_NAME, clock=lambda: now[0]))
    settings = msgspec.structs.replace(cpu_settings, host=lan.ALL_INTERFACES,
                                       access=access.AccessSettings(trust_loopback=False))
    with serving(create_app(settings, engines, pairing=pairing)) as url:
        yield Server(url, pairing, now)


def handles(server: Server) -> dict[str, str]:
    return {d.label: d.handle for d in server.pairing.devices.listed()}


def test_the_settings_list_the_paired_devices(server: Server) -> None:
    phone, laptop = pair(server.url, server.pairing.token, user_agent=PHONE), \
        pair(server.url, server.pairing.token, user_agent=LAPTOP)
    assert set(handles(server)) == {"Safari on iPhone", "Firefox on Linux"}
    page = get(server.url, "/", headers=phone)[2]
    assert 'hx-get="/devices"' in page and "Paired devices" in page
    status, _, listed = get(server.url, "/devices", headers=phone)
    assert status == 200 and "Safari on iPhone</b> (this device)" in listed and "Firefox on Linux</b>" in listed
    assert listed.count("(this device)") == 2  # its name and its button's label, nothing for the laptop
    assert f'hx-post="/devices/{handles(server)["Firefox on Linux"]}/forget"' in listed
    assert 'hx-post="/devices/forget-all"' in listed and server.pairing.token not in listed
    assert get(server.url, "/devices", headers=laptop)[2].count("(this device)") == 2


def test_forgetting_one_device_unpairs_it_alone(server: Server) -> None:
    phone, laptop = pair(server.url, server.pairing.token, user_agent=PHONE), \
        pair(server.url, server.pairing.token, user_agent=LAPTOP)
    forget = f"/devices/{handles(server)['Firefox on Linux']}/forget"
    status, headers, listed = get(server.url, forget, headers=phone, method="POST")
    assert status == 200 and "Firefox" not in listed and "hx-refresh" not in headers
    assert get(server.url, "/", headers=laptop)[0] == 401  # the laptop must pair again
    assert get(server.url, "/", headers=phone)[0] == 200
    # The device in use forgets itself: its cookie goes, and htmx reloads into the pairing page.
    mine = f"/devices/{handles(server)['Safari on iPhone']}/forget"
    status, headers, _ = get(server.url, mine, headers=phone, method="POST")
    assert status == 200 and headers["hx-refresh"] == "true"
    assert headers["set-cookie"].startswith(f'{devices.COOKIE}=""') and "Max-Age=0" in headers["set-cookie"]
    assert get(server.url, "/", headers=phone)[0] == 401 and server.pairing.devices.listed() == []


def test_forgetting_all_devices_unpairs_every_one(server: Server) -> None:
    phone, laptop = pair(server.url, server.pairing.token, user_agent=PHONE), \
        pair(server.url, server.pairing.token, user_agent=LAPTOP)
    status, headers, listed = get(server.url, "/devices/forget-all", headers=laptop, method="POST")
    assert status == 200 and headers["hx-refresh"] == "true" and "No device is paired" in listed
    assert get(server.url, "/", headers=phone)[0] == get(server.url, "/", headers=laptop)[0] == 401
    stored = (server.pairing.devices.path).read_bytes()
    assert msgspec.json.decode(stored) == []  # gone from the file too: a restart pairs nobody
    assert get(server.url, "/metrics", headers={"Authorization": f"Bearer {server.pairing.token}"})[0] == 200


def test_the_device_routes_take_only_this_servers_pages_and_paired_devices(server: Server) -> None:
    phone = pair(server.url, server.pairing.token, user_agent=PHONE)
    forget_all = "/devices/forget-all"
    foreign = {**phone, "Origin": "http://evil.example"}
    assert get(server.url, forget_all, headers=foreign, method="POST")[0] == 403
    assert get(server.url, forget_all, method="POST")[0] == 401  # not paired
    assert get(server.url, forget_all, headers={"Origin": server.url}, method="POST")[0] == 401
    assert get(server.url, forget_all, headers=phone, method="GET")[0] == 405
    assert len(server.pairing.devices.listed()) == 1  # nothing was forgotten


def test_a_device_is_renewed_on_use_and_dropped_after_30_days_unseen(server: Server) -> None:
    phone = pair(server.url, server.pairing.token, user_agent=PHONE)
    status, headers, _ = get(server.url, "/status", headers=phone)
    assert status == 200 and "set-cookie" not in headers  # renewed at most once a day
    server.now[0] += 2 * DAY
    ws_url = server.url.replace("http", "ws") + "/ws"
    with connect(ws_url, open_timeout=10, additional_headers=phone) as ws:  # a socket's answer sets no cookie...
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
    status, headers, _ = get(server.url, "/status", headers=phone)  # ...the next request renews: htmx's poll
    cookie = phone["Cookie"].split("; ")[0]
    assert status == 200 and headers["set-cookie"].startswith(cookie + ";")  # the same id, 30 days more
    assert f"Max-Age={30 * DAY}" in headers["set-cookie"]
    assert server.pairing.devices.listed()[0].last_seen == server.now[0]
    server.now[0] += 29 * DAY  # 29 days after the renewal: still paired
    assert get(server.url, "/", headers=phone)[0] == 200
    server.now[0] += 31 * DAY  # a month unseen: dropped (its cookie expired anyway)
    assert get(server.url, "/", headers=phone)[0] == 401 and server.pairing.devices.listed() == []
    on_disk = devices.DeviceList(server.pairing.devices.path, clock=lambda: server.now[0])
    assert on_disk.listed() == []


def test_the_device_list_survives_a_restart_and_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / devices.DEVICES_NAME
    first = devices.DeviceList(path)
    device_id = first.pair(PHONE)
    again = devices.DeviceList(path)  # the server restarted
    assert again.find(device_id) is not None and again.find("x" + device_id) is None
    path.write_text("{not json")
    assert devices.DeviceList(path).listed() == []  # pairs nobody: each device pairs again


@pytest.mark.parametrize(("agent", "label"), [
    (PHONE, "Safari on iPhone"), (LAPTOP, "Firefox on Linux"),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/130.0 Mobile Safari/537.36",
     "Chrome on Android"),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/130.0 Safari/537.36 Edg/130.0", "Edge on Windows"),
    ("curl/8.5.0", "curl/8.5.0"), ("<script>alert(1)</script>", "scriptalert(1)/script"), ("", "A browser"),
])
def test_a_device_is_named_after_its_browser(agent: str, label: str) -> None:
    assert devices.device_label(agent) == label
