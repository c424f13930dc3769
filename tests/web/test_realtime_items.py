"""The Realtime endpoint's items and responses (app/web/realtime/items.py, history.py, replies.py) as agent
frameworks use them, driven by the `openai` SDK against the live server on the cpu preset: items of every
role shape what the model reads; responses without new input, with their own settings, in text, out of band;
function calls; usage and metadata; bad requests answered in words while the session goes on."""

from __future__ import annotations

import base64
import json
import math

import msgspec
import pytest

from app.engines.llm import DEFAULT_SYSTEM_PROMPT
from app.web.realtime.errors import MESSAGES
from app.web.realtime.history import Entry, History
from app.web.realtime.protocol import RATE
from tests.support import said_so_far, speak, word_error_rate
from tests.web.test_realtime import GreedyLlm, ask, chunks, connect, of, pcm24, receive, reply_audio, text_item, until
from tests.web.test_ws import QUESTION, SpyVoice, own_engines, served

WEATHER = {
    "type": "function", "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]},
}


def message(role: str, text: str, item_id: str | None = None) -> dict:
    kind = {"user": "input_text", "system": "input_text", "assistant": "output_text"}[role]
    item = {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}
    return item | ({"id": item_id} if item_id else {})


def test_items_of_every_role_edited_by_the_client_are_what_the_model_reads(cpu_settings, engines):
    """Created with and without previous_item_id, read back, deleted: the next reply's messages follow."""
    llm = GreedyLlm(engines.llm)
    with served(own_engines(engines, llm=llm), cpu_settings) as url, connect(url) as conn:
        conn.conversation.item.create(item=message("user", "My name is Ada.", "item_ada"))
        conn.conversation.item.create(item=message("assistant", "Nice to meet you, Ada.", "item_hi"))
        conn.conversation.item.create(item=message("user", "I live in Paris.", "item_paris"))
        conn.conversation.item.create(item=message("system", "Answer in one word.", "item_rule"),
                                      previous_item_id="item_hi")
        conn.conversation.item.create(item={"type": "function_call", "id": "item_call", "call_id": "call_1",
                                            "name": "get_weather", "arguments": '{"city": "Paris"}'})
        conn.conversation.item.create(item={"type": "function_call_output", "call_id": "call_1",
                                            "output": '{"temperature": 21}'})
        conn.conversation.item.create(item=message("user", "Forget this.", "item_gone"), previous_item_id="root")
        added = until(conn, "conversation.item.done", 7)
        conn.conversation.item.retrieve(item_id="item_call")
        (retrieved,) = of(until(conn, "conversation.item.retrieved"), "conversation.item.retrieved")
        conn.conversation.item.delete(item_id="item_gone")
        (deleted,) = of(until(conn, "conversation.item.deleted"), "conversation.item.deleted")
        conn.response.create()
        events = until(conn, "response.done")
    previous = {e["item"]["id"]: e["previous_item_id"] for e in of(added, "conversation.item.added")}
    assert previous["item_rule"] == "item_hi" and previous["item_gone"] is None and previous["item_paris"] == "item_hi"
    assert retrieved["item"] | {"status": "completed"} == {
        "id": "item_call", "type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": '{"city": "Paris"}', "status": "completed", "object": "realtime.item"}
    assert deleted["item_id"] == "item_gone"
    assert of(events, "response.done")[0]["response"]["status"] == "completed"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert said_so_far(llm.turns[0]) == [
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "I live in Paris."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]


def test_a_response_without_new_input_greets_with_its_own_instructions_and_metadata(cpu_settings, engines):
    llm, voice = GreedyLlm(engines.llm), SpyVoice(engines.tts)
    with served(own_engines(engines, llm=llm, tts=voice), cpu_settings) as url, connect(url) as conn:
        conn.response.create(response={"instructions": "Greet the user warmly.", "metadata": {"topic": "hello"}})
        events = until(conn, "response.done")
        after = ask(conn, QUESTION)  # the greeting is in the conversation, under the session's own prompt
    (created,), (done,) = of(events, "response.created"), of(events, "response.done")
    assert not of(events, "error")
    assert created["response"]["metadata"] == done["response"]["metadata"] == {"topic": "hello"}
    assert done["response"]["status"] == "completed" and reply_audio(events, done["response"]["id"]).size
    greeting = done["response"]["output"][0]["content"][0]["transcript"]
    assert greeting and llm.turns[0][0] == {"role": "system", "content": "Greet the user warmly."}
    assert said_so_far(llm.turns[0]) == []  # nothing but the instructions (and the preset's example)
    assert llm.turns[1][0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert said_so_far(llm.turns[1]) == [{"role": "assistant", "content": greeting},
                                         {"role": "user", "content": QUESTION}]
    assert of(after, "response.done")[0]["response"]["metadata"] is None


def test_usage_counts_the_models_tokens_and_the_voice_as_openai_does(cpu_settings, engines):
    llm = GreedyLlm(engines.llm)
    with served(own_engines(engines, llm=llm), cpu_settings) as url, connect(url) as conn:
        events = ask(conn, QUESTION)
    done = of(events, "response.done")[0]["response"]
    usage, said = done["usage"], done["output"][0]["content"][0]["transcript"]
    prompt = llm.prompt(llm.turns[0])
    assert usage["input_token_details"]["text_tokens"] == len(prompt.tokens)
    assert usage["output_token_details"]["text_tokens"] == engines.llm.count_tokens(said)
    seconds = len(reply_audio(events, done["id"])) / RATE
    assert usage["output_token_details"]["audio_tokens"] == math.ceil(seconds * 20)  # one per 50 ms
    assert usage["input_token_details"]["audio_tokens"] == 0  # typed
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_a_text_response_streams_text_and_does_no_voice_work(cpu_settings, engines):
    llm, voice = GreedyLlm(engines.llm, max_tokens=64), SpyVoice(engines.tts)
    with served(own_engines(engines, llm=llm, tts=voice), cpu_settings) as url, connect(url) as conn:
        conn.conversation.item.create(item=text_item(QUESTION))
        conn.response.create(response={"output_modalities": ["text"], "max_output_tokens": 8})
        events = until(conn, "response.done")
    done = of(events, "response.done")[0]["response"]
    deltas = "".join(e["delta"] for e in of(events, "response.output_text.delta"))
    (text_done,) = of(events, "response.output_text.done")
    assert deltas and text_done["text"] == deltas and done["output_modalities"] == ["text"]
    assert done["output"][0]["content"] == [{"type": "output_text", "text": deltas.strip()}]
    assert not of(events, "response.output_audio.delta") and not voice.spoken and voice.started == 0
    assert done["usage"]["output_token_details"] == {"text_tokens": done["usage"]["output_tokens"],
                                                     "audio_tokens": 0}
    assert 1 <= done["usage"]["output_tokens"] <= 8 + 1  # the cap, give or take the detokenizer's joins


def test_an_out_of_band_response_reads_what_it_is_given_and_leaves_the_conversation_alone(cpu_settings, engines):
    llm = GreedyLlm(engines.llm)
    with served(own_engines(engines, llm=llm), cpu_settings) as url, connect(url) as conn:
        conn.conversation.item.create(item=message("user", "My name is Ada.", "item_ada"))
        until(conn, "conversation.item.done")
        conn.response.create(response={
            "conversation": "none", "output_modalities": ["text"], "metadata": {"job": "title"},
            "input": [{"type": "item_reference", "id": "item_ada"}, message("user", "Give this chat a title.")]})
        side = until(conn, "response.done")
        conn.response.create()
        main = until(conn, "response.done")
    done = of(side, "response.done")[0]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"job": "title"}
    assert not of(side, "conversation.item.added") and done["output"]  # announced in the response only
    assert said_so_far(llm.turns[0]) == [{"role": "user", "content": "My name is Ada."},
                                         {"role": "user", "content": "Give this chat a title."}]
    assert said_so_far(llm.turns[1]) == [{"role": "user", "content": "My name is Ada."}]  # no title in it
    assert of(main, "response.done")[0]["response"]["conversation_id"].startswith("conv_")


def test_a_required_tool_is_called_with_valid_arguments_and_its_output_is_answered(cpu_settings, engines):
    """The cpu preset's small model, forced by the grammar: one well-formed call; then the client's output."""
    llm = GreedyLlm(engines.llm)
    with served(own_engines(engines, llm=llm), cpu_settings) as url, connect(url) as conn:
        conn.session.update(session={"type": "realtime", "tools": [WEATHER], "tool_choice": "required"})
        assert receive(conn)["session"]["tools"][0]["name"] == "get_weather"
        conn.conversation.item.create(item=text_item("What is the weather in Paris?"))
        conn.response.create()
        called = until(conn, "response.done")
        done = of(called, "response.done")[0]["response"]
        (call,) = done["output"]
        conn.conversation.item.create(item={"type": "function_call_output", "call_id": call["call_id"],
                                            "output": '{"temperature_celsius": 21, "sky": "sunny"}'})
        conn.response.create(response={"tool_choice": "none"})
        answered = until(conn, "response.done")
    assert call["type"] == "function_call" and call["name"] == "get_weather" and done["status"] == "completed"
    arguments = json.loads(call["arguments"])
    assert isinstance(arguments["city"], str) and set(arguments) <= {"city", "unit"}
    assert arguments.get("unit", "celsius") in ("celsius", "fahrenheit")
    deltas = "".join(e["delta"] for e in of(called, "response.function_call_arguments.delta"))
    (args_done,) = of(called, "response.function_call_arguments.done")
    assert deltas == args_done["arguments"] == call["arguments"] and args_done["call_id"] == call["call_id"]
    assert not of(called, "response.output_audio.delta")  # a call is not spoken
    reply = of(answered, "response.done")[0]["response"]
    assert reply["status"] == "completed" and reply_audio(answered, reply["id"]).size
    assert llm.turns[1][-2:] == [
        {"role": "assistant", "content": "", "tool_calls": [{"id": call["call_id"], "type": "function", "function": {
            "name": "get_weather", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["call_id"], "content": '{"temperature_celsius": 21, "sky": "sunny"}'}]


@pytest.mark.parametrize("event, code", [
    ({"type": "conversation.item.retrieve", "item_id": "item_nope"}, "item_not_found"),
    ({"type": "conversation.item.delete", "item_id": "item_nope"}, "item_not_found"),
    ({"type": "conversation.item.create", "item": message("user", "Hi"), "previous_item_id": "item_nope"},
     "item_not_found"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "1"}}, "invalid_event"),
    ({"type": "response.create", "response": {"tool_choice": "required"}}, "invalid_value"),
    ({"type": "response.create", "response": {"max_output_tokens": 0}}, "invalid_value"),
    ({"type": "response.create", "response": {"output_modalities": ["video"]}}, "unsupported"),
    ({"type": "session.update", "session": {"type": "realtime", "tools": [WEATHER | {"name": "get weather!"}]}},
     "invalid_value"),
    ({"type": "session.update", "session": {"type": "realtime", "tools": [WEATHER],
                                            "tool_choice": {"type": "function", "name": "nope"}}}, "invalid_value"),
])
def test_a_request_that_cannot_be_honoured_gets_an_error_and_the_session_goes_on(live_server, event, code):
    with connect(live_server) as conn:
        conn.send(event)
        (error,) = of(until(conn, "error"), "error")
        after = ask(conn, "Hello?")
    assert error["error"]["code"] == code and error["error"]["message"]
    assert of(after, "response.done")[0]["response"]["status"] == "completed"


# ---------------------------------------------------------------- bounds


def answers(conn, count: int) -> list[dict]:
    """Events until `count` item creations have each been added or refused."""
    events: list[dict] = []
    while len(of(events, "conversation.item.added")) + len(of(events, "error")) < count:
        events.append(receive(conn))
    return events


@pytest.mark.parametrize("text, code", [("Hi.", "too_many_items"), ("x" * 1500, "too_long")])
def test_a_flood_of_items_is_bounded_in_words_and_the_session_goes_on(live_server, cpu_settings, text, code):
    """The issue's 2,000 items sent without a response.create: only what limits.max_pending_items and
    .max_pending_chars allow is kept, the rest refused; a response then answers, and new items are taken again."""
    limits = cpu_settings.limits
    kept = min(limits.max_pending_items, limits.max_pending_chars // len(text))
    events: list[dict] = []
    with connect(live_server) as conn:
        for batch in range(0, 2000, 100):  # in batches: neither side's socket buffer fills while the other waits
            for i in range(batch, batch + 100):
                conn.conversation.item.create(item=message("user", text, f"item_{i}"))
            events += answers(conn, 100)
        conn.conversation.item.retrieve(item_id=f"item_{kept - 1}")
        conn.conversation.item.retrieve(item_id=f"item_{kept}")
        read = until(conn, "error")
        conn.response.create()
        answered = until(conn, "response.done")
        after = ask(conn, "Hello?")
    assert [e["item"]["id"] for e in of(events, "conversation.item.added")] == [f"item_{i}" for i in range(kept)]
    errors = [e["error"] for e in of(events, "error")]
    assert len(errors) == 2000 - kept and {e["code"] for e in errors} == {code}
    assert errors[0]["message"] == MESSAGES[code] and errors[0]["type"] == "invalid_request_error"
    assert of(read, "conversation.item.retrieved")[0]["item"]["id"] == f"item_{kept - 1}"
    assert of(read, "error")[0]["error"]["code"] == "item_not_found"  # a refused item was never added
    assert of(answered, "response.done")[0]["response"]["status"] == "completed"
    assert not of(after, "error") and of(after, "response.done")[0]["response"]["status"] == "completed"


def audio_item(audio) -> dict:
    data = base64.b64encode(pcm24(audio)).decode()
    return {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": data}]}


def test_audio_waiting_for_a_response_is_at_most_one_turn_and_a_refused_commit_keeps_its_buffer(cpu_settings, engines):
    """turns.max_turn_s is 1.5 questions long: a second spoken question as an item, or committed, would make the
    response's turn longer, and is refused; the first is answered, then the kept buffer can be committed."""
    question = speak(engines.tts, QUESTION, RATE)
    turns = msgspec.structs.replace(cpu_settings.turns, max_turn_s=round(1.5 * len(question) / RATE, 2))
    with served(own_engines(engines), msgspec.structs.replace(cpu_settings, turns=turns)) as url, \
            connect(url) as conn:
        conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        receive(conn)
        conn.conversation.item.create(item=audio_item(question))
        conn.conversation.item.create(item=audio_item(question))
        created = until(conn, "error")
        for piece in chunks(pcm24(question), ms=1000):
            conn.input_audio_buffer.append(audio=piece)
        conn.input_audio_buffer.commit()
        (refused,) = of(until(conn, "error"), "error")
        conn.response.create()
        first = until(conn, "response.done")
        conn.input_audio_buffer.commit()  # the buffer was kept: it is a turn of its own now
        committed = until(conn, "conversation.item.added")
        conn.response.create()
        second = until(conn, "response.done")
    (added,), (too_long,) = of(created, "conversation.item.added"), of(created, "error")
    assert too_long["error"]["code"] == refused["error"]["code"] == "too_long"
    assert too_long["error"]["message"] == MESSAGES["too_long"]
    item_id = of(committed, "input_audio_buffer.committed")[0]["item_id"]
    for events, heard_id in ((first, added["item"]["id"]), (second, item_id)):
        (heard,) = of(events, "conversation.item.input_audio_transcription.completed")
        assert heard["item_id"] == heard_id and word_error_rate(heard["transcript"], QUESTION) <= 0.2
        assert of(events, "response.done")[0]["response"]["status"] == "completed"


def test_the_history_keeps_at_most_max_items_and_an_item_put_first_stays():
    history = History(max_items=3)
    for name in "abcd":
        history.add(Entry(name, text=name))
    assert [e.id for e in history.entries] == ["b", "c", "d"]  # the oldest went
    history.add(Entry("first", text="x"), "root")
    assert [e.id for e in history.entries] == ["first", "c", "d"]  # the oldest after it, not itself
