"""Prometheus metrics: histograms per stage and counters, in the text format."""

from app.core import events as ev
from app.core.metrics import Metrics


def test_turn_metrics_land_in_stage_histograms_and_counters():
    metrics = Metrics()
    metrics.observe_turn(ev.TurnMetrics(1, end_of_turn_ms=500, first_audio_ms=1200, total_ms=3000), "completed")
    metrics.observe_turn(ev.TurnMetrics(2), "no_speech")
    metrics.errors.labels("bad_audio").inc()
    text = metrics.render().decode()
    assert 'voice_turn_stage_seconds_count{stage="first_audio"} 1.0' in text
    assert 'voice_turn_stage_seconds_bucket{le="1.5",stage="first_audio"} 1.0' in text
    assert 'voice_turn_stage_seconds_bucket{le="1.0",stage="first_audio"} 0.0' in text
    assert 'voice_turns_total{reason="completed"} 1.0' in text
    assert 'voice_turns_total{reason="no_speech"} 1.0' in text
    assert 'voice_errors_total{code="bad_audio"} 1.0' in text
