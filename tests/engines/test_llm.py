"""The real SmolLM2-135M GGUF through llama-cpp-python."""

import os
import threading

import pytest

from app.core.end_rule import EndRule
from app.engines.llm import LlmSettings
from tests.support import words


def test_reply_streams_in_pieces(engines):
    messages = engines.llm.build_messages([], "What is the capital of France?")
    pieces = list(engines.llm.stream_reply(messages, temperature=0.0))
    assert len(pieces) >= 2  # streamed token by token ("Paris" "."), not returned whole
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
    example = engines.llm.settings.example
    assert [m["role"] for m in messages] == ["system", *["user", "assistant"] * (len(example) // 2 + 1), "user"]
    assert messages[0]["content"] == "Be brief."
    assert len(example) >= 2 and tuple(m["content"] for m in messages[1 : 1 + len(example)]) == example
    assert [m["role"] for m in messages[1 : 1 + len(example)]] == ["user", "assistant"] * (len(example) // 2)
    assert messages[1 + len(example) : 3 + len(example)] == history  # the examples come before the history
    assert messages[-1]["content"] == "What is my name?"


FRENCH = {"le", "la", "les", "un", "une", "est", "de", "du", "des"}


def test_the_example_exchange_keeps_the_small_model_in_english(engines):
    # Without it, greedy SmolLM2-135M answered the first question "Le Grand Paris is the capital of
    # France." and the rest in French too.
    llm, history = engines.llm, []
    for question in ["What is the capital of France?", "How many legs does a spider have?", "Why is the sky blue?"]:
        reply = "".join(llm.stream_reply(llm.build_messages(history, question), temperature=0.0))
        assert reply.strip() and not FRENCH & set(words(reply)), reply
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def test_old_turns_are_dropped_to_fit_the_context(engines):
    long_turn = "word " * 400
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"{i} {long_turn}"},
                    {"role": "assistant", "content": f"answer {i}"}]
    messages = engines.llm.build_messages(history, "latest?")
    after_examples = messages[1 + len(engines.llm.settings.example) :]
    kept = [m["content"] for m in after_examples if m["role"] == "assistant"]
    assert 0 < len(kept) < 6
    assert kept[-1] == "answer 5"  # the newest exchange survives, the oldest go first
    assert len(history) == 2 * len(kept)  # the session's history itself was trimmed
    n_ctx = engines.llm.settings.n_ctx
    assert len(engines.llm._llama.tokenize(str(messages).encode())) < n_ctx


def test_history_is_cut_to_half_so_the_prompt_prefix_stays_stable(engines):
    limit = engines.llm.settings.history_turns
    history = []
    prefixes = []
    for i in range(3 * limit):
        engines.llm.build_messages(history, f"question {i}")
        prefixes.append(history[0]["content"] if history else None)
        history += [{"role": "user", "content": f"question {i}"},
                    {"role": "assistant", "content": f"answer {i}"}]
        assert len(history) <= 2 * limit + 2
    # The oldest kept message changes only when a cut happens, not on every turn.
    changes = sum(1 for a, b in zip(prefixes, prefixes[1:], strict=False) if a != b)
    assert changes <= 3 * limit // (limit // 2) + 1


def test_settings_validation():
    with pytest.raises(ValueError):
        LlmSettings(temperature=3)


def test_a_reply_continues_across_slices(engines):
    llm = engines.llm
    prompt = llm.prompt(llm.build_messages([], "What is the capital of France?"))
    text, slices, finished = "", 0, False
    while not finished and slices < 20:
        got = list(llm.stream_slice(prompt, text, max_new=1, temperature=0.0))  # the answer is "Paris."
        assert len(got) == 1
        text += "".join(piece for piece, _ in got)
        finished = got[-1][1]
        slices += 1
    assert slices >= 2 and finished  # several jobs, and the model ended the reply itself
    assert "paris" in text.lower()


def _common_prefix(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))  # works on any sequences, not only strings


def test_warm_up_leaves_the_system_prompt_evaluated(engines):
    # So the first real turn evaluates only its own words, as every later turn does.
    chat = engines.llm
    chat.warm_up()
    turn = chat.prompt(chat.build_messages([], "What is the capital of France?")).tokens
    shareable = _common_prefix(chat.prompt(chat.build_messages([], "Hi")).tokens, turn)
    assert shareable > 20  # the system prompt
    evaluated = [int(t) for t in chat._llama._input_ids]  # what llama.cpp holds in its KV cache
    assert _common_prefix(evaluated, turn) >= shareable
    # And the words' judge, which reads them after the system prompt alone (no example, no history).
    judged = [int(t) for t in chat._judge.input_ids[: chat._judge.n_tokens]]
    assert _common_prefix(judged, turn) > chat.count_tokens(chat.settings.system_prompt)


HISTORY = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello! How can I help you today?"}]


def test_the_end_of_a_message_is_likelier_after_a_whole_question_than_a_fragment(cpu_settings, engines):
    llm = engines.llm
    whole = llm.end_of_turn_probability(llm.build_messages(list(HISTORY), "What is the capital of France?"))
    fragment = llm.end_of_turn_probability(llm.build_messages(list(HISTORY), "What is the capital of"))
    # Smart Turn unsure (0.5): the whole question ends the turn at the pause, the fragment waits longest.
    rule = EndRule(cpu_settings.turns)
    assert rule.silence_needed_ms(0.5, whole) == cpu_settings.turns.pause_ms
    assert rule.silence_needed_ms(0.5, fragment) == cpu_settings.turns.end_silence_ms
    assert 0.0 <= fragment < whole <= 1.0
    # Judged without the history: the same words score the same after any conversation.
    assert whole == pytest.approx(llm.end_of_turn_probability(llm.build_messages([], "What is the capital of France?")),
                                  rel=0.02)
    # ...and under any system prompt: the judge always reads the one it was calibrated with. (The same tokens
    # after another cached prefix are evaluated in other batches: 0.616 against 0.602 was seen, 0.06 in logit,
    # where the rule's thresholds are 3 apart. Judged under the pirate's prompt it read 0.679, 0.34 in logit.)
    pirate = llm.build_messages([], "What is the capital of France?", "You are a pirate. Answer only in rhyme.")
    assert llm.end_of_turn_probability(pirate) == pytest.approx(whole, rel=0.05)


def test_prefill_evaluates_the_prompt_up_to_the_users_words(engines):
    llm = engines.llm
    question = "What is the capital of France?"
    llm.prefill(llm.build_messages(list(HISTORY), ""))  # the turn has just started
    held = llm._llama.n_tokens
    full = llm.prompt(llm.build_messages(list(HISTORY), question)).tokens
    # Held: the head of the real prompt (system prompt and history), not the user's words.
    assert list(llm._llama.input_ids[:held]) == full[:held]
    assert llm.count_tokens(HISTORY[1]["content"]) < held < len(full) - llm.count_tokens(question)
    # Judging the words runs on a context of its own: the evaluated history stays for the reply.
    llm.end_of_turn_probability(llm.build_messages(list(HISTORY), question))
    assert llm._llama.n_tokens == held


def test_prefill_with_the_words_heard_so_far_leaves_only_the_rest_to_evaluate(engines):
    llm = engines.llm
    llm.prefill(llm.build_messages(list(HISTORY), "What is the capital"))  # an interim transcript
    full = llm.prompt(llm.build_messages(list(HISTORY), "What is the capital of France?")).tokens
    held = _common_prefix([int(t) for t in llm._llama.input_ids[: llm._llama.n_tokens]], full)
    rest = len(full) - held
    # What is left: " of France?" and the template's end of the message and start of the reply.
    assert llm.count_tokens(" of France?") <= rest <= llm.count_tokens(" of France?") + 8
