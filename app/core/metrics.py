"""Prometheus metrics of one server: per-stage latency histograms, turn and error counters."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from app.core import events as ev

# Seconds from the end of the user's speech to each stage of a turn.
STAGES = ("end_of_turn", "transcript", "first_token", "first_phrase", "first_audio", "total")
BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0)


class Metrics:
    """Owned by the app (created in create_app), shared by its sessions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "voice_turn_stage_seconds", "Seconds from end of user speech to each stage",
            ["stage"], buckets=BUCKETS, registry=self.registry,
        )
        self.turns = Counter("voice_turns", "Turns ended, by reason", ["reason"], registry=self.registry)
        self.errors = Counter("voice_errors", "Error events sent, by code", ["code"], registry=self.registry)
        self.sessions = Gauge("voice_sessions_active", "Open WebSocket sessions", registry=self.registry)
        self.barge_ins = Counter("voice_barge_ins", "Replies cut off by the user", registry=self.registry)
        self.end_of_turn = Counter("voice_end_of_turn", "Spoken turns ended, by what ended them: smart (Smart "
                                   "Turn at a pause), silence, length, released", ["by"], registry=self.registry)
        self.speculations = Counter("voice_speculations", "Turns answered from the first pause on, by "
                                    "outcome: used, or dropped because the user went on", ["outcome"],
                                    registry=self.registry)
        self.dropped_audio = Counter("voice_dropped_audio", "Replies whose audio was dropped: the client "
                                     "did not read it (limits.max_outgoing_bytes)", registry=self.registry)
        self.input_seconds = Counter("voice_input_audio_seconds", "Seconds of the clients' audio by fate: heard, "
                                     "or dropped because it came faster than limits.max_audio_speed allows",
                                     ["fate"], registry=self.registry)

    def sessions_open(self) -> int:
        """Sessions of every protocol open now (the gauge both adapters count in)."""
        return int(self.registry.get_sample_value("voice_sessions_active") or 0)

    def count_input(self, fate: str, seconds: float) -> None:
        """Seconds of input audio heard or dropped (from any thread: the counters lock)."""
        self.input_seconds.labels(fate).inc(seconds)

    def observe_turn(self, metrics: ev.TurnMetrics, reason: str) -> None:
        self.turns.labels(reason).inc()
        for stage in STAGES:
            ms = getattr(metrics, f"{stage}_ms")
            if ms is not None:
                self.stage_seconds.labels(stage).observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
