"""config.json's RoPE, norm and head-width fields: read in both layouts, refused when CsmModel lacks them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.engines.tts.csm import loader
from app.engines.tts.csm.config_json import UnsupportedConfigError
from app.engines.tts.csm.model import CsmModel, CsmModelConfig

from .conftest import tiny_model

# sesame/csm-1b's config.json (transformers' layout), the fields that matter here.
BACKBONE_ROPE = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 1024,
                 "low_freq_factor": 0.125, "high_freq_factor": 0.5}
DECODER_ROPE = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 16,
                "low_freq_factor": 0.001953125, "high_freq_factor": 0.0078125}
SESAME_ROPE = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # torchtune's terms for the same schedule


def _published(**backbone_overrides) -> dict:
    decoder = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "rms_norm_eps": 1e-5,
               "rope_theta": 500000, "rope_scaling": dict(DECODER_ROPE)}
    hints = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
             "rope_theta": 500000, "rope_scaling": dict(BACKBONE_ROPE), "max_position_embeddings": 2048,
             "depth_decoder_config": decoder}
    return {**hints, **backbone_overrides}


def _with_decoder(hints: dict, **decoder_overrides) -> dict:
    return {**hints, "depth_decoder_config": {**hints["depth_decoder_config"], **decoder_overrides}}


@pytest.fixture(scope="module")
def full_state() -> dict[str, torch.Tensor]:
    with torch.device("meta"):  # shapes only: the sizes are read off them
        return CsmModel(CsmModelConfig.full()).state_dict()


def test_the_published_transformers_config_is_csm_1b(full_state) -> None:
    assert loader.infer_config(full_state, _published()) == CsmModelConfig.full()


def test_both_spellings_of_sesames_rope_schedule_read_as_factor_32(full_state) -> None:
    sesame = _with_decoder(_published(rope_scaling=dict(SESAME_ROPE)), rope_scaling=dict(SESAME_ROPE))
    assert loader.infer_config(full_state, sesame).rope_scale_factor == 32.0
    llama31 = {**SESAME_ROPE, "factor": 8.0}  # the same wavelengths, another factor: computable
    config = loader.infer_config(full_state, _with_decoder(_published(rope_scaling=llama31), rope_scaling=llama31))
    assert config.rope_scale_factor == 8.0


def test_plain_rope_reads_as_factor_1(full_state) -> None:
    hints = _with_decoder(_published(rope_scaling=None), rope_scaling={"rope_type": "default"})
    assert loader.infer_config(full_state, hints).rope_scale_factor == 1.0


def test_transformers_5_rope_parameters_and_norm_eps_are_read(full_state) -> None:
    params = {**BACKBONE_ROPE, "rope_theta": 10_000.0}
    hints = _published(rms_norm_eps=1e-6, rope_parameters=params)
    del hints["rope_scaling"], hints["rope_theta"]
    hints = _with_decoder(hints, rms_norm_eps=1e-6, rope_parameters={**DECODER_ROPE, "rope_theta": 10_000.0})
    config = loader.infer_config(full_state, hints)
    assert (config.rope_base, config.rope_scale_factor, config.norm_eps) == (10_000.0, 32.0, 1e-6)


def test_a_one_level_config_speaks_for_both_stacks(full_state) -> None:
    sesame_style = {"backbone_flavor": "llama-1B", "decoder_flavor": "llama-100M", "rms_norm_eps": 1e-6,
                    "rope_scaling": dict(SESAME_ROPE), "head_dim": 64}
    config = loader.infer_config(full_state, sesame_style)
    assert (config.norm_eps, config.rope_scale_factor, config.decoder.head_dim) == (1e-6, 32.0, 128)


@pytest.mark.parametrize(
    ("hints", "expected"),
    [
        (_published(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
         "backbone `rope_scaling.rope_type` = 'yarn' is not supported; supported: 'llama3'"),
        (_published(rope_scaling={**SESAME_ROPE, "original_max_position_embeddings": 4096}),
         ("'original_max_position_embeddings': 4096, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0} is not"
          " supported; supported: llama3 blending between wavelengths 8192 and 2048")),
        (_with_decoder(_published(), rope_scaling={"rope_type": "llama3", "factor": 32.0}),
         "decoder `rope_scaling` = {'rope_type': 'llama3', 'factor': 32.0} is not supported"),
        (_with_decoder(_published(), rope_scaling=None),
         ("backbone and decoder `rope_scaling factor` = {'backbone': 32.0, 'decoder': 1.0} is not supported; "
          "supported: the same value for both stacks")),
        (_with_decoder(_published(), rope_theta=10_000), "`rope_theta` = {'backbone': 500000.0, 'decoder': 10000.0}"),
        (_published(rms_norm_eps=0), "backbone `rms_norm_eps` = 0 is not supported; supported: a number between"),
        (_published(head_dim=128),
         "backbone `head_dim` = 128 is not supported; supported: embed_dim / num_heads = 2048 / 32 = 64"),
        (_with_decoder(_published(), head_dim=64), "decoder `head_dim` = 64 is not supported"),
    ],
    ids=["rope-type", "rope-wavelengths", "rope-incomplete", "rope-stacks-differ", "theta-stacks-differ",
         "norm-eps", "backbone-head-dim", "decoder-head-dim"],
)
def test_arithmetic_the_network_lacks_is_refused_by_name(full_state, hints: dict, expected: str) -> None:
    with pytest.raises(UnsupportedConfigError) as error:
        loader.infer_config(full_state, hints)
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)


def test_loading_refuses_before_building_the_model(tmp_path: Path) -> None:
    model = tiny_model()
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    shape = model.config.backbone
    hints = {"num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
             "max_position_embeddings": model.config.max_seq_len,
             "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
             "depth_decoder_config": {"num_attention_heads": 4, "num_key_value_heads": 2}}
    with pytest.raises(UnsupportedConfigError, match="`rope_scaling.rope_type` = 'dynamic'"):
        loader.load_csm_model([path], hints=hints)
    del hints["rope_scaling"]  # the same files without the unsupported field load
    assert loader.load_csm_model([path], hints=hints).config == model.config
