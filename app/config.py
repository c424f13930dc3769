"""Settings: the msgspec Structs each component owns, composed into one; two named presets; overrides from
the environment and flags. Only the top (cli, startup) and the web edge read Settings whole: the core and
the engines each take their own part."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

import msgspec

from app.core.chunking import ChunkSettings
from app.core.limits import LimitSettings
from app.core.turns import TurnSettings
from app.engines.asr import AsrSettings
from app.engines.llm import LlmSettings
from app.engines.tts.settings import TtsSettings
from app.web.access import AccessSettings
from app.web.wyoming.settings import WyomingSettings

log = logging.getLogger(__name__)

Preset = Literal["cpu", "gpu"]
ENV_PREFIX = "VA_"


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says what is expected."""


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    preset: Preset = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    asr: AsrSettings = AsrSettings()
    llm: LlmSettings = LlmSettings()
    tts: TtsSettings = TtsSettings()
    turns: TurnSettings = TurnSettings()
    chunking: ChunkSettings = ChunkSettings()
    limits: LimitSettings = LimitSettings()
    access: AccessSettings = AccessSettings()  # Host names and page origins to trust (access.py)
    wyoming: WyomingSettings = WyomingSettings()  # Home Assistant's protocol on a port of its own (off: port 0)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be between 1 and 65535")

    def models(self) -> dict[str, str]:
        """The model reference of each slot, as /health, the page and the Realtime session name them."""
        tts = {"csm": self.tts.csm.model, "openai": self.tts.openai.voice}.get(self.tts.engine, self.tts.piper.model)
        return {"asr": self.asr.model, "llm": self.llm.model, "tts": tts}


def preset_values(preset: Preset) -> dict[str, Any]:
    """The model choices of each preset, as overrides of the defaults (which are the cpu preset)."""
    if preset == "cpu":
        return {"preset": "cpu"}
    return {
        "preset": "gpu",
        "asr": {
            "model": "hf:mobiuslabsgmbh/faster-whisper-large-v3-turbo",
            "device": "cuda",
            "compute_type": "float16",
            # The fitted window is measured on tiny.en only; a GPU encodes the whole window in ~20 ms.
            "fit_window_s": 0.0,
        },
        "llm": {
            "model": "hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf",
            "n_gpu_layers": -1,
            "temperature": 0.7,
            "repeat_penalty": 1.1,
            "example": (),  # Llama-3.2-1B keeps to English without one
        },
        "tts": {"engine": "csm"},
        # The end rule reads the words through the cpu preset's SmolLM2-135M, calibrated on tests/data/turns;
        # Llama-3.2-1B's end-of-message probabilities lie on a scale of their own, not measured here.
        "turns": {"decide_by": "sound"},
    }


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def choose_preset(requested: str) -> Preset:
    """'auto' means gpu when a CUDA GPU is present and the hub may be used, else cpu."""
    if requested in ("cpu", "gpu"):
        return requested  # type: ignore[return-value]
    if requested != "auto":
        raise ConfigError(f"preset must be auto, cpu or gpu, not '{requested}'")
    if not cuda_available():
        log.info("no CUDA GPU found: using the cpu preset (offline models from PyPI packages)")
        return "cpu"
    return "gpu"


def env_overrides(environ: dict[str, str] | os._Environ) -> dict[str, Any]:
    """VA_PORT=9000 -> {"port": "9000"}; VA_LLM__TEMPERATURE=0.3 -> {"llm": {"temperature": "0.3"}}."""
    values: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "PRESET":
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return values


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(preset: str = "auto", overrides: dict[str, Any] | None = None,
                  environ: dict[str, str] | None = None) -> Settings:
    """Preset, then VA_* environment variables, then explicit overrides (command-line flags)."""
    environ = os.environ if environ is None else environ
    chosen = choose_preset(environ.get(ENV_PREFIX + "PRESET", preset) if preset == "auto" else preset)
    values = merge(preset_values(chosen), env_overrides(environ))
    values = merge(values, overrides or {})
    try:
        # strict=False lets strings from the environment stand for numbers and booleans.
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc
