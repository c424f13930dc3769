"""Who may use the server, against the real server: the Host check, same-origin /ws, and `--lan` pairing
(the link sets a cookie and redirects, programs use a bearer token, the token file is kept and replaced)."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
import ssl
import stat
from pathlib import Path
from urllib.parse import urlsplit

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.cli import lan_token, main
from app.config import Settings, load_settings
from app.engines.loaded import Engines
from app.web import access, lan
from tests.conftest import PairedServer
from tests.support import serving
from tests.web.test_lan import read_qr, svg_modules, text_modules

LAN_IP = "192.168.77.5"


def get(base: str, path: str, *, headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], str]:
    """One plain request (no redirect followed): status, headers (lower-case names), body."""
    url = urlsplit(base)
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


def first_event(url: str, **options) -> dict:
    with connect(url, open_timeout=10, **options) as ws:
        return json.loads(ws.recv(timeout=10))


def refused_status(url: str, **options) -> int:
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=10, **options)
    return refused.value.response.status_code


# ---------------------------------------------------------------- settings and names


def test_host_names_and_origins_compare_without_ports_and_case() -> None:
    assert access.host_name("127.0.0.1:8000") == "127.0.0.1"
    assert access.host_name("[::1]:8000") == "::1" and access.host_name("::1") == "::1"
    assert access.host_name("Assistant.Home.Arpa") == "assistant.home.arpa"
    assert access._origin("https://X.example") == access._origin("https://x.example:443") == "https://x.example:443"
    assert access._origin("null") == "" and access._origin("file:///tmp/a.html") == ""


def test_allowed_hosts_and_origins_come_from_the_environment_comma_separated() -> None:
    env = {"VA_ACCESS__ALLOWED_HOSTS": "Assistant.home.arpa, 10.0.0.7",
           "VA_ACCESS__ALLOWED_ORIGINS": "https://tools.example"}
    settings = load_settings("cpu", environ=env)
    assert settings.access.allowed_hosts == ("assistant.home.arpa", "10.0.0.7")
    assert settings.access.allowed_origins == ("https://tools.example:443",)
    with pytest.raises(ValueError, match="allowed_origins"):
        load_settings("cpu", environ={"VA_ACCESS__ALLOWED_ORIGINS": "tools.example"})


def test_served_hosts_are_loopback_the_bound_address_and_the_configured_names(monkeypatch) -> None:
    monkeypatch.setattr(lan, "lan_ip", lambda: LAN_IP)
    mine = access.AccessSettings(allowed_hosts=("assistant.home.arpa",))
    assert access.served_hosts("127.0.0.1", access.AccessSettings()) == {"localhost", "127.0.0.1", "::1"}
    assert access.served_hosts(lan.ALL_INTERFACES, mine) == {"localhost", "127.0.0.1", "::1", LAN_IP,
                                                            "assistant.home.arpa"}


# ---------------------------------------------------------------- Host (DNS rebinding)


@pytest.mark.parametrize("path", ["/", "/health", "/metrics", "/status", "/qr.svg", "/static/style.css"])
def test_a_foreign_host_is_refused_on_every_route(live_server: str, path: str) -> None:
    status, _, body = get(live_server, path, headers={"Host": "rebind.attacker.example"})
    assert (status, body) == (400, "This server does not answer to that host name.\n")
    port = urlsplit(live_server).port
    assert get(live_server, path, headers={"Host": f"localhost:{port}"})[0] == 200


def test_a_websocket_for_a_foreign_host_is_refused(live_server: str) -> None:
    port = urlsplit(live_server).port
    sock = socket.create_connection(("127.0.0.1", port))  # the attacker's name resolved to us
    assert refused_status(f"ws://rebind.attacker.example:{port}/ws", sock=sock) == 403


# ---------------------------------------------------------------- Origin


def test_a_page_from_another_origin_cannot_open_the_websocket(live_server: str, caplog) -> None:
    ws_url = live_server.replace("http", "ws") + "/ws"
    with caplog.at_level(logging.WARNING, logger="app.web.access"):
        for _ in range(2):
            assert refused_status(ws_url, origin="http://evil.example") == 403
    refusals = [r.getMessage() for r in caplog.records if r.name == "app.web.access"]
    assert len(refusals) == 1 and "http://evil.example" in refusals[0]  # logged once, with the origin
    # Same host, other port or scheme: another origin too.
    port = urlsplit(live_server).port
    assert refused_status(ws_url, origin=f"http://127.0.0.1:{port + 1}") == 403
    assert refused_status(ws_url, origin=f"https://127.0.0.1:{port}") == 403


def test_the_own_page_and_programs_without_an_origin_are_accepted(live_server: str) -> None:
    ws_url = live_server.replace("http", "ws") + "/ws"
    assert first_event(ws_url, origin=live_server)["type"] == "ready"  # what the browser sends
    port = urlsplit(live_server).port
    as_localhost = socket.create_connection(("127.0.0.1", port))  # the page opened as localhost
    ready = first_event(f"ws://localhost:{port}/ws", sock=as_localhost, origin=f"http://localhost:{port}")
    assert ready["type"] == "ready"
    assert first_event(ws_url)["type"] == "ready"  # a program: no Origin header at all


def test_an_allowed_origin_may_open_the_websocket(cpu_settings: Settings, engines: Engines) -> None:
    from app.web.server import create_app

    settings = msgspec.structs.replace(
        cpu_settings, access=access.AccessSettings(allowed_origins=("https://tools.example",)))
    with serving(create_app(settings, engines)) as url:
        ws_url = url.replace("http", "ws") + "/ws"
        assert first_event(ws_url, origin="https://tools.example")["type"] == "ready"
        assert refused_status(ws_url, origin="https://other.example") == 403


# ---------------------------------------------------------------- pairing (--lan)


@pytest.fixture(scope="module")
def trust(paired_server: PairedServer) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(paired_server.cert))  # a phone that accepted the warning


def test_unpaired_the_page_says_how_to_pair_and_nothing_works(paired_server: PairedServer, trust) -> None:
    base = paired_server.url
    for path in ("/", f"/?token={'x' * 43}"):
        status, _, page = get(base, path, context=trust)
        assert status == 401 and "scan the QR code or open the link from the server log" in " ".join(page.split())
        assert paired_server.fingerprint in page and paired_server.token not in page
    for path in ("/qr.svg", "/status", "/metrics"):
        assert get(base, path, context=trust)[0] == 401
    assert get(base, "/health", context=trust)[0] == 200  # for health checks: says nothing secret
    assert refused_status(base.replace("https", "wss") + "/ws", ssl=trust) == 403


def test_the_link_pairs_a_browser_with_a_cookie_and_a_clean_address(paired_server: PairedServer, trust) -> None:
    base, token = paired_server.url, paired_server.token
    status, headers, _ = get(base, f"/?token={token}", context=trust)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert cookie.startswith(f"{access.COOKIE}={token};") and {"httponly", "secure"} <= attributes
    assert "samesite=strict" in cookie.lower()
    paired = {"Cookie": f"{access.COOKIE}={token}", "Origin": base}
    status, _, page = get(base, "/", headers=paired, context=trust)
    assert status == 200 and 'id="settings"' in page
    assert paired_server.fingerprint in page.split('id="settings"', 1)[1]  # in the settings panel
    svg = get(base, "/qr.svg", headers=paired, context=trust)[2]
    port = urlsplit(base).port
    assert read_qr(svg_modules(svg)) == f"https://{lan.lan_ip()}:{port}/?token={token}"  # pairs the phone too
    ws_url = base.replace("https", "wss") + "/ws"
    assert first_event(ws_url, ssl=trust, additional_headers=paired)["type"] == "ready"


def test_programs_pair_with_a_bearer_token(paired_server: PairedServer, trust) -> None:
    base, token = paired_server.url, paired_server.token
    ws_url = base.replace("https", "wss") + "/ws"
    assert first_event(ws_url, ssl=trust, additional_headers={"Authorization": f"Bearer {token}"})["type"] == "ready"
    assert refused_status(ws_url, ssl=trust, additional_headers={"Authorization": "Bearer wrong"}) == 403
    assert get(base, "/metrics", headers={"Authorization": f"Bearer {token}"}, context=trust)[0] == 200


def test_the_token_file_is_private_kept_and_replaced_on_request(tmp_path: Path) -> None:
    token = lan.pairing_token(tmp_path)
    path = tmp_path / lan.TOKEN_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 43
    assert lan.pairing_token(tmp_path) == token  # a restart: the phone stays paired
    renewed = lan.pairing_token(tmp_path, new=True)
    assert renewed != token and path.read_text() == renewed
    path.write_text("short")  # cut short: never trusted
    assert lan.pairing_token(tmp_path) not in ("short", renewed)


def test_the_command_keeps_the_token_next_to_the_certificate(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = lan_token(lan=True, new=False)
    assert (lan.default_tls_dir() / lan.TOKEN_NAME).read_text() == first
    assert lan_token(lan=True, new=False) == first  # across restarts
    assert lan_token(lan=True, new=True) not in (first, None)  # --new-token
    assert lan_token(lan=False, new=False) is None  # loopback: no pairing
    assert main(["serve", "--preset", "cpu", "--new-token"]) == 2
    assert "--new-token goes with --lan" in capsys.readouterr().err


def test_the_log_gives_the_token_link_as_text_and_qr_code_and_the_fingerprint(
        monkeypatch, capsys, caplog, tmp_path: Path) -> None:
    monkeypatch.setattr(lan, "lan_ip", lambda: LAN_IP)
    tls = lan.ensure_certificate(tmp_path, ips=[LAN_IP])
    der = x509.load_pem_x509_certificate(tls.cert.read_bytes()).public_bytes(Encoding.DER)
    expected = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert lan.fingerprint(tls.cert) == expected
    with caplog.at_level("INFO", logger="app.web.lan"):
        lan.announce(lan.ALL_INTERFACES, 8000, tls, "t0ken")
    link = f"https://{LAN_IP}:8000/?token=t0ken"
    assert link in caplog.text and expected in caplog.text and "no pairing token" not in caplog.text
    assert read_qr(text_modules(capsys.readouterr().out)) == link
