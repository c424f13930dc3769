"""LAN serving: the self-signed certificate, the phone's address and QR code, and a real HTTPS/WSS server."""

from __future__ import annotations

import json
import re
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from websockets.sync.client import connect

from app.cli import main, tls_files
from app.config import Settings
from app.engines.loaded import Engines
from app.web import lan
from tests.support import serving, trusting

LAN_IP = "192.168.77.5"  # an address the test pretends the machine has on its network


def alt_names(cert_path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(names.get_values_for_type(x509.DNSName)), {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def test_certificate_is_made_once_and_covers_the_lan_ip(tmp_path: Path) -> None:
    files = lan.ensure_certificate(tmp_path, ips=[LAN_IP])
    assert files.self_signed
    assert alt_names(files.cert) == ({"localhost"}, {"127.0.0.1", LAN_IP})
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600  # the private key is the owner's alone
    first = files.cert.read_bytes()
    assert lan.ensure_certificate(tmp_path, ips=[LAN_IP]).cert.read_bytes() == first  # reused
    # On another network the LAN IP changes: the old certificate would not match it.
    moved = lan.ensure_certificate(tmp_path, ips=["10.1.2.3"])
    assert alt_names(moved.cert)[1] == {"127.0.0.1", "10.1.2.3"}


def test_given_cert_and_key_are_used_as_they_are(tmp_path: Path) -> None:
    made = lan.ensure_certificate(tmp_path, ips=[LAN_IP])
    given = tls_files(lan=True, cert=made.cert, key=made.key)
    assert given == lan.TlsFiles(made.cert, made.key) and not given.self_signed
    assert tls_files(lan=False, cert=None, key=None) is None  # plain http on localhost


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--cert", "c.pem"], "--cert and --key go together"),
     (["--cert", "/no/c.pem", "--key", "/no/k.pem"], "no such file")],
)
def test_bad_tls_flags_are_one_clear_line(capsys, argv: list[str], message: str) -> None:
    assert main(["serve", "--preset", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_phone_url_replaces_loopback_only_when_serving_the_lan() -> None:
    assert lan.phone_url("https://localhost:8443/", "0.0.0.0", ip=LAN_IP) == f"https://{LAN_IP}:8443"
    assert lan.phone_url("https://10.0.0.9:8443/", "0.0.0.0", ip=LAN_IP) == "https://10.0.0.9:8443"
    assert lan.phone_url("http://127.0.0.1:8000/", "127.0.0.1", ip=LAN_IP) == "http://127.0.0.1:8000"


def test_loopback_is_this_computer_only() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert lan.is_loopback(host), host
    for host in ("0.0.0.0", "::", LAN_IP, "assistant.home.arpa", ""):
        assert not lan.is_loopback(host), host


def test_qr_codes_carry_the_url() -> None:
    url = f"https://{LAN_IP}:8000"
    svg = lan.qr_svg(url)
    assert svg.startswith("<svg") and f"<title>{url}</title>" in svg
    assert read_qr(svg_modules(svg)) == url
    assert read_qr(text_modules(lan.qr_text(url))) == url
    titled = lan.qr_svg(f"{url}/?token=secret", title="The link that pairs a phone")
    assert "secret" not in titled.split("<path", 1)[0] and read_qr(svg_modules(titled)) == f"{url}/?token=secret"


def svg_modules(svg: str) -> np.ndarray:
    """segno's SVG back to its module grid (True = dark): one path of horizontal strokes,
    `M`/`m` moving to a row's middle, `h` drawing that many modules."""
    size = int(re.search(r'viewBox="0 0 (\d+) \d+"', svg).group(1))
    path = re.search(r'class="qrline"[^>]* d="([^"]+)"', svg).group(1)
    dark = np.zeros((size, size), bool)
    x = y = 0.0
    for command, a, b in re.findall(r"([Mmh])(-?[\d.]+)(?: (-?[\d.]+))?", path):
        if command == "h":
            dark[int(y), int(x) : int(x + float(a))] = True
            x += float(a)
        else:
            x, y = (float(a), float(b)) if command == "M" else (x + float(a), y + float(b))
    return dark


def text_modules(text: str) -> np.ndarray:
    """The terminal QR code back to its grid: each character is two rows, a block is light (the code is
    drawn light-on-dark for terminals), so a space is two dark modules."""
    light_top = {"█": (True, True), "▀": (True, False), "▄": (False, True), " ": (False, False)}
    rows = [[light_top[c] for c in line] for line in text.splitlines() if line]
    top = [[not t for t, _ in row] for row in rows]
    bottom = [[not b for _, b in row] for row in rows]
    return np.array([r for pair in zip(top, bottom, strict=True) for r in pair], bool)


def read_qr(dark: np.ndarray) -> str:
    """Decode a module grid as a phone's camera would see it: black on white, 8 pixels a module."""
    import zxingcpp

    pixels = np.kron(np.where(dark, 0, 255).astype(np.uint8), np.ones((8, 8), np.uint8))
    (found,) = zxingcpp.read_barcodes(pixels)
    return found.text


@pytest.fixture(scope="module")
def https_server(tmp_path_factory, cpu_settings: Settings, engines: Engines) -> Iterator[tuple[str, Path]]:
    """The real app over HTTPS, configured as `--lan` (all interfaces) but bound to loopback only, so the
    test opens nothing to the network; with a certificate app/web/lan.py made. Yields (base URL, cert)."""
    import msgspec

    from app.web.server import create_app

    tls = lan.ensure_certificate(tmp_path_factory.mktemp("tls"))
    settings = msgspec.structs.replace(cpu_settings, host=lan.ALL_INTERFACES)
    with serving(create_app(settings, engines), **lan.uvicorn_tls(tls)) as url:
        yield url, tls.cert


def test_https_server_accepts_the_websocket(https_server: tuple[str, Path]) -> None:
    base, cert = https_server
    trust = trusting(cert)
    with connect(base.replace("https", "wss") + "/ws", ssl=trust, open_timeout=10) as ws:
        ready = json.loads(ws.recv(timeout=10))
        assert ready["type"] == "ready" and ready["preset"] == "cpu"
        ws.send(json.dumps({"type": "hello", "mode": "push_to_talk"}))
    page = urllib.request.urlopen(base + "/", context=trust, timeout=10).read().decode()
    assert "https://" in page  # the page names its https address for the phone
    svg = urllib.request.urlopen(base + "/qr.svg", context=trust, timeout=10).read().decode()
    assert read_qr(svg_modules(svg)) == f"https://{lan.lan_ip()}:{base.rsplit(':', 1)[1]}"  # localhost -> LAN IP


def test_startup_log_names_the_lan_address_with_a_qr_code(monkeypatch, capsys, caplog, tmp_path: Path) -> None:
    monkeypatch.setattr(lan, "lan_ip", lambda: LAN_IP)
    tls = lan.ensure_certificate(tmp_path, ips=[LAN_IP])
    with caplog.at_level("INFO", logger="app.web.lan"):
        lan.announce(lan.ALL_INTERFACES, 8000, tls)
    assert f"https://{LAN_IP}:8000" in caplog.text and "self-signed" in caplog.text
    assert read_qr(text_modules(capsys.readouterr().out)) == f"https://{LAN_IP}:8000"  # for the phone to scan
    caplog.clear()
    lan.announce("127.0.0.1", 8000, None)  # localhost only: nothing to scan
    assert not caplog.text and not capsys.readouterr().out
