"""Settings: presets, environment overrides, validation errors that name the setting."""

import pytest

from app.config import ConfigError, choose_preset, env_overrides, load_settings


def test_cpu_preset_uses_only_packaged_models():
    s = load_settings("cpu", environ={})
    assert s.preset == "cpu"
    assert all(ref.startswith("pkg:") for ref in (s.asr.model, s.llm.model, s.tts.piper.model))


def test_gpu_preset_puts_models_on_cuda():
    s = load_settings("gpu", environ={})
    assert s.asr.device == "cuda" and s.asr.compute_type == "float16"
    assert s.llm.n_gpu_layers == -1 and "Q4_K_M" in s.llm.model
    assert s.tts.engine == "csm" and s.tts.csm.model == "senstella/csm-expressiva-1b"


def test_environment_then_flags_override_the_preset():
    env = {"VA_PORT": "9001", "VA_LLM__TEMPERATURE": "0.2", "VA_TURNS__END_SILENCE_MS": "800"}
    s = load_settings("cpu", {"port": 9002}, environ=env)
    assert s.port == 9002  # the flag wins over the environment
    assert s.llm.temperature == 0.2 and s.turns.end_silence_ms == 800


def test_env_names_map_to_nested_settings():
    assert env_overrides({"VA_ASR__MODEL": "x", "HOME": "/root", "VA_PRESET": "cpu"}) == {
        "asr": {"model": "x"}
    }


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VA_LLM__TEMPERATURE": "hot"}, "llm.temperature"),
        ({"VA_LLM__TEMPERATURE": "7"}, "temperature must be between 0 and 2"),
        ({"VA_PORT": "70000"}, "port"),
        ({"VA_NO_SUCH_THING": "1"}, "no_such_thing"),
        ({"VA_LLM__BACKEND": "vllm"}, "llm.backend"),
        ({"VA_LLM__BACKEND": "openai"}, "base_url must be the server's http:// or https:// address"),
    ],
)
def test_bad_settings_are_refused_with_their_name(env, named):
    with pytest.raises(ConfigError, match=named):
        load_settings("cpu", environ=env)


def test_a_language_model_server_is_set_from_the_environment():
    env = {"VA_LLM__BACKEND": "openai", "VA_LLM__BASE_URL": "http://10.0.0.5:8000/v1",
           "VA_LLM__MODEL": "meta-llama/Llama-3.2-1B-Instruct", "VA_LLM__API_KEY": "sk-local-secret"}
    s = load_settings("gpu", environ=env)
    assert (s.llm.backend, s.llm.base_url, s.llm.model) == ("openai", env["VA_LLM__BASE_URL"], env["VA_LLM__MODEL"])
    assert s.llm.api_key == "sk-local-secret" and "sk-local-secret" not in repr(s)  # never in a log line
    assert load_settings("cpu", environ={}).llm.backend == "llama_cpp"


def test_auto_preset_without_a_gpu_is_cpu(monkeypatch):
    monkeypatch.setattr("app.config.cuda_available", lambda: False)
    assert choose_preset("auto") == "cpu"
    with pytest.raises(ConfigError):
        choose_preset("tpu")
