"""The `voice-assistant` command: `voice-assistant serve [--preset auto|cpu|gpu] [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, load_settings
from .models import ModelError


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
    return parser.parse_args(argv)


def flag_overrides(args: argparse.Namespace) -> dict:
    values: dict = {}
    for key in ("host", "port", "log_level"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
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
    except ConfigError as exc:
        print(f"voice-assistant: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    return serve(settings)


def serve(settings) -> int:
    import uvicorn

    from .engines import Engines
    from .server import create_app

    try:
        # Load before binding the port: a missing model is a one-line error, not a traceback wall.
        engines = Engines.load(settings)
    except (ModelError, ConfigError) as exc:
        print(f"voice-assistant: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, engines)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    engines.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
