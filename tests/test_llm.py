"""The real SmolLM2-135M GGUF through llama-cpp-python."""

import threading

import pytest

from app.llm import LlmSettings


def test_reply_streams_in_pieces(engines):
    messages = engines.llm.build_messages([], "What is the capital of France?")
    pieces = list(engines.llm.stream_reply(messages, temperature=0.0))
    assert len(pieces) >= 3  # streamed token by token, not returned whole
    assert "paris" in "".join(pieces).lower()


def test_cancel_stops_generation_early(engines):
    messages = engines.llm.build_messages([], "Tell me a long story about a dragon.")
    cancel = threading.Event()
    pieces = []
    for piece in engines.llm.stream_reply(messages, cancel=cancel):
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
    assert len(pieces) == 3


def test_messages_hold_system_history_and_user(engines):
    history = [{"role": "user", "content": "My name is Ada."},
               {"role": "assistant", "content": "Nice to meet you, Ada."}]
    messages = engines.llm.build_messages(history, "What is my name?", "Be brief.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == "Be brief."
    assert messages[-1]["content"] == "What is my name?"


def test_old_turns_are_dropped_to_fit_the_context(engines):
    long_turn = "word " * 400
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"{i} {long_turn}"},
                    {"role": "assistant", "content": f"answer {i}"}]
    messages = engines.llm.build_messages(history, "latest?")
    kept = [m["content"] for m in messages if m["role"] == "assistant"]
    assert 0 < len(kept) < 6
    assert kept[-1] == "answer 5"  # the newest exchange survives, the oldest go first


def test_settings_validation():
    with pytest.raises(ValueError):
        LlmSettings(temperature=3)
