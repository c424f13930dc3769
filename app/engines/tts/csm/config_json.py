"""What a checkpoint's config.json says about CSM's arithmetic, checked against what CsmModel computes.

The loader reads every size off the tensors; three things only config.json can say:
  - the RoPE schedule: `rope_scaling` (`rope_parameters` from transformers 5 on) and `rope_theta`;
  - the RMSNorm epsilon: `rms_norm_eps`;
  - the width of an attention head: `head_dim`.
transformers' config.json describes the backbone at its top level and the decoder in
`depth_decoder_config`; Sesame's own config.json has one level, which then speaks for the whole model
(but for `head_dim`: the decoder's heads are twice as wide, so a one-level `head_dim` is the backbone's).
A field that is absent keeps CSM-1B's value. A value CsmModel does not compute is refused with the
field, the value and what is supported: a checkpoint never loads as a different network.
"""

from __future__ import annotations

import math
from typing import Any

from app.engines.models import ModelMismatchError
from app.engines.tts.csm.model import CsmModelConfig

# torchtune's Llama-3 RoPE, the schedule Sesame trained both stacks with: frequencies whose wavelength
# is over 8192 positions are slowed by the factor, those under 2048 kept, those between blended.
# transformers writes the same schedule as (original_max_position_embeddings, low_freq_factor,
# high_freq_factor); its bounds are original / low and original / high, and the blend depends on the
# bounds alone, so e.g. (1024, 0.125, 0.5) and (16, 1/512, 1/128) are both exactly this schedule.
LLAMA3_WAVELENGTHS = (8192.0, 2048.0)


class UnsupportedConfigError(ModelMismatchError):
    """config.json asks for arithmetic that CsmModel does not do (a ValueError, one line at start-up)."""

    def __init__(self, where: str, field: str, value: object, supported: str) -> None:
        super().__init__(f"config.json: {where} `{field}` = {value!r} is not supported; supported: {supported}")


def _sections(hints: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The part of config.json that describes each stack's arithmetic."""
    decoder = hints.get("depth_decoder_config")
    return {"backbone": hints, "decoder": decoder if isinstance(decoder, dict) else hints}


def _rope_key(section: dict[str, Any]) -> str | None:
    return next((key for key in ("rope_parameters", "rope_scaling") if key in section), None)


def rope_scale_factor(section: dict[str, Any], where: str) -> float | None:
    """The factor of the section's RoPE schedule, None when it says nothing.

    Plain RoPE is factor 1.0: torchtune's schedule then leaves every frequency as it is.
    """
    key = _rope_key(section)
    if key is None:
        return None
    params = section[key] or {}  # an explicit null is transformers' plain RoPE
    if not isinstance(params, dict):
        raise UnsupportedConfigError(where, key, params, "an object with a rope_type, or null")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind != "llama3":
        raise UnsupportedConfigError(where, f"{key}.rope_type", kind, "'llama3' (CSM-1B's) or 'default' (unscaled)")
    factor, original = params.get("factor"), params.get("original_max_position_embeddings")
    low, high = params.get("low_freq_factor"), params.get("high_freq_factor")
    if not all(isinstance(v, int | float) and v > 0 for v in (factor, original, low, high)):
        raise UnsupportedConfigError(where, key, params, "llama3 with positive factor, original_max_position_"
                                     "embeddings, low_freq_factor and high_freq_factor")
    bounds = (original / low, original / high)
    if not all(math.isclose(b, w, rel_tol=1e-6) for b, w in zip(bounds, LLAMA3_WAVELENGTHS, strict=True)):
        raise UnsupportedConfigError(
            where, key, params, "llama3 blending between wavelengths 8192 and 2048, as CSM-1B was trained "
            "(original_max_position_embeddings / low_freq_factor = 8192, / high_freq_factor = 2048)"
        )
    return float(factor)


def _rope_theta(section: dict[str, Any], where: str) -> float | None:
    theta = (section.get("rope_parameters") or {}).get("rope_theta", section.get("rope_theta"))
    if theta is not None and not (isinstance(theta, int | float) and theta > 0):
        raise UnsupportedConfigError(where, "rope_theta", theta, "a positive number")
    return None if theta is None else float(theta)


def _norm_eps(section: dict[str, Any], where: str) -> float | None:
    eps = section.get("rms_norm_eps")
    if eps is not None and not (isinstance(eps, int | float) and 0 < eps < 1):
        raise UnsupportedConfigError(where, "rms_norm_eps", eps, "a number between 0 and 1")
    return None if eps is None else float(eps)


# CsmModelConfig field -> (what config.json calls it, its reader); CsmModel shares each between its stacks.
_SHARED_FIELDS = {
    "rope_base": ("rope_theta", _rope_theta),
    "rope_scale_factor": ("rope_scaling factor", rope_scale_factor),
    "norm_eps": ("rms_norm_eps", _norm_eps),
}


def arithmetic(hints: dict[str, Any] | None) -> dict[str, float]:
    """CsmModelConfig's rope_base, rope_scale_factor and norm_eps as config.json gives them.

    The two stacks must agree, an absent value counting as CSM-1B's.
    """
    defaults = CsmModelConfig()
    fields: dict[str, float] = {}
    for name, (json_name, read) in _SHARED_FIELDS.items():
        values = {}
        for stack, section in _sections(hints or {}).items():
            value = read(section, stack)
            values[stack] = getattr(defaults, name) if value is None else value
        if len(set(values.values())) > 1:
            raise UnsupportedConfigError("backbone and decoder", json_name, values, "the same value for both stacks")
        fields[name] = values["backbone"]
    return fields


def check_head_dims(hints: dict[str, Any] | None, config: CsmModelConfig) -> None:
    """Refuse a `head_dim` other than embed_dim / num_heads: torchtune's Llama builds its heads that wide."""
    hints = hints or {}
    decoder = hints.get("depth_decoder_config")
    for stack, section, shape in (
        ("backbone", hints, config.backbone),
        ("decoder", decoder if isinstance(decoder, dict) else {}, config.decoder),
    ):
        head_dim = section.get("head_dim")
        if head_dim is not None and head_dim != shape.head_dim:
            supported = f"embed_dim / num_heads = {shape.embed_dim} / {shape.num_heads} = {shape.head_dim}"
            raise UnsupportedConfigError(stack, "head_dim", head_dim, supported)
