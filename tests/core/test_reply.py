"""What the user heard of a reply, from the playback clock or the page's own count."""

from app.core.reply import JITTER_BUFFER_S, Reply


def reply_with_two_phrases() -> Reply:
    reply = Reply(sample_rate=1000)
    reply.marks["first_audio"] = 100.0
    reply.add_audio(2000)
    reply.end_phrase("One two three four.")  # samples 0..2000
    reply.add_audio(2000)
    reply.end_phrase("Five six.")  # samples 2000..4000
    return reply


def test_heard_keeps_whole_phrases_and_the_played_share_of_the_next():
    reply = reply_with_two_phrases()
    assert reply.heard(0) == ""
    assert reply.heard(1000) == "One two"  # half of the first phrase: half of its words
    assert reply.heard(2000) == "One two three four."
    assert reply.heard(3000) == "One two three four. Five"
    assert reply.heard(10_000) == reply.spoken == "One two three four. Five six."


def test_playback_clock_starts_after_the_jitter_buffer():
    reply = reply_with_two_phrases()
    assert reply.played_estimate(100.0) == 0
    assert reply.played_estimate(100.0 + JITTER_BUFFER_S + 1.5001) == 1500
    assert reply.played_estimate(1e6) == 4000  # never more than was sent
    assert reply.still_playing(100.0 + JITTER_BUFFER_S + 3.9)
    assert not reply.still_playing(100.0 + JITTER_BUFFER_S + 4.1)


def test_a_reply_without_audio_has_played_nothing():
    reply = Reply(sample_rate=1000)
    assert reply.played_estimate() == 0 and not reply.still_playing()
