"""Replies that answer instead of echoing (app/engines/no_copy.py), on the real SmolLM2-135M, greedy."""

import msgspec
import pytest

from app.engines.llm import ChatModel, LlmSettings
from app.engines.llm_remote import RemoteChatModel
from app.engines.no_copy import longest_shared_run, run_ends, words
from app.engines.tools import CALL_OPEN

# Statements the cpu preset echoed before (issue 31), the first two word for word.
STATEMENTS = [
    "The child almost hurt the small dog.",
    "Sunday is the best part of the week.",
    "At that high level the air is pure.",
    "A thin stripe runs down the middle.",
    "Mend the coat before you go out.",
]


def _reply(llm: ChatModel, text: str) -> str:
    return "".join(llm.stream_reply(llm.build_messages([], text), temperature=0.0))


def _without_block(llm: ChatModel) -> ChatModel:
    """The same weights and prompt, with the block off (a second object on the same llama.cpp context)."""
    return ChatModel(msgspec.structs.replace(llm.settings, no_copy_words=0), llm._llama, llm._judge)


def test_word_runs_are_counted_in_words_whatever_the_case_and_punctuation():
    assert words("At high level, the air's PURE.") == ["at", "high", "level", "the", "air's", "pure"]
    assert longest_shared_run("At high level, the air is pure.", "At that high level the air is pure.") == 6
    assert longest_shared_run("Paris.", "What is the capital of France?") == 0
    assert run_ends(["so", "the", "small"], ["the", "child", "hurt", "the", "small", "dog"], 2) == [4]
    assert run_ends(["the", "small"], ["the", "small"], 3) == []


def test_only_the_word_that_would_make_the_run_too_long_is_blocked(engines):
    llm = engines.llm
    block = llm.prompt(llm.build_messages([], "The child almost hurt the small dog.")).copy_block
    assert block is not None and block.limit == llm.settings.no_copy_words == 4
    hurt = {llm._llama.tokenize(text.encode(), add_bos=False)[0] for text in (" hurt", " Hurt", "hurt")}
    assert hurt <= set(block.blocked("The child almost"))  # the 4th word in a row is blocked, as spelled or not
    assert block.blocked("The child") == []  # three in a row stay possible
    assert block.blocked("The dog almost") == []  # a run of the user's words, not any of them
    assert hurt <= set(block.blocked("Oh. the CHILD, almost"))  # case and punctuation do not hide a run
    assert block.blocked(f"The child almost {CALL_OPEN}") == []  # a call's arguments may quote the user


def test_a_statements_reply_shares_no_four_word_run_with_it(engines):
    llm, echoed = engines.llm, []
    for statement in STATEMENTS:
        reply = _reply(llm, statement)
        assert reply.strip() and longest_shared_run(reply, statement) < 4, (statement, reply)
        echoed.append(longest_shared_run(_reply(_without_block(llm), statement), statement))
    # The block is what keeps them apart: without it, the same prompt echoes some of them.
    assert max(echoed) >= 4, echoed


@pytest.mark.parametrize(("question", "answer"), [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Germany?", "berlin"),
    ("What day comes after Monday?", "tuesday"),
])
def test_a_known_question_still_gets_its_answer(engines, question, answer):
    assert answer in words(_reply(engines.llm, question))


def test_no_block_after_a_tools_result_or_when_off(engines):
    llm = engines.llm
    after_tool = [{"role": "user", "content": "Weather?"}, {"role": "tool", "tool_call_id": "c", "content": "sun"}]
    assert llm.prompt(after_tool).copy_block is None
    assert _without_block(llm).prompt(llm.build_messages([], "Hi there.")).copy_block is None


def test_a_server_is_asked_in_words_and_the_local_system_prompt_stays():
    settings = LlmSettings(backend="openai", base_url="http://127.0.0.1:9/v1")
    system = RemoteChatModel(settings).build_messages([], "Hi.")[0]["content"]
    assert system == f"{settings.system_prompt} {settings.no_copy_prompt}"
    off = RemoteChatModel(msgspec.structs.replace(settings, no_copy_words=0))
    assert off.build_messages([], "Hi.")[0]["content"] == settings.system_prompt


def test_no_copy_words_is_off_or_at_least_two():
    assert LlmSettings(no_copy_words=0).no_copy_words == 0
    for wrong in (1, -1):
        with pytest.raises(ValueError, match="no_copy_words"):
            LlmSettings(no_copy_words=wrong)
    with pytest.raises(ValueError, match="pairs"):
        LlmSettings(example=("a question without its answer",))
