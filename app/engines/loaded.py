"""The loaded models of one server, shared by every session, each behind its own worker thread.

app/startup.py makes one at start-up (fetch, load, warm up); the app keeps it in its state, and each
session's conversation (app/core/conversation.py) runs its turns on these models: VAD on the listening
thread, then speech-to-text, language model and voice, each as jobs on its model's worker (workers.py).
"""

from __future__ import annotations

from app.engines.asr import Transcriber
from app.engines.llm import ChatModel
from app.engines.llm_remote import RemoteChatModel
from app.engines.smart_turn import SmartTurn
from app.engines.speech_remote import RemoteTranscriber
from app.engines.tts.base import TtsEngine
from app.engines.vad import load_vad_model
from app.engines.workers import Worker


class Engines:
    """The three models, one worker thread each (a model runs one job at a time, in arrival order),
    and the VAD and Smart Turn models every session's listener shares."""

    def __init__(self, asr: Transcriber | RemoteTranscriber, llm: ChatModel | RemoteChatModel, tts: TtsEngine) -> None:
        self.asr = asr
        self.llm = llm
        self.tts = tts
        self.vad_model = load_vad_model()
        self.smart_turn = SmartTurn()  # end of turn, judged at pauses on the listeners' threads
        self.asr_worker = Worker("asr")
        self.llm_worker = Worker("llm")
        # The LLM's second context judges whether a turn's words are finished beside the reply.
        self.judge_worker = Worker("judge")
        # A batching voice (CSM with tts.csm.batch > 1) takes as many sessions' phrases at once as it
        # has slots; its own thread runs them. Other engines (Piper) say nothing: one at a time.
        self.tts_worker = Worker("tts", threads=getattr(tts, "concurrency", 1))

    def llm_backend(self) -> str:
        """Where the language model runs: in this process, or on an OpenAI-compatible server (its
        address, without credentials)."""
        return self.llm.describe() if isinstance(self.llm, RemoteChatModel) else "llama_cpp in process"

    def close(self) -> None:
        for worker in (self.asr_worker, self.llm_worker, self.judge_worker, self.tts_worker):
            worker.close()
