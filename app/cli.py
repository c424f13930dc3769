"""The `voice-assistant` command: `voice-assistant serve [--preset auto|cpu|gpu] [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from typing import TYPE_CHECKING

from .config import ConfigError, Settings, load_settings
from .lan import ALL_INTERFACES, TlsFiles, announce, tls_files, uvicorn_tls
from .models import ModelError

if TYPE_CHECKING:
    from .engines import Engines

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="voice-assistant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the assistant's web server")
    serve.add_argument("--preset", default="auto", choices=["auto", "cpu", "gpu"],
                       help="model set: gpu needs CUDA; auto picks gpu when a GPU is present")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--asr-model", help="speech-to-text model reference (see README)")
    serve.add_argument("--llm-model", help="language model reference (GGUF)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning"], help="log detail")
    serve.add_argument("--lan", action="store_true",
                       help="serve phones on the local network: all interfaces, HTTPS (self-signed unless --cert)")
    serve.add_argument("--cert", type=Path, help="TLS certificate (PEM file); with --key, serve HTTPS")
    serve.add_argument("--key", type=Path, help="private key of --cert (PEM file)")
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
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.preset, flag_overrides(args))
        tls = tls_files(lan=args.lan, cert=args.cert, key=args.key)
    except ConfigError as exc:
        print(f"voice-assistant: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        # Load before binding the port: a missing model is a one-line error, not a traceback wall.
        settings, engines = load_engines(settings, fallback=args.preset == "auto")
    except (ModelError, ConfigError) as exc:
        print(f"voice-assistant: {exc}", file=sys.stderr)
        return 1
    return serve(settings, engines, tls=tls)


def load_engines(settings: Settings, *, fallback: bool) -> tuple[Settings, Engines]:
    """Load the chosen preset; when it was picked automatically and a gpu model cannot be had
    (no network on first launch), run the offline cpu preset instead of failing."""
    from .engines import Engines

    try:
        return settings, Engines.load(settings)
    except ModelError as exc:
        if not (fallback and settings.preset == "gpu"):
            raise
        log.warning("%s -- starting the offline cpu preset instead", exc)
        cpu = load_settings("cpu", {"host": settings.host, "port": settings.port})
        return cpu, Engines.load(cpu)


def serve(settings: Settings, engines: Engines, *, tls: TlsFiles | None = None) -> int:
    import uvicorn

    from .server import create_app

    app = create_app(settings, engines)
    announce(settings.host, settings.port, tls)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, **uvicorn_tls(tls))
    engines.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
