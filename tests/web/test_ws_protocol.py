"""The WebSocket contract's messages decode strictly and encode as documented."""

import json
import typing

import msgspec
import pytest

from app.core import events as ev
from app.web import ws_protocol as p


def test_client_messages_decode_by_type():
    assert p.decode_client('{"type":"text","text":"hi"}') == p.UserText("hi")
    assert p.decode_client('{"type":"audio_start"}') == p.AudioStart("audio/webm;codecs=opus")
    assert p.decode_client('{"type":"interrupt"}') == p.Interrupt(played_samples=None)
    assert p.decode_client('{"type":"interrupt","played_samples":4410}') == p.Interrupt(played_samples=4410)
    assert p.decode_client('{"type":"reset"}') == p.Reset()
    assert p.decode_client('{"type":"audio_stop"}') == p.AudioStop()
    assert p.decode_client('{"type":"ping"}') == p.Ping()
    hello = p.decode_client('{"type":"hello","temperature":0.3,"end_silence_ms":700}')
    assert hello == p.Hello(temperature=0.3, end_silence_ms=700)


@pytest.mark.parametrize(("mime_type", "container"), [
    ("audio/webm;codecs=opus", "webm"), ("audio/webm", "webm"), ("audio/ogg; codecs=opus", "ogg"),
    ("Audio/OGG", "ogg"), ("audio/mp4", "mp4"), ("audio/mp4;codecs=mp4a.40.2", "mp4"), ("audio/wav", "wav"),
    ("audio/wave", "wav"), ("audio/x-wav", "wav"),
    ("audio/mpeg", None), ("video/x-flv", None), ("application/octet-stream", None), ("", None), ("webm", None),
])
def test_audio_start_names_the_only_demuxer_its_recording_is_opened_with(mime_type, container):
    assert p.AudioStart(mime_type).container == container


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"type":"shout"}',
        '{"text":"no type"}',
        '{"type":"text","text":"   "}',
        '{"type":"text","text":"x","extra":1}',
        '{"type":"hello","temperature":9}',
        '{"type":"ping","extra":1}',
    ],
)
def test_bad_client_messages_are_rejected(raw):
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        p.decode_client(raw)


def test_events_carry_their_type_tag():
    event = json.loads(p.encode_event(ev.TurnEnd(3, "no_speech")))
    assert event == {"type": "turn_end", "turn": 3, "reason": "no_speech", "reply": ""}
    assert json.loads(p.encode_event(p.Pong())) == {"type": "pong"}
    assert json.loads(p.encode_event(ev.StateChanged("speaking"))) == {"type": "state", "state": "speaking"}
    ready = json.loads(p.encode_event(p.Ready("s1", 22050, "cpu", "a", "l", "t")))
    assert ready == {"type": "ready", "session_id": "s1", "sample_rate": 22050, "preset": "cpu", "asr": "a",
                     "llm": "l", "tts": "t", "channels": 1, "sample_format": "s16le"}


def test_every_event_but_audio_has_a_wire_name():
    wired = set(p.EVENT_TYPES) | {ev.ReplyAudio}  # audio goes out as binary frames
    assert wired == set(typing.get_args(ev.Event))
    assert len(set(p.EVENT_TYPES.values())) == len(p.EVENT_TYPES)
