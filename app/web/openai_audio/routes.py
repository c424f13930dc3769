"""OpenAI's audio REST endpoints over the loaded engines, for Open WebUI, LibreChat and Home Assistant's OpenAI
components: POST /v1/audio/speech (every response_format; a stream of audio or of SSE events), POST
/v1/audio/transcriptions (every response_format; SSE with stream=true), GET /v1/audio/voices and /v1/audio/models.

The same access rules as /v1/realtime (app/web/access.py): Host checked, a page of another origin refused, and on a
server that pairs a program sends the pairing token as its API key. Text becomes voice phrase by phrase
(app/core/speech.py), each encoded as soon as it exists (encoding.py)."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import AsyncIterator
from pathlib import PurePosixPath

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.datastructures import State, UploadFile
from litestar.response import Stream

from app.audio import ASR_RATE, AudioTooLong, NotAudio, decode_file
from app.config import Settings
from app.core.speech import speak, timed_transcript
from app.engines.asr import Segment
from app.engines.loaded import Engines
from app.web import access
from app.web.openai_audio import transcripts
from app.web.openai_audio.encoding import FORMATS, MEDIA_TYPES, Encoder
from app.web.openai_audio.errors import HANDLERS, AudioError
from app.web.voices import known_voice, voice_name

# A file's extension (or its declared type) -> the one FFmpeg demuxer tried on it: OpenAI's list of formats.
CONTAINERS = {"flac": "flac", "mp3": "mp3", "mpga": "mp3", "mpeg": "mp3", "mp4": "mp4", "m4a": "mp4", "ogg": "ogg",
              "oga": "ogg", "opus": "ogg", "wav": "wav", "webm": "webm"}
TYPES = {"audio/flac": "flac", "audio/x-flac": "flac", "audio/mpeg": "mp3", "audio/mp4": "mp4", "audio/ogg": "ogg",
         "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/webm": "webm", "video/webm": "webm"}
NOT_AUDIO = ("The file could not be read as audio. Send flac, mp3, mp4, m4a, mpeg, mpga, oga, ogg, opus, wav or "
             "webm, named with its extension.")
log = logging.getLogger(__name__)
ASSISTANT_AUDIO_TOKENS_PER_S = 20  # OpenAI's rate for generated audio (app/web/realtime/usage.py)


class VoiceId(msgspec.Struct, frozen=True):
    id: str


class SpeechRequest(msgspec.Struct, frozen=True):
    input: str
    model: str = "tts-1"  # any name: the server has one voice engine
    voice: str | VoiceId = "default"
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str | None = None  # read by OpenAI's gpt-4o-mini-tts; a Piper or CSM voice has no use for it

    @property
    def voice_id(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceId) else self.voice


class TranscriptionRequest(msgspec.Struct, frozen=True):
    model: str = "whisper-1"  # any name: the server has one speech-to-text model
    language: str | None = None
    prompt: str | None = None
    response_format: str = "json"
    stream: bool = False


def _ready(state: State) -> Engines:
    if state.loading.state.phase == "ready":
        return state.engines
    if state.loading.state.phase == "failed":
        raise AudioError(503, "The assistant could not start: its models could not be loaded.", code="load_failed")
    raise AudioError(503, "The assistant is still starting; try again in a moment.", code="loading")


# ---------------------------------------------------------------- speech


@post("/speech", status_code=200)
async def speech(request: Request, state: State) -> Stream:
    engines = _ready(state)
    wanted = _speech_request(await request.body(), state.settings)
    if wanted.stream_format == "sse":
        return Stream(_speech_events(engines, state.settings, wanted), media_type="text/event-stream")
    return Stream(_speech_audio(engines, state.settings, wanted), media_type=MEDIA_TYPES[wanted.response_format])


def _speech_request(raw: bytes, settings: Settings) -> SpeechRequest:
    """The request, checked before any work: AudioError with words that say what to change."""
    try:
        wanted = msgspec.json.decode(raw, type=SpeechRequest)
    except msgspec.DecodeError:
        raise AudioError(400, "The body is not JSON.", code="invalid_json") from None
    except msgspec.ValidationError as exc:
        raise AudioError(400, f"The request is not one this endpoint takes: {exc}.", code="invalid_value") from None
    if not wanted.input.strip():
        raise AudioError(400, "The input is empty: there is nothing to say.", code="empty_input", param="input")
    if len(wanted.input) > settings.limits.max_text_chars:
        raise AudioError(400, f"The input is longer than {settings.limits.max_text_chars} characters "
                              "(limits.max_text_chars).", code="too_long", param="input")
    if not known_voice(settings, wanted.voice_id):
        raise AudioError(400, f"There is no voice '{wanted.voice_id}'. This server speaks with "
                              f"'{voice_name(settings)}' (also answering to 'default' and OpenAI's voice names).",
                         code="voice_not_found", param="voice")
    if wanted.response_format not in FORMATS:
        raise AudioError(400, f"response_format must be one of {', '.join(FORMATS)}.", code="invalid_value",
                         param="response_format")
    if not 0.25 <= wanted.speed <= 4.0:
        raise AudioError(400, "speed must be between 0.25 and 4.", code="invalid_value", param="speed")
    if wanted.stream_format not in ("audio", "sse"):
        raise AudioError(400, "stream_format must be audio or sse.", code="invalid_value", param="stream_format")
    return wanted


async def _encoded(engines: Engines, settings: Settings, wanted: SpeechRequest) -> AsyncIterator[bytes]:
    """The voice of the input, encoded phrase by phrase as it is made, then the encoder's tail. The encoder runs on
    a thread: mp3 takes ~50 ms a second of audio on these CPUs, up to ~25 ms at a time, too long for the event loop
    that carries every conversation's audio."""
    encoder = Encoder(wanted.response_format, engines.tts.sample_rate, wanted.speed)
    async for piece in speak(engines, wanted.input, settings.chunking):
        if piece.pcm is not None and (data := await asyncio.to_thread(encoder.add, piece.pcm)):
            yield data
    yield await asyncio.to_thread(encoder.finish)


async def _speech_audio(engines: Engines, settings: Settings, wanted: SpeechRequest) -> AsyncIterator[bytes]:
    try:
        async for data in _encoded(engines, settings, wanted):
            yield data
    except Exception:  # the status has gone out: the stream ends short, the log says why
        log.exception("speech: the voice failed mid-answer")


async def _speech_events(engines: Engines, settings: Settings, wanted: SpeechRequest) -> AsyncIterator[bytes]:
    """speech.audio.delta events (the audio in base64, in the response_format), then speech.audio.done."""
    sent = 0
    try:
        async for data in _encoded(engines, settings, wanted):
            if data:
                sent += len(data)
                yield transcripts.sse({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
    except Exception:
        log.exception("speech: the voice failed mid-answer")
        yield transcripts.sse({"type": "error", "error": {"message": "The voice failed; the audio is incomplete.",
                                                          "type": "server_error", "code": "tts_failed"}})
        return
    yield transcripts.sse({"type": "speech.audio.done", "usage": _usage(wanted.input, sent, wanted.response_format)})


def _usage(text: str, sent_bytes: int, response_format: str) -> dict:
    """Tokens as OpenAI would count them: the text estimated at 4 characters a token, the audio by its length (exact
    for pcm and wav; for the compressed formats estimated from their bytes at the encoders' usual rates)."""
    bytes_per_s = {"pcm": 48_000, "wav": 48_000, "flac": 30_000}.get(response_format, 8_000)
    given, made = math.ceil(len(text) / 4), math.ceil(sent_bytes / bytes_per_s * ASSISTANT_AUDIO_TOKENS_PER_S)
    return {"input_tokens": given, "output_tokens": made, "total_tokens": given + made}


# ---------------------------------------------------------------- transcriptions


async def transcriptions(request: Request, state: State) -> Response | Stream:
    engines = _ready(state)
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise AudioError(400, "There is no file: send the audio as the multipart field 'file'.", code="no_file",
                         param="file")
    wanted = _transcription_request(dict(form), engines)
    container = _container(upload)
    data = await upload.read()
    try:
        audio = await asyncio.to_thread(decode_file, data, container, state.settings.limits.max_upload_s)
    except NotAudio as exc:
        log.info("transcriptions: refused %r: %s", upload.filename, exc)
        if isinstance(exc, AudioTooLong):
            raise AudioError(400, f"The audio is longer than {state.settings.limits.max_upload_s:g} seconds "
                                  "(limits.max_upload_s).", code="audio_too_long", param="file") from None
        raise AudioError(400, NOT_AUDIO, code="invalid_file_format", param="file") from None
    segments = timed_transcript(engines, audio, language=wanted.language, prompt=wanted.prompt)
    if wanted.stream:
        return Stream(_transcript_events(segments), media_type="text/event-stream")
    found = [s async for s in segments]
    language = found[0].language if found else (wanted.language or engines.asr.settings.language or "en")
    body = transcripts.rendered(wanted.response_format, found, duration=len(audio) / ASR_RATE, language=language)
    return Response(body, media_type=transcripts.MEDIA_TYPES[wanted.response_format])


def _transcription_request(form: dict, engines: Engines) -> TranscriptionRequest:
    fields = {k: v for k, v in form.items() if k in TranscriptionRequest.__struct_fields__ and isinstance(v, str)}
    try:
        wanted = msgspec.convert(fields, TranscriptionRequest, strict=False)
    except msgspec.ValidationError as exc:
        raise AudioError(400, f"A field is not one this endpoint takes: {exc}.", code="invalid_value") from None
    if wanted.response_format not in transcripts.FORMATS:
        raise AudioError(400, f"response_format must be one of {', '.join(transcripts.FORMATS)}.",
                         code="invalid_value", param="response_format")
    if wanted.language and wanted.language not in engines.asr.languages:
        known = ", ".join(engines.asr.languages[:12]) + (" ..." if len(engines.asr.languages) > 12 else "")
        raise AudioError(400, f"This server's speech-to-text model does not know the language '{wanted.language}' "
                              f"(it knows: {known}).", code="unsupported_language", param="language")
    return wanted


def _container(upload: UploadFile) -> str:
    extension = PurePosixPath(upload.filename or "").suffix.lower().lstrip(".")
    found = CONTAINERS.get(extension) or TYPES.get((upload.content_type or "").split(";")[0].strip().lower())
    if found is None:
        raise AudioError(400, NOT_AUDIO, code="invalid_file_format", param="file")
    return found


async def _transcript_events(segments: AsyncIterator[Segment]) -> AsyncIterator[bytes]:
    """transcript.text.delta per segment as Whisper decodes it, then transcript.text.done with all the text."""
    texts = []
    try:
        async for segment in segments:
            yield transcripts.delta_event(segment, first=not texts)
            texts.append(segment.text)
    except Exception:
        log.exception("transcriptions: speech-to-text failed mid-answer")
        yield transcripts.sse({"type": "error", "error": {"message": "Speech-to-text failed; the text is incomplete.",
                                                          "type": "server_error", "code": "asr_failed"}})
        return
    yield transcripts.done_event(" ".join(texts))


# ---------------------------------------------------------------- voices and models


@get("/voices")
async def voices(state: State) -> dict:
    """Open WebUI reads {"voices": [{"id", "name"}]} from a server that is not OpenAI's."""
    name = voice_name(state.settings)
    return {"voices": [{"id": name, "name": name}, {"id": "default", "name": f"default ({name})"}]}


@get("/models")
async def models(state: State) -> dict:
    """Open WebUI reads {"models": [{"id"}]}; the OpenAI-style list is beside it for other clients."""
    listed = [{"id": "tts-1", "name": f"text-to-speech ({voice_name(state.settings)})"},
              {"id": "whisper-1", "name": "speech-to-text (this server's Whisper)"}]
    return {"models": listed, "object": "list",
            "data": [{"id": m["id"], "object": "model", "owned_by": "voice-assistant"} for m in listed]}


def router(settings: Settings) -> Router:
    """The endpoints under /v1/audio, the transcription's body capped at limits.max_upload_bytes."""
    limit = settings.limits.max_upload_bytes
    upload = post("/transcriptions", status_code=200, request_max_body_size=limit)(transcriptions)
    return Router("/v1/audio", route_handlers=[speech, upload, voices, models],
                  guards=[access.same_origin, access.require_pairing], exception_handlers=HANDLERS)
