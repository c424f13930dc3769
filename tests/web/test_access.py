"""Who may use the server, against the real server: the Host check, same-origin /ws, and pairing whenever it
listens beyond loopback (the link pairs a device with a cookie of its own and redirects, programs use a
bearer token, this computer is trusted, the token file is private, kept and replaced, the token stays out
of the access log), and the security headers."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
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

from app.cli import main, pairing_for
from app.config import ConfigError, Settings, load_settings
from app.engines.loaded import Engines
from app.web import access, devices, lan
from tests.conftest import PairedServer
from tests.support import serving, trusting
from tests.web.test_lan import read_qr, svg_modules, text_modules

LAN_IP = "192.168.77.5"


def get(base: str, path: str, *, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], str]:
    """One plain request (no redirect followed): status, headers (lower-case names; a repeated one's
    values joined by newlines), body."""
    url = urlsplit(base)
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        got: dict[str, str] = {}
        for name, value in response.getheaders():
            got[name.lower()] = f"{got[name.lower()]}\n{value}" if name.lower() in got else value
        return response.status, got, response.read().decode()
    finally:
        conn.close()


def pair(base: str, token: str, context: ssl.SSLContext | None = None,
         user_agent: str = "Mozilla/5.0 (Linux; Android 14) Chrome/130.0 Mobile Safari/537.36") -> dict[str, str]:
    """Open the pairing link as a browser would; the request headers of that paired browser from then on."""
    status, headers, _ = get(base, f"/?token={token}", headers={"User-Agent": user_agent}, context=context)
    assert status == 303, status
    device_id = headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
    return {"Cookie": f"{devices.COOKIE}={device_id}", "Origin": base, "User-Agent": user_agent}


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


# ---------------------------------------------------------------- pairing


@pytest.fixture(scope="module")
def trust(paired_server: PairedServer) -> ssl.SSLContext:
    return trusting(paired_server.cert)


def test_unpaired_the_page_says_how_to_pair_and_nothing_works(paired_server: PairedServer, trust) -> None:
    base = paired_server.url
    for path in ("/", f"/?token={'x' * 43}"):
        status, headers, page = get(base, path, context=trust)
        assert status == 401 and "scan the QR code or open the link from the server log" in " ".join(page.split())
        assert paired_server.fingerprint in page and paired_server.token not in page
        assert "set-cookie" not in headers
    for path in ("/qr.svg", "/status", "/metrics", "/devices"):
        assert get(base, path, context=trust)[0] == 401
    assert refused_status(base.replace("https", "wss") + "/ws", ssl=trust) == 403


def test_health_tells_a_stranger_only_whether_it_is_ready(paired_server: PairedServer, trust) -> None:
    """For health checks from anywhere: the state and progress, never the models or the LLM server."""
    status, _, body = get(paired_server.url, "/health", context=trust)
    assert (status, json.loads(body)) == (200, {"status": "ok", "phase": "ready", "done_bytes": 0, "total_bytes": 0})
    paired = json.loads(get(paired_server.url, "/health", headers=pair(paired_server.url, paired_server.token, trust),
                            context=trust)[2])
    assert paired["preset"] == "cpu" and {"asr", "llm", "tts", "llm_backend"} <= set(paired)


def test_the_link_pairs_a_device_with_a_cookie_of_its_own(paired_server: PairedServer, trust) -> None:
    base, token = paired_server.url, paired_server.token
    status, headers, _ = get(base, f"/?token={token}", headers={"User-Agent": "Mozilla/5.0 (iPhone) Safari/605"},
                             context=trust)
    assert status == 303 and headers["location"] == "/" and headers["cache-control"] == "no-store"
    cookie = headers["set-cookie"]
    name, device_id = cookie.split(";", 1)[0].split("=", 1)
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")[1:]}
    assert name == "__Host-va_device" and len(device_id) >= 43 and token not in cookie  # the id, not the token
    assert {"httponly", "secure", "path", "max-age", "samesite"} <= set(attributes) and "domain" not in attributes
    assert attributes["path"] == "Path=/" and attributes["samesite"].lower() == "samesite=strict"
    assert attributes["max-age"] == f"Max-Age={30 * 86400}"  # 30 days, renewed on use
    paired = {"Cookie": f"{devices.COOKIE}={device_id}", "Origin": base}
    status, headers, page = get(base, "/", headers=paired, context=trust)
    assert status == 200 and 'id="settings"' in page and headers["cache-control"] == "no-store"
    assert paired_server.fingerprint in page.split('id="settings"', 1)[1]  # in the settings panel
    status, headers, svg = get(base, "/qr.svg", headers=paired, context=trust)
    assert headers["cache-control"] == "no-store" and token not in svg.split("<path", 1)[0]  # not in its title
    port = urlsplit(base).port
    assert read_qr(svg_modules(svg)) == f"https://{lan.lan_ip()}:{port}/?token={token}"  # pairs the phone too
    ws_url = base.replace("https", "wss") + "/ws"
    assert first_event(ws_url, ssl=trust, additional_headers=paired)["type"] == "ready"
    stored = (paired_server.folder / devices.DEVICES_NAME).read_text()
    assert device_id not in stored and hashlib.sha256(device_id.encode()).hexdigest() in stored  # its hash only
    assert stat.S_IMODE((paired_server.folder / devices.DEVICES_NAME).stat().st_mode) == 0o600


def test_programs_pair_with_a_bearer_token_which_is_no_cookie(paired_server: PairedServer, trust) -> None:
    base, token = paired_server.url, paired_server.token
    ws_url = base.replace("https", "wss") + "/ws"
    assert first_event(ws_url, ssl=trust, additional_headers={"Authorization": f"Bearer {token}"})["type"] == "ready"
    assert refused_status(ws_url, ssl=trust, additional_headers={"Authorization": "Bearer wrong"}) == 403
    assert get(base, "/metrics", headers={"Authorization": f"Bearer {token}"}, context=trust)[0] == 200
    # The token is not a device's cookie, and a device's id is no bearer token.
    assert get(base, "/metrics", headers={"Cookie": f"{devices.COOKIE}={token}"}, context=trust)[0] == 401
    assert get(base, "/metrics", headers={"Cookie": f"va_pairing={token}"}, context=trust)[0] == 401  # the old cookie
    device_id = pair(base, token, trust)["Cookie"].split("=", 1)[1]
    assert get(base, "/metrics", headers={"Authorization": f"Bearer {device_id}"}, context=trust)[0] == 401
    assert refused_status(ws_url, ssl=trust, additional_headers={"Authorization": f"Bearer {device_id}"}) == 403


def test_this_computer_is_trusted_unless_told_otherwise(tmp_path: Path, cpu_settings: Settings,
                                                        engines: Engines) -> None:
    """access.trust_loopback (on by default): a client on 127.0.0.1 is this computer's own browser, paired
    without the link; it sees the QR code that pairs phones. Off, it pairs like any other."""
    from app.web.server import create_app

    pairing = devices.open_pairing(tmp_path)
    for trusted in (True, False):
        settings = msgspec.structs.replace(cpu_settings, host=lan.ALL_INTERFACES,
                                           access=access.AccessSettings(trust_loopback=trusted))
        with serving(create_app(settings, engines, pairing=pairing)) as url:
            status, _, page = get(url, "/")
            assert status == (200 if trusted else 401)
            assert (f"/?token={pairing.token}" in page) == trusted and ('id="devices"' in page) == trusted
            health = json.loads(get(url, "/health")[2])
            assert ("llm_backend" in health) == trusted
            ws_url = url.replace("http", "ws") + "/ws"
            if trusted:
                assert get(url, "/qr.svg")[0] == 200 and first_event(ws_url)["type"] == "ready"
            else:
                assert get(url, "/qr.svg")[0] == 401 and refused_status(ws_url) == 403
    assert load_settings("cpu", environ={"VA_ACCESS__TRUST_LOOPBACK": "false"}).access.trust_loopback is False


def test_plain_http_to_a_lan_address_says_pairing_needs_https(tmp_path: Path, cpu_settings: Settings,
                                                              engines: Engines) -> None:
    """`--host 0.0.0.0` without TLS: a browser drops a Secure cookie from http://<lan address>, so the link
    pairs nothing there and the page says so; programs still get in with the token."""
    from app.web.server import create_app

    pairing = devices.open_pairing(tmp_path)
    settings = msgspec.structs.replace(cpu_settings, host=lan.ALL_INTERFACES, access=access.AccessSettings(
        allowed_hosts=("assistant.home.arpa",), trust_loopback=False))
    with serving(create_app(settings, engines, pairing=pairing)) as url:
        port = urlsplit(url).port
        as_lan = {"Host": f"assistant.home.arpa:{port}"}
        status, headers, page = get(url, f"/?token={pairing.token}", headers=as_lan)
        words = " ".join(page.split())
        assert status == 401 and "set-cookie" not in headers and pairing.devices.listed() == []
        assert "a browser is paired only over https" in words and f"http://localhost:{port}/?token=" in words
        assert "Authorization: Bearer &lt;token&gt;" in words and pairing.token not in page
        assert get(url, "/metrics", headers={**as_lan, "Authorization": f"Bearer {pairing.token}"})[0] == 200
        # This computer's own browser, at http://localhost: its cookie is kept, so the link pairs it.
        status, headers, _ = get(url, f"/?token={pairing.token}", headers={"Host": f"localhost:{port}"})
        assert status == 303 and headers["set-cookie"].startswith(devices.COOKIE)


def test_the_token_file_is_private_kept_and_replaced_on_request(tmp_path: Path) -> None:
    token = lan.pairing_token(tmp_path)
    path = tmp_path / lan.TOKEN_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(token) >= 43
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700  # and so is its folder
    assert lan.pairing_token(tmp_path) == token  # a restart: the phone stays paired
    renewed = lan.pairing_token(tmp_path, new=True)
    assert renewed != token and path.read_text() == renewed
    path.write_text("short")  # cut short: never trusted
    assert lan.pairing_token(tmp_path) not in ("short", renewed)


def test_files_that_others_can_read_are_closed_or_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    """An existing file keeps its mode when opened for writing: the key and token are made private anyway,
    and a token others could have read is refused until it is closed or replaced."""
    folder = tmp_path / "voice-assistant" / "tls"
    folder.mkdir(parents=True, mode=0o755)
    for name in (lan.KEY_NAME, lan.TOKEN_NAME + ".part", lan.KEY_NAME + ".part"):
        (folder / name).write_text("left over")
        (folder / name).chmod(0o644)
    tls = lan.ensure_certificate(folder, ips=[LAN_IP])
    assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    token = lan.pairing_token(folder)
    (folder / lan.TOKEN_NAME).chmod(0o644)
    with pytest.raises(lan.ExposedSecret, match="can be read by other users"):
        lan.pairing_token(folder)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="can be read by other users"):
        pairing_for(lan.ALL_INTERFACES, new=False)  # what `serve` says, as one line
    assert main(["serve", "--preset", "cpu", "--lan"]) == 2
    (line,) = capsys.readouterr().err.splitlines()  # one line: the file and the fix
    assert str(folder / lan.TOKEN_NAME) in line and "chmod 600" in line and "--new-token" in line
    assert lan.pairing_token(folder, new=True) != token  # --new-token replaces it, private
    assert stat.S_IMODE((folder / lan.TOKEN_NAME).stat().st_mode) == 0o600


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.77.5", "::", "assistant.home.arpa"])
def test_every_server_beyond_loopback_pairs(monkeypatch, tmp_path: Path, host: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = pairing_for(host, new=False)
    assert first is not None and (lan.default_tls_dir() / lan.TOKEN_NAME).read_text() == first.token
    assert pairing_for(host, new=False).token == first.token  # across restarts


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_a_server_on_loopback_does_not_pair(monkeypatch, tmp_path: Path, capsys, host: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pairing_for(host, new=False) is None and not (tmp_path / "voice-assistant").exists()
    assert main(["serve", "--preset", "cpu", "--host", host, "--new-token"]) == 2
    assert "--new-token goes with a server on the network" in capsys.readouterr().err


def test_new_token_forgets_every_device(monkeypatch, tmp_path: Path, capsys) -> None:
    """`--new-token`, with --lan or with a plain --host: a new token, and no device paired with the old one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    old = pairing_for("0.0.0.0", new=False)
    old.devices.pair("Firefox on Linux")
    served: list = []
    monkeypatch.setattr("app.cli.serve", lambda settings, **kw: served.append((settings, kw)) or 0)
    assert main(["serve", "--preset", "cpu", "--host", "0.0.0.0", "--new-token"]) == 0
    pairing = served[-1][1]["pairing"]
    assert pairing.token != old.token and pairing.devices.listed() == []
    assert devices.DeviceList(lan.default_tls_dir() / devices.DEVICES_NAME).listed() == []  # on disk too


def test_the_log_gives_the_token_links_as_text_and_qr_code_and_the_fingerprint(
        monkeypatch, capsys, caplog, tmp_path: Path) -> None:
    monkeypatch.setattr(lan, "lan_ip", lambda: LAN_IP)
    tls = lan.ensure_certificate(tmp_path, ips=[LAN_IP])
    der = x509.load_pem_x509_certificate(tls.cert.read_bytes()).public_bytes(Encoding.DER)
    expected = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert lan.fingerprint(tls.cert) == expected
    with caplog.at_level("INFO", logger="app.web.lan"):
        lan.announce(lan.ALL_INTERFACES, 8000, tls, "t0ken")
    link = f"https://{LAN_IP}:8000/?token=t0ken"
    assert link in caplog.text and expected in caplog.text
    assert "on this computer open https://localhost:8000/?token=t0ken" in caplog.text  # what Docker's user opens
    assert read_qr(text_modules(capsys.readouterr().out)) == link
    caplog.clear()
    with caplog.at_level("INFO", logger="app.web.lan"):
        lan.announce(lan.ALL_INTERFACES, 8000, None, "t0ken")  # the Docker image: plain http
    assert "http://localhost:8000/?token=t0ken" in caplog.text and "paired and use the microphone only over https" \
        in caplog.text
    capsys.readouterr()


def test_the_access_log_never_holds_the_token(tmp_path: Path, cpu_settings: Settings, engines: Engines) -> None:
    """Through uvicorn's own access logger, as `serve` configures it: a pairing link's token is hidden."""
    from app.web.server import create_app

    pairing = devices.open_pairing(tmp_path)
    settings = msgspec.structs.replace(cpu_settings, host=lan.ALL_INTERFACES,
                                       access=access.AccessSettings(trust_loopback=False))
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    with serving(create_app(settings, engines, pairing=pairing), log_level="info", access_log=True) as url:
        access.hide_tokens_in_access_log()
        logging.getLogger("uvicorn.access").addHandler(handler)
        try:
            assert get(url, f"/health?token={pairing.token}&x=1")[0] == 200
            assert get(url, f"/?token={pairing.token}")[0] == 303
        finally:
            logging.getLogger("uvicorn.access").removeHandler(handler)
    lines = [r for r in records if "GET /" in r]
    assert len(lines) == 2 and all(pairing.token not in r for r in records), records
    assert "/health?token=[hidden]&x=1" in lines[0] and "/?token=[hidden]" in lines[1]


# ---------------------------------------------------------------- security headers


def test_every_page_forbids_framing_foreign_scripts_and_referrers(paired_server: PairedServer, trust) -> None:
    base = paired_server.url
    paired = pair(base, paired_server.token, trust)
    pages = {"/": paired, "/status": paired, "/devices": paired, "/qr.svg": paired, "/?unpaired": {},
             "/nowhere": paired}
    port = urlsplit(base).port
    for path, headers in pages.items():
        status, got, _ = get(base, path, headers=headers, context=trust)
        assert status == {"/?unpaired": 401, "/nowhere": 404}.get(path, 200), path
        policy = dict(d.strip().split(" ", 1) for d in got["content-security-policy"].split(";"))
        assert policy["frame-ancestors"] == "'self'" and policy["script-src"] == "'self'", path
        assert policy["connect-src"] == f"'self' wss://127.0.0.1:{port}" and "'unsafe" not in str(policy)
        assert (got["x-frame-options"], got["x-content-type-options"], got["referrer-policy"]) == (
            "SAMEORIGIN", "nosniff", "no-referrer"), path
        if got["content-type"].startswith(("text/html", "image/svg")):
            assert got["cache-control"] == "no-store", path


def test_the_page_runs_no_inline_code(live_server: str) -> None:
    """`script-src 'self'` allows only the page's own files: no inline script, event handler or javascript: URL."""
    page = get(live_server, "/")[2]
    scripts = re.findall(r"<script\b[^>]*>", page)
    assert scripts and all("src=" in tag for tag in scripts) and "</script>" not in page.replace("></script>", "")
    assert not re.search(r"\son[a-z]+\s*=", page) and "javascript:" not in page and "style=" not in page
    assert '"allowEval": false' in page and '"includeIndicatorStyles": false' in page  # htmx's own
