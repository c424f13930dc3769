"""Serving phones on the local network: the LAN address, a self-signed HTTPS certificate, the pairing
token, and QR codes.

A phone's browser opens the microphone only on a secure page, so `serve --lan` needs HTTPS; without
a certificate of the user's own, one is made once and kept under the cache folder, and so is the token
that pairs a device (whenever the server listens beyond loopback; access.py checks it, devices.py keeps
the devices it paired), so that a paired phone stays paired across restarts. The folder is the owner's
alone (0700), and so are the key, the token and the device list (0600).
"""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import logging
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

log = logging.getLogger(__name__)

ALL_INTERFACES = "0.0.0.0"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
CERT_DAYS = 825  # the longest validity Apple's platforms accept for a server certificate
CERT_NAME, KEY_NAME, TOKEN_NAME = "cert.pem", "key.pem", "token"


class ExposedSecret(ValueError):
    """A secret file others can read; the message names it and the fix (the cli says it as a ConfigError)."""


class TlsFiles(msgspec.Struct, frozen=True):
    """A PEM certificate and its private key, as uvicorn's ssl_certfile/ssl_keyfile take them."""

    cert: Path
    key: Path
    self_signed: bool = False  # made here: browsers warn once, the log says so


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address or a name) is this computer only: then nobody else can connect."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name other than localhost: it may resolve to any interface
        return False


def lan_ip() -> str:
    """This machine's address on the local network (the interface of the default route).

    Connecting a UDP socket sends nothing; it only makes the OS choose the outgoing interface.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return probe.getsockname()[0]
        except OSError:  # no network at all: the phone cannot reach us anyway
            return "127.0.0.1"


def default_tls_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "voice-assistant" / "tls"


def page_url(host: str, port: int, *, tls: bool) -> str:
    scheme = "https" if tls else "http"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{scheme}://{host}:{port}"


def phone_url(request_url: str, bind_host: str, ip: str | None = None) -> str:
    """The address a phone should open: the page's own, with the LAN IP in place of a loopback name
    when the server listens on every interface (the user opened it on the computer as localhost)."""
    parts = urlsplit(request_url)
    host = parts.hostname or "localhost"
    if bind_host in (ALL_INTERFACES, "::", "") and host in LOOPBACK_NAMES:
        host = ip or lan_ip()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return page_url(host, port, tls=parts.scheme == "https")


# ---------------------------------------------------------------- certificate


def ensure_certificate(folder: Path | None = None, ips: list[str] | None = None) -> TlsFiles:
    """A self-signed certificate for localhost, 127.0.0.1 and the LAN IP, made once and reused
    while it still covers those names (a new network means a new LAN IP, so a new certificate)."""
    folder = private_folder(folder or default_tls_dir())
    files = TlsFiles(folder / CERT_NAME, folder / KEY_NAME, self_signed=True)
    wanted = {"127.0.0.1", *(ips if ips is not None else [lan_ip()])}
    if _still_good(files, wanted):
        files.key.chmod(0o600)  # made by hand or by an older version: the key is the owner's alone
        log.info("TLS: reusing the self-signed certificate in %s", folder)
        return files
    cert_pem, key_pem = _self_signed(sorted(wanted))
    write_private(files.key, key_pem)
    files.cert.write_bytes(cert_pem)
    log.info("TLS: made a self-signed certificate for localhost, %s in %s", ", ".join(sorted(wanted)), folder)
    return files


def _still_good(files: TlsFiles, ips: set[str]) -> bool:
    from cryptography import x509

    if not (files.cert.is_file() and files.key.is_file()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    have = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    fresh = cert.not_valid_after_utc > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    return fresh and ips <= have and "localhost" in names.get_values_for_type(x509.DNSName)


def _self_signed(ips: list[str]) -> tuple[bytes, bytes]:
    """(certificate PEM, unencrypted private key PEM); EC P-256 is fast to make and every browser takes it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voice-assistant (self-signed)")])
    now = dt.datetime.now(dt.timezone.utc)
    alt = [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a phone's clock running behind
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def private_folder(folder: Path) -> Path:
    """The folder of the key, the token and the device list, made (or made again) the owner's alone."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)  # one that existed (an older version made it 0755) is closed too
    return folder


def write_private(path: Path, data: bytes) -> None:
    """Only the owner may read the file, from the moment it exists: written to a new file beside it
    and renamed over it, so a reader never sees half of it."""
    private_folder(path.parent)
    part = path.with_name(path.name + ".part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, 0o600)  # open's mode applies only when it creates the file: a leftover keeps its own
        out.write(data)
    os.replace(part, path)


def fingerprint(cert: Path) -> str:
    """The certificate's SHA-256 fingerprint as browsers show it (AB:CD:...), to check the one a
    phone is warned about against the one the server log prints."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    digest = x509.load_pem_x509_certificate(cert.read_bytes()).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


# ---------------------------------------------------------------- pairing token


def pairing_token(folder: Path | None = None, *, new: bool = False) -> str:
    """The secret that pairs a device: made once (or again when `new`), kept 0600 next to the certificate.
    One that other users can read is refused (ExposedSecret): they could have paired with it."""
    path = private_folder(folder or default_tls_dir()) / TOKEN_NAME
    if not new and path.is_file():
        _refuse_if_shared(path)
        token = path.read_text().strip()
        if len(token) >= 32:  # a file cut short or emptied is replaced, never trusted
            return token
    token = secrets.token_urlsafe(32)
    write_private(path, token.encode())
    log.info("pairing: made a new token in %s%s", path, " (paired devices must open the new link)" if new else "")
    return token


def _refuse_if_shared(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ExposedSecret(f"the pairing token {path} can be read by other users (mode {mode & 0o777:o}): "
                          f"run `chmod 600 {path}`, or start with --new-token to make a new one")


def token_link(url: str, token: str | None) -> str:
    """The page's address with the pairing token, as the log and the QR code give it."""
    return url if token is None else f"{url}/?token={token}"


# ---------------------------------------------------------------- QR codes


def qr_svg(url: str, title: str | None = None) -> str:
    """The URL as an SVG QR code that scales with CSS (no fixed size), dark modules on white; its title
    is the URL unless given (a pairing link's token has no need to be in it)."""
    import segno

    out = io.BytesIO()
    segno.make(url, error="m").save(
        out, kind="svg", xmldecl=False, svgns=True, omitsize=True, border=2, title=title or url, dark="#000",
        light="#fff",
    )
    return out.getvalue().decode()


def qr_text(url: str) -> str:
    """The URL as a QR code drawn with block characters, for the startup log in a terminal."""
    import segno

    out = io.StringIO()
    segno.make(url, error="m").terminal(out=out, compact=True, border=2)
    return out.getvalue()


def announce(host: str, port: int, tls: TlsFiles | None, token: str | None = None) -> None:
    """When serving beyond this machine, log where a phone should go (with the pairing token) and
    print the QR code to scan (to stdout, undecorated, so that a terminal shows it as a square), and
    the link for this computer's own browser (in Docker the container's LAN IP is not the one the user
    opens); with TLS, the certificate's fingerprint in any case."""
    if tls is not None:
        log.info("TLS certificate SHA-256 fingerprint: %s", fingerprint(tls.cert))
    if is_loopback(host):
        return
    secure = tls is not None
    url = token_link(page_url(lan_ip() if host in (ALL_INTERFACES, "::") else host, port, tls=secure), token)
    log.info("on your phone (same network) open %s -- or scan this QR code:", url)
    print(qr_text(url), flush=True)
    log.info("on this computer open %s (in Docker: with the port you published)",
             token_link(page_url("localhost", port, tls=secure), token))
    if tls is not None and tls.self_signed:
        log.info("the certificate is self-signed (%s): accept the browser's warning once per device, "
                 "after checking that it shows the fingerprint above", tls.cert)
    elif tls is None:
        log.warning("plain http: a phone's browser can be paired and use the microphone only over https "
                    "(use --lan or --cert/--key); programs can still send the token as a bearer token")


# ---------------------------------------------------------------- command line


def uvicorn_tls(tls: TlsFiles | None) -> dict[str, str]:
    """uvicorn.run()/Config keyword arguments that turn on HTTPS (none for plain HTTP)."""
    return {} if tls is None else {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
