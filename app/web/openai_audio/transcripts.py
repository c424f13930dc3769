"""A transcription in the response_format asked for (json, text, srt, vtt, verbose_json), or as the events of a
streamed one (transcript.text.delta, transcript.text.done)."""

from __future__ import annotations

import json

from app.engines.asr import Segment

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
MEDIA_TYPES = {"json": "application/json", "verbose_json": "application/json", "text": "text/plain",
               "srt": "text/plain", "vtt": "text/vtt"}


def text_of(segments: list[Segment]) -> str:
    return " ".join(s.text for s in segments).strip()


def rendered(response_format: str, segments: list[Segment], *, duration: float, language: str) -> str | dict:
    """The whole answer: a dict for the JSON formats, a string for the others."""
    if response_format == "json":
        return {"text": text_of(segments)}
    if response_format == "verbose_json":
        return {"task": "transcribe", "language": language, "duration": round(duration, 2),
                "text": text_of(segments), "segments": [_segment(s) for s in segments]}
    if response_format == "srt":
        return "".join(f"{n}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text}\n\n"
                       for n, s in enumerate(segments, 1))
    if response_format == "vtt":
        return "WEBVTT\n\n" + "".join(f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text}\n\n"
                                      for s in segments)
    return text_of(segments) + "\n"


def _segment(s: Segment) -> dict:
    return {"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": " " + s.text, "tokens": s.tokens,
            "temperature": s.temperature, "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob}


def _stamp(seconds: float, comma: str) -> str:
    """00:01:02,345 (SubRip) or 00:01:02.345 (WebVTT)."""
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{comma}{ms % 1000:03d}"


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def delta_event(segment: Segment, first: bool) -> bytes:
    return sse({"type": "transcript.text.delta", "delta": segment.text if first else " " + segment.text,
                "segment_id": f"seg_{segment.id}"})


def done_event(text: str) -> bytes:
    return sse({"type": "transcript.text.done", "text": text})
