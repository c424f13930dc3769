"""Function tools on the in-process model: the real SmolLM2-135M under a grammar (tool_choice required or
named), the prompt unchanged without tools, the reader of its raw output, write_reply, and trimming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from app.core.pipeline import write_reply
from app.engines.llm import ChatModel
from app.engines.tools import CallDelta, Tool, ToolReader, ToolSet, call_grammar
from app.engines.workers import Worker

WEATHER = Tool("get_weather", "The weather now in a city.", {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
})
TIMER = Tool("set_timer", "Start a timer.", {
    "type": "object", "properties": {"minutes": {"type": "integer"}}, "required": ["minutes"],
})
BOTH = (WEATHER, TIMER)
QUESTIONS = ["What's the weather in Paris?", "Set a timer for ten minutes.", "Tell me a joke.",
             "Is it raining in Tokyo, in fahrenheit?", "Wake me in an hour."]


def schema_errors(value, schema: dict) -> list[str]:
    """What in `value` breaks `schema`, for the JSON Schema features these tests use (type, properties,
    required, enum, and no properties beyond those listed, as the grammar's converter reads it)."""
    kind = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        return [f"{value!r} not in {schema['enum']}"]
    if kind == "string" and not isinstance(value, str):
        return [f"{value!r} is not a string"]
    if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        return [f"{value!r} is not an integer"]
    if kind != "object":
        return []
    if not isinstance(value, dict):
        return [f"{value!r} is not an object"]
    properties = schema.get("properties", {})
    errors = [f"missing {key}" for key in schema.get("required", []) if key not in value]
    errors += [f"unexpected {key}" for key in value if key not in properties]
    for key, sub in properties.items():
        errors += schema_errors(value[key], sub) if key in value else []
    return errors


def test_the_schema_checker_catches_what_it_should():
    assert schema_errors({"city": "Paris", "unit": "celsius"}, WEATHER.parameters) == []
    assert schema_errors({"unit": "kelvin", "x": 1}, WEATHER.parameters) == [
        "missing city", "unexpected x", "'kelvin' not in ['celsius', 'fahrenheit']"]
    assert schema_errors({"minutes": "ten"}, TIMER.parameters) == ["'ten' is not an integer"]


@pytest.fixture(scope="module")
def chat(cpu_settings) -> Iterator[ChatModel]:
    yield ChatModel.load(cpu_settings.llm)


def _raw(chat: ChatModel, question: str, tools: ToolSet, temperature: float | None = None) -> str:
    prompt = chat.prompt(chat.build_messages([], question, tools=tools), tools)
    pieces = chat.stream_slice(prompt, "", max_new=chat.settings.max_tokens, temperature=temperature)
    return "".join(piece for piece, _ in pieces)


def _calls(raw: str, tools: ToolSet) -> list[tuple[str, str]]:
    """(name, arguments text) of each call the reader finds in `raw`; any text is an error here."""
    reader = ToolReader(tools)
    out = [*reader.feed(raw), *reader.finish()]
    assert all(isinstance(piece, CallDelta) for piece in out), out
    calls: dict[int, tuple[str, str]] = {}
    for delta in out:
        name, text = calls.get(delta.index, (delta.name, ""))
        calls[delta.index] = (name, text + delta.arguments)
    return list(calls.values())


def test_required_makes_one_well_formed_call_matching_its_tools_schema(chat):
    tools = ToolSet(BOTH, "required")
    schemas = {tool.name: tool.parameters for tool in BOTH}
    for question in QUESTIONS:
        for temperature in (0.0, 1.0):  # greedy, and hot enough to wander without the grammar
            raw = _raw(chat, question, tools, temperature)
            call = json.loads(raw.removeprefix("<tool_call>").removesuffix("</tool_call>"))
            assert set(call) == {"name", "arguments"} and call["name"] in schemas, raw
            assert schema_errors(call["arguments"], schemas[call["name"]]) == [], raw
            [(name, arguments)] = _calls(raw, tools)  # exactly one call, read back whole
            assert (name, json.loads(arguments)) == (call["name"], call["arguments"])


def test_a_named_choice_forces_that_tool(chat):
    for name, tool in (("get_weather", WEATHER), ("set_timer", TIMER)):
        tools = ToolSet(BOTH, name)
        for question in QUESTIONS[:3]:
            raw = _raw(chat, question, tools)
            [(called, arguments)] = _calls(raw, tools)
            assert called == name, raw
            assert schema_errors(json.loads(arguments), tool.parameters) == [], raw


def test_a_tool_without_a_schema_takes_any_object(chat):
    tools = ToolSet((Tool("note", "Remember something."),), "required")
    [(name, arguments)] = _calls(_raw(chat, "Remember that I like tea.", tools, 1.0), tools)
    assert name == "note" and isinstance(json.loads(arguments), dict)


def test_without_tools_or_with_none_the_prompt_is_the_same_as_before(chat):
    tools = ToolSet(BOTH, "none")
    messages = chat.build_messages([], "What's the weather in Paris?")
    plain = chat.prompt(messages)
    assert chat.prompt(messages, tools) == plain == chat.prompt(messages, ToolSet())
    assert plain.grammar is None and plain.tools is None
    # Offered, the tools are described in the system message, after the system prompt.
    auto = chat.prompt(messages, ToolSet(BOTH))
    text = chat._llama.detokenize(auto.tokens, special=True).decode()
    assert auto.grammar is None and auto.tools == ToolSet(BOTH)
    assert "get_weather" in text and "<tool_call>" in text
    assert text.index(chat.settings.system_prompt) < text.index("get_weather") < text.index("Paris")
    assert chat.prompt(messages, ToolSet(BOTH, "required")).grammar == call_grammar(ToolSet(BOTH, "required"))


def test_calls_and_results_in_the_history_reach_the_small_models_prompt(chat):
    history = [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
    ]
    prompt = chat.prompt(chat.build_messages([], "")[:1] + history, ToolSet(BOTH))
    text = chat._llama.detokenize(prompt.tokens, special=True).decode()
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    # The result comes back as the user's turn, in tags, and the model is asked to answer after it.
    assert "<|im_start|>user\n<tool_response>\nSunny, 21 degrees.\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    reply = "".join(chat.stream_reply(chat.build_messages([], "")[:1] + history, temperature=0.0))
    assert reply.strip()  # it answers in words after a result


def test_a_grammar_cannot_be_continued_in_a_later_slice(chat):
    prompt = chat.prompt(chat.build_messages([], "Set a timer."), ToolSet(BOTH, "required"))
    with pytest.raises(ValueError, match="grammar"):
        next(chat.stream_slice(prompt, "<tool_call>", max_new=4))


# ---------------------------------------------------------------- write_reply


async def _written(chat: ChatModel, question: str, tools: ToolSet, **options) -> list[str | CallDelta]:
    worker = Worker("llm-test")
    prompt = chat.prompt(chat.build_messages([], question, tools=tools), tools)
    return [piece async for piece in write_reply(chat, worker, prompt, **options)]


def test_write_reply_yields_a_forced_call_as_deltas_of_one_id(chat):
    pieces = asyncio.run(_written(chat, "Set a timer for ten minutes.", ToolSet(BOTH, "set_timer"), temperature=0.0))
    assert pieces and all(isinstance(piece, CallDelta) for piece in pieces)
    assert {(p.index, p.call_id, p.name) for p in pieces} == {(0, pieces[0].call_id, "set_timer")}
    assert pieces[0].call_id.startswith("call_") and len(pieces[0].call_id) > 10
    assert schema_errors(json.loads("".join(p.arguments for p in pieces)), TIMER.parameters) == []


def test_write_reply_without_a_call_yields_text_in_slices(chat):
    pieces = asyncio.run(_written(chat, "What is the capital of France?", ToolSet(BOTH, "none"), temperature=0.0))
    assert len(pieces) >= 2 and all(isinstance(piece, str) for piece in pieces)
    assert "paris" in "".join(pieces).lower()


def test_write_reply_keeps_to_max_tokens(chat):
    pieces = asyncio.run(_written(chat, "Tell me a long story about a dragon.", ToolSet(), max_tokens=5))
    assert 1 <= len(pieces) <= 5


def test_a_forced_call_cut_short_by_max_tokens_is_an_error_not_a_call(chat):
    with pytest.raises(ValueError, match="ended inside a tool call"):
        # 12 tokens: past the "<tool_call>" tag (written in up to 9 at the preset's temperature), not the call.
        asyncio.run(_written(chat, "Set a timer.", ToolSet(BOTH, "required"), max_tokens=12))


# ---------------------------------------------------------------- the reader


def _read(pieces: list[str], tools: ToolSet = ToolSet(BOTH)) -> list[list[str | CallDelta]]:
    reader = ToolReader(tools)
    return [reader.feed(piece) for piece in pieces] + [reader.finish()]


def test_plain_text_passes_through_at_once():
    pieces = ["The", " weather", " is", " fine", ", I", " think", "."]
    assert _read(pieces) == [[piece] for piece in pieces] + [[]]
    # A "<" that turns out to be no marker is held only until it is told apart.
    assert _read(["a <", "b"]) == [["a "], ["<b"], []]
    assert _read(["a <tool", "kit"]) == [["a "], ["<toolkit"], []]
    assert _read(["a <tool"]) == [["a "], ["<tool"]]  # the end tells it apart too


def test_a_call_becomes_deltas_whose_arguments_parse():
    raw = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Pa\\"ris", "unit": "celsius"}}</tool_call>'
    out = [piece for step in _read([raw]) for piece in step]
    assert out[0] == "Sure. "
    deltas = out[1:]
    assert all(isinstance(d, CallDelta) and d.name == "get_weather" and d.index == 0 for d in deltas)
    assert json.loads("".join(d.arguments for d in deltas)) == {"city": 'Pa"ris', "unit": "celsius"}


def test_a_marker_split_across_pieces_and_arguments_stream_as_written():
    raw = '<tool_call>{"name": "set_timer", "arguments": {"minutes": 10}}</tool_call>\n'
    pieces = [raw[i:i + 3] for i in range(0, len(raw), 3)]
    steps = _read(pieces)
    deltas = [piece for step in steps for piece in step]
    assert all(isinstance(d, CallDelta) for d in deltas)  # nothing spoken, not even the newline after it
    assert len({d.call_id for d in deltas}) == 1 and deltas[0].arguments == ""  # named before its arguments
    assert "".join(d.arguments for d in deltas) == '{"minutes": 10}'
    assert sum(bool(step) for step in steps) > 3  # streamed over many pieces, not once at the end


def test_two_calls_and_text_after_them():
    raw = ('<tool_call>{"name": "set_timer", "arguments": {"minutes": 1}}</tool_call>\n'
           '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call> Done.')
    out = [piece for step in _read([raw]) for piece in step]
    calls = [p for p in out if isinstance(p, CallDelta)]
    assert [(c.index, c.name) for c in calls] == [(0, "set_timer"), (1, "get_weather")]
    assert calls[0].call_id != calls[1].call_id
    assert [p for p in out if isinstance(p, str)] == ["Done."]


def test_a_bare_call_at_the_start_as_llama_3_writes_it():
    out = [p for step in _read(['{"name": "get_weather", ', '"parameters": {"city": "Rome"}}']) for p in step]
    assert all(isinstance(p, CallDelta) for p in out)
    assert json.loads("".join(p.arguments for p in out)) == {"city": "Rome"}


@pytest.mark.parametrize("raw", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Par',  # cut off
    '<tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>',  # not offered
    '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # arguments not an object
    "<tool_call>get_weather(city='Paris')</tool_call>",  # not JSON
])
def test_a_malformed_call_is_an_error(raw):
    with pytest.raises(ValueError):
        _read([raw])


def test_without_tools_everything_is_text():
    raw = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert _read([raw], ToolSet(BOTH, "none")) == [[raw], []]


# ---------------------------------------------------------------- trimming


def _exchange(i: int, words: str = "") -> list[dict]:
    call_id = f"call_{i}"
    return [
        {"role": "user", "content": f"question {i} {words}"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "X"}'}}]},
        {"role": "tool", "tool_call_id": call_id, "content": f"result {i}"},
        {"role": "assistant", "content": f"answer {i}"},
    ]


def test_trimming_drops_whole_exchanges_with_their_calls(chat):
    limit = chat.settings.history_turns
    history = [message for i in range(limit + 1) for message in _exchange(i)]
    chat.build_messages(history, "latest?")
    assert 0 < len(history) < 4 * (limit + 1)
    assert history[0]["role"] == "user" and len(history) % 4 == 0  # never a result or a call without its result
    assert history[-1]["content"] == f"answer {limit}"  # the newest stays
    # Over the token budget: whole exchanges go too, also when one holds several results.
    history = [message for i in range(4) for message in _exchange(i, "word " * 300)]
    history[2:3] = [history[2], {"role": "tool", "tool_call_id": "call_0", "content": "more"}]
    chat.build_messages(history, "latest?")
    assert history and history[0]["role"] == "user" and history[-1]["content"] == "answer 3"
    # A history that starts with the assistant (a Realtime client may add one) counts that as an exchange.
    history = [{"role": "assistant", "content": "Hello!"}] + [m for i in range(limit) for m in _exchange(i)]
    chat.build_messages(history, "latest?")
    assert history[0]["role"] == "user"


def test_calls_count_toward_the_budget(chat):
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "note", "arguments": json.dumps({"t": "word " * 200})}}]}
    assert chat.count_messages([call]) > 200 > chat.count_messages([{"role": "assistant", "content": "hi"}])


# A chat template that knows tools, in the style of Qwen's and Llama 3.x's (written here, small).
NATIVE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_knows_tools_renders_them_itself(chat):
    chat._llama.metadata["tokenizer.chat_template"], original = NATIVE, chat._llama.metadata["tokenizer.chat_template"]
    try:
        native = ChatModel(chat.settings, chat._llama, chat._judge)
    finally:
        chat._llama.metadata["tokenizer.chat_template"] = original
    history = _exchange(0)
    messages = [{"role": "system", "content": "Be brief."}, *history]
    text = chat._llama.detokenize(native.prompt(messages, ToolSet(BOTH)).tokens, special=True).decode()
    assert 'Tools: [{"type": "function", "function": {"name": "get_weather"' in text
    assert 'CALL get_weather {"city": "X"}' in text  # the arguments as an object, as such templates expect
    assert "<|im_start|>tool\nresult 0<|im_end|>" in text and "<tool_call>" not in text
    plain = native.prompt(messages)
    assert native.prompt(messages, ToolSet(BOTH, "none")) == plain
    assert "Tools:" not in chat._llama.detokenize(plain.tokens, special=True).decode()
