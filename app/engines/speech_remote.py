"""Speech-to-text and the voice on an OpenAI-compatible audio server (vLLM serving Whisper, another instance of this
server): /audio/transcriptions and /audio/speech over HTTP, behind the same interfaces as the models in this
process (asr.py's Transcriber, tts/base.py's TtsEngine). N assistant servers can then share one speech pool.
Calls come from the engines' worker threads: blocking HTTP is fine there."""

from __future__ import annotations

import io
import logging
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import msgspec
import numpy as np

from app.audio import ASR_RATE, float_to_int16
from app.engines.asr import AsrSettings, Segment
from app.engines.servers import repr_hiding_key, shown_url

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
PCM_RATE = 24_000  # OpenAI's response_format "pcm": 16-bit little-endian mono at 24 kHz
CHUNK_BYTES = PCM_RATE // 10 * 2  # the voice is handed on in 0.1 s pieces


class SpeechServerError(RuntimeError):
    """The audio server cannot be used; the message says where, what happened and what to do (never the key)."""


class RemoteVoiceSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """tts.engine openai: the voice of an OpenAI-compatible server (VA_TTS__OPENAI__BASE_URL, ...)."""

    base_url: str = ""  # the API root, ending in /v1, e.g. http://10.0.0.5:8000/v1
    api_key: str = ""  # sent as a Bearer token (another instance of this server: its pairing token); never logged
    model: str = "tts-1"
    voice: str = "alloy"
    timeout_s: float = 30.0

    __repr__ = repr_hiding_key  # the api_key must never reach a log line or a traceback


class _Client:
    """One server's address and key; failures in words."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float, slot: str, setting: str) -> None:
        self._url, self._slot, self._setting = base_url.rstrip("/"), slot, setting
        self.where = shown_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._options = {"headers": headers, "timeout": httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)}

    def post(self, path: str, **request) -> httpx.Response:
        try:
            with httpx.Client(**self._options) as client:
                response = client.post(self._url + path, **request)
        except httpx.HTTPError as exc:
            raise self.failure(exc) from exc
        self.check(response, path)
        return response

    @contextmanager
    def stream(self, path: str, **request) -> Iterator[httpx.Response]:
        """The answer to a POST, read as it comes; checked (SpeechServerError) before it is handed on."""
        with httpx.Client(**self._options) as client, client.stream("POST", self._url + path, **request) as answer:
            self.check(answer, path)
            yield answer

    def check(self, response: httpx.Response, path: str) -> None:
        if response.status_code >= 400:
            response.read()
            said = response.text[:200].replace("\n", " ")
            raise SpeechServerError(f"the {self._slot} server {self.where} answered {path} with HTTP "
                                    f"{response.status_code}: {said}")

    def failure(self, exc: httpx.HTTPError) -> SpeechServerError:
        what = "could not be reached" if isinstance(exc, httpx.ConnectError) else f"failed ({type(exc).__name__})"
        return SpeechServerError(f"the {self._slot} server {self.where} {what}: start it, or check {self._setting}")


class RemoteTranscriber:
    """asr.backend openai: `asr.model` is the name the server serves Whisper under (whisper-1 for this server)."""

    def __init__(self, settings: AsrSettings) -> None:
        self.settings = settings
        self._client = _Client(settings.base_url, settings.api_key, settings.timeout_s, "speech-to-text",
                               "asr.base_url (VA_ASR__BASE_URL)")

    @classmethod
    def load(cls, settings: AsrSettings) -> RemoteTranscriber:
        model = cls(settings)
        log.info("asr: backend openai, model %s on %s", settings.model, model._client.where)
        return model

    @property
    def languages(self) -> list[str]:
        return [self.settings.language or "en"]  # what the server knows is its own: the one it is told

    def transcribe(self, audio: np.ndarray) -> str:
        if audio.size == 0:
            return ""
        return self._ask(audio, "json").get("text", "").strip()

    def segments(self, audio: np.ndarray, *, language: str | None = None, prompt: str | None = None
                 ) -> Iterator[Segment]:
        answer = self._ask(audio, "verbose_json", language=language, prompt=prompt)
        heard_in = answer.get("language") or language or self.settings.language or "en"
        for n, s in enumerate(answer.get("segments") or []):
            yield Segment(n, float(s["start"]), float(s["end"]), str(s["text"]).strip(), heard_in,
                          list(s.get("tokens") or []), float(s.get("avg_logprob") or 0.0),
                          float(s.get("compression_ratio") or 0.0), float(s.get("no_speech_prob") or 0.0))

    def _ask(self, audio: np.ndarray, response_format: str, language: str | None = None,
             prompt: str | None = None) -> dict:
        fields = {"model": self.settings.model, "response_format": response_format}
        if language or self.settings.language:
            fields["language"] = language or self.settings.language
        if prompt:
            fields["prompt"] = prompt
        response = self._client.post("/audio/transcriptions", data=fields,
                                     files={"file": ("speech.wav", _wav(audio), "audio/wav")})
        try:
            return response.json()
        except ValueError:
            raise SpeechServerError(f"the speech-to-text server {self._client.where} answered without JSON") from None

    def warm_up(self) -> None:
        self.transcribe(np.zeros(ASR_RATE // 2, np.float32))  # also: the server answers, before the port opens


class RemoteVoice:
    """tts.engine openai: speech from the server's /audio/speech as raw PCM, handed on as it streams in."""

    name = "openai"
    sample_rate = PCM_RATE

    def __init__(self, settings: RemoteVoiceSettings) -> None:
        self.settings = settings
        self._client = _Client(settings.base_url, settings.api_key, settings.timeout_s, "voice",
                               "tts.openai.base_url (VA_TTS__OPENAI__BASE_URL)")

    @classmethod
    def load(cls, settings: RemoteVoiceSettings) -> RemoteVoice:
        voice = cls(settings)
        log.info("tts: backend openai, voice %s on %s", settings.voice, voice._client.where)
        return voice

    def new_voice(self, speaker: int | None = None) -> None:
        return None

    def synthesize(self, text: str, *, voice: object | None = None,
                   cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        request = {"model": self.settings.model, "voice": self.settings.voice, "input": text,
                   "response_format": "pcm"}
        try:
            with self._client.stream("/audio/speech", json=request) as response:
                pending = b""
                for data in response.iter_bytes():
                    pending += data
                    while len(pending) >= CHUNK_BYTES:
                        yield np.frombuffer(pending[:CHUNK_BYTES], "<i2").copy()
                        pending = pending[CHUNK_BYTES:]
                    if cancel is not None and cancel.is_set():
                        return
                if len(pending) >= 2:
                    yield np.frombuffer(pending[: len(pending) // 2 * 2], "<i2").copy()
        except httpx.HTTPError as exc:
            raise self._client.failure(exc) from exc

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        for _ in self.synthesize("Ready."):
            pass
        log.info("tts: the voice server answered in %.0f ms", (time.perf_counter() - t0) * 1000)


def _wav(audio: np.ndarray) -> bytes:
    """16 kHz mono float32 -> a WAV file's bytes."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(ASR_RATE)
        w.writeframes(float_to_int16(audio).tobytes())
    return out.getvalue()

