"""Work on a turn while the user is still speaking, so that its end waits for less: interim transcripts
(shown as they speak), and the language model reading the prompt its reply will start with."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine

import numpy as np

from app.core.turns import TurnSettings
from app.engines.llm import Message
from app.engines.loaded import Engines

log = logging.getLogger(__name__)


class ReadAhead:
    """Background jobs of one conversation, on the engines' workers; close() drops them.

    `prompt_for(words)` gives the messages a reply to `words` would start with; `show(turn, text)` shows
    an interim transcript and says whether its turn is still being spoken."""

    def __init__(
        self,
        engines: Engines,
        turns: TurnSettings,
        name: str,
        *,
        prompt_for: Callable[[str], list[Message]],
        show: Callable[[int, str], bool],
    ) -> None:
        self._engines, self._turns, self._name = engines, turns, name
        self._prompt_for, self._show = prompt_for, show
        self._interim_busy = False
        self._tasks: set[asyncio.Task[None]] = set()

    def prefill(self) -> None:
        """Speech began: read the prompt so far (the system prompt and the history)."""
        self._in_background(self._prefill())

    def interim(self, turn_id: int, audio: np.ndarray) -> None:
        """Transcribe the turn so far; one at a time: never let guesses queue up before the final."""
        if self._interim_busy:
            return
        self._interim_busy = True
        self._in_background(self._interim(turn_id, audio))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _prefill(self, words: str = "") -> None:
        """Let the LLM evaluate the system prompt, the history and the words heard so far (an interim
        transcript) that its reply will start with (app/engines/llm.py ChatModel.prefill), so that the
        turn waits only for the words after them; the words' judge reads them ahead too. A model on a
        server keeps its own prefix cache."""
        llm, turns = self._engines.llm, self._turns
        if not hasattr(llm, "prefill"):
            return
        messages = self._prompt_for(words)
        jobs = [self._engines.llm_worker.run(llm.prefill, messages)]
        if words and turns.end_of_turn == "smart" and turns.decide_by != "sound":
            jobs.append(self._engines.judge_worker.run(llm.end_of_turn_probability, messages))
        try:
            await asyncio.gather(*jobs)
        except Exception:
            log.warning("conversation %s: evaluating the prompt ahead failed", self._name, exc_info=True)

    async def _interim(self, turn_id: int, audio: np.ndarray) -> None:
        try:
            text = await self._engines.asr_worker.run(self._engines.asr.transcribe, audio)
        except Exception:
            log.warning("conversation %s: interim transcript failed", self._name, exc_info=True)
            return
        finally:
            self._interim_busy = False
        if text and self._show(turn_id, text) and self._turns.speculate:
            await self._prefill(text)

    def _in_background(self, job: Coroutine[object, object, None]) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
