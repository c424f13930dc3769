"""The `voice-assistant` command:
`voice-assistant serve [--preset auto|cpu|gpu] [--host H] [--port P] [--wyoming PORT]`."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from app.config import ConfigError, Settings, load_settings
from app.web.devices import Pairing, open_pairing
from app.web.lan import (
    ALL_INTERFACES,
    ExposedSecret,
    TlsFiles,
    announce,
    ensure_certificate,
    fingerprint,
    is_loopback,
    uvicorn_tls,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="voice-assistant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the assistant's web server")
    serve.add_argument("--preset", default="auto", choices=["auto", "cpu", "gpu"],
                       help="model set: gpu needs CUDA; auto picks gpu when a GPU is present")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--asr-model", help="speech-to-text model reference (see docs/configuration.md)")
    serve.add_argument("--llm-model", help="language model reference (GGUF)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning"], help="log detail")
    serve.add_argument("--lan", action="store_true",
                       help="serve phones on the local network: all interfaces, HTTPS (self-signed unless --cert)")
    serve.add_argument("--cert", type=Path, help="TLS certificate (PEM file); with --key, serve HTTPS")
    serve.add_argument("--key", type=Path, help="private key of --cert (PEM file)")
    serve.add_argument("--wyoming", type=int, metavar="PORT",
                       help="also serve Home Assistant's Wyoming protocol on this port (its usual one: 10300)")
    serve.add_argument("--zeroconf", action="store_true",
                       help="announce the Wyoming server on the network for Home Assistant to discover (with --lan)")
    serve.add_argument("--new-token", action="store_true",
                       help="replace the pairing token and forget every paired device (a server on the network)")
    return parser.parse_args(argv)


def flag_overrides(args: argparse.Namespace) -> dict:
    values: dict = {}
    for key in ("host", "port", "log_level"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.lan and args.host is None:
        values["host"] = ALL_INTERFACES
    if args.asr_model:
        values["asr"] = {"model": args.asr_model}
    if args.llm_model:
        values["llm"] = {"model": args.llm_model}
    wyoming = {"port": args.wyoming} if args.wyoming is not None else {}
    if args.zeroconf:
        wyoming["zeroconf"] = True
    if wyoming:
        values["wyoming"] = wyoming
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.preset, flag_overrides(args))
        tls = tls_files(lan=args.lan, cert=args.cert, key=args.key)
        pairing = pairing_for(settings.host, new=args.new_token)
        check_wyoming_port(settings)
    except ConfigError as exc:
        print(f"voice-assistant: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    return serve(settings, fallback=args.preset == "auto", tls=tls, pairing=pairing)


def tls_files(*, lan: bool, cert: Path | None, key: Path | None) -> TlsFiles | None:
    """The TLS files `serve` should use: the user's own (--cert/--key), a self-signed one for --lan,
    or None for plain HTTP on localhost (a secure context already, so the microphone works)."""
    if (cert is None) != (key is None):
        raise ConfigError("--cert and --key go together: give both files or neither")
    if cert is not None and key is not None:
        for flag, path in (("--cert", cert), ("--key", key)):
            if not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        return TlsFiles(cert, key)
    return ensure_certificate() if lan else None


def check_wyoming_port(settings: Settings) -> None:
    """The Wyoming port must be free before anything starts: found taken later, it would end the server with a
    traceback from inside the app's start-up."""
    port = settings.wyoming.port
    if not port:
        return
    if port == settings.port:
        raise ConfigError(f"--wyoming {port} is the web server's port too: give the Wyoming server a port of its own")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server binds: TIME_WAIT is free
        try:
            probe.bind((settings.host, port))
        except OSError as exc:
            raise ConfigError(f"the Wyoming port {settings.host}:{port} cannot be used ({exc.strerror}): "
                              "choose another with --wyoming") from None


def pairing_for(host: str, *, new: bool) -> Pairing | None:
    """The pairing of a server that listens beyond loopback (`--lan`, `--host 0.0.0.0`, a LAN address, the
    Docker image's VA_HOST=0.0.0.0): its token, kept across restarts, and its paired devices; `--new-token`
    replaces the token and forgets the devices. None on loopback: nobody else can connect."""
    if is_loopback(host):
        if new:
            raise ConfigError(f"--new-token goes with a server on the network (--lan, or --host other than {host}): "
                              "one on this computer alone pairs nothing")
        return None
    try:
        return open_pairing(new=new)
    except ExposedSecret as exc:
        raise ConfigError(str(exc)) from None


def serve(settings: Settings, *, fallback: bool = False, tls: TlsFiles | None = None,
          pairing: Pairing | None = None) -> int:
    """Open the port at once; the models load and warm up behind it (/health says "loading").
    A model that cannot load ends the server: exit 1 with the one-line reason, no traceback wall.
    With `pairing`, every browser must be paired and every program carry the token (access.py)."""
    import uvicorn

    from app.web.access import hide_tokens_in_access_log
    from app.web.server import create_app

    def stop(_reason: str) -> None:
        server.should_exit = True  # `server` exists: the lifespan that can fail runs inside server.run()

    app = create_app(settings, fallback=fallback, on_failure=stop, pairing=pairing,
                     fingerprint=fingerprint(tls.cert) if tls is not None else None)
    announce(settings.host, settings.port, tls, pairing.token if pairing is not None else None)
    # ws_max_size: uvicorn refuses a larger frame (close 1009) before reading it whole.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            ws_max_size=settings.limits.max_frame_bytes, **uvicorn_tls(tls))
    hide_tokens_in_access_log()  # after uvicorn.Config, which sets up uvicorn's loggers
    server = uvicorn.Server(config)
    server.run()
    now = app.state.loading.state
    if now.phase == "failed":
        print(f"voice-assistant: {now.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
