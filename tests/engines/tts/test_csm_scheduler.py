"""The batch thread: several sessions' phrases share frame steps, are admitted round-robin, and each
one gives what it gives alone; a failure there ends every phrase.

fp32 tiny random model on the CPU, greedy (topk 1), so a phrase's codes do not depend on its noise
and must equal the one-at-a-time path's exactly.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import numpy as np
import pytest
import torch

from app.engines.tts.csm.batch import CsmBatch
from app.engines.tts.csm.engine import CsmEngine, batch_scheduler, job_pcm
from app.engines.tts.csm.generator import CsmGenerator, GenerationConfig
from app.engines.tts.csm.scheduler import BatchScheduler, Job
from app.engines.tts.csm.settings import CsmSettings
from app.engines.workers import Worker

from .conftest import tiny_model, varying_frame

GREEDY = {"topk": 1, "first_chunk_frames": 2, "chunk_frames": 4, "max_audio_seconds": 1.2}
CONFIG = GenerationConfig(topk=1, first_chunk_frames=2, chunk_frames=4)


def _wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the batch thread never got there"
        time.sleep(0.01)


def _batched_engine(make_generator) -> CsmEngine:
    generator = make_generator()
    scheduler = batch_scheduler(generator, [copy.deepcopy(generator.mimi)], slots=2, dtype=torch.float32)
    return CsmEngine(generator, CsmSettings(**GREEDY, batch=2), scheduler=scheduler)


def _recording(scheduler: BatchScheduler) -> list[Job]:
    jobs: list[Job] = []
    submit = scheduler.submit
    scheduler.submit = lambda job: jobs.append(job) or submit(job)
    return jobs


def test_two_sessions_phrases_advance_together_each_as_made_alone(make_generator) -> None:
    engine = _batched_engine(make_generator)
    scheduler, texts = engine.scheduler, ("I can help you plan a trip.", "The quick brown fox.")
    jobs, pcm = _recording(scheduler), {}
    voices = {text: engine.new_voice() for text in texts}  # two sessions
    scheduler.hold(True)  # both phrases wait, then join before the first frame

    def speak(text: str) -> None:
        pcm[text] = list(engine.synthesize(text, voice=voices[text]))

    threads = [threading.Thread(target=speak, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    _wait_until(lambda: scheduler.waiting_count() == 2)
    scheduler.hold(False)
    for thread in threads:
        thread.join(timeout=120)
    scheduler.close()
    a, b = sorted(jobs, key=lambda job: texts.index(next(t for t in texts if voices[t] is job.session)))
    assert a.first_frame < b.last_frame and b.first_frame < a.last_frame  # neither waited for the other
    solo = CsmEngine(make_generator(), CsmSettings(**GREEDY))
    for job, text in ((a, texts[0]), (b, texts[1])):
        alone = list(solo.synthesize(text, voice=solo.new_voice()))
        assert job.stop_reason == solo.last_utterance.stop_reason == "max_length"
        assert len(pcm[text]) >= 2 and torch.equal(job.codes, solo.last_utterance.codes)
        # Same codes through the same Mimi weights and chunk shapes on the same kernels.
        np.testing.assert_array_equal(np.concatenate(pcm[text]), np.concatenate(alone))


@pytest.fixture
def solo(text_tokenizer) -> CsmGenerator:
    return CsmGenerator(tiny_model(3), text_tokenizer, mimi=object(), seed=0)


class Silent:
    """A Mimi decoder stand-in: counts resets, returns one zero sample per frame."""

    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        return np.zeros(codes.shape[0], dtype=np.float32)


def _scheduler(slots: int, frame=None) -> BatchScheduler:
    model = tiny_model(3)
    model.setup_caches(torch.float32, slots=slots)
    batch = CsmBatch(model, sampled_vocab=64)

    def varying(tokens, mask, positions, gumbel, *, topk, temperature) -> torch.Tensor:
        return torch.tensor([varying_frame(int(p)) for p in positions[:, 0]])  # never EOS, never stuck

    batch.step.batch_frame = frame or varying
    return BatchScheduler(batch, [Silent() for _ in range(slots)])


def _job(solo: CsmGenerator, session: str, planned: list[str], name: str, frames: int = 4) -> Job:
    def plan():
        planned.append(name)
        return solo.utterance("Hello there.", speaker=0, config=CONFIG, max_frames=frames).prompt

    return Job(session=session, plan=plan, config=CONFIG, rng=torch.Generator())


def test_sessions_are_admitted_round_robin(solo) -> None:
    """A has three phrases, B two, C one, all waiting before the first frame, two slots: C's phrase
    is not stuck behind A's and B's later ones (in submission order it would come fifth)."""
    scheduler, planned = _scheduler(slots=2), []
    scheduler.hold(True)
    jobs = [scheduler.submit(_job(solo, name[0], planned, name)) for name in ("A1", "A2", "A3", "B1", "B2", "C1")]
    scheduler.hold(False)
    for job in jobs:
        assert list(job_pcm(job, None))  # chunks came, then the end
    scheduler.close()
    assert planned == ["A1", "B1", "C1", "A2", "B2", "A3"]
    assert all(job.stop_reason == "max_length" and job.codes.shape[0] == 4 for job in jobs)
    assert sum(decoder.resets for decoder in scheduler.decoders) == 6  # a fresh decoder state per phrase


def test_a_failure_on_the_batch_thread_ends_every_phrase(solo) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    scheduler, planned = _scheduler(slots=2, frame=broken), []
    scheduler.hold(True)
    jobs = [scheduler.submit(_job(solo, session, planned, session)) for session in ("A", "B", "C")]
    scheduler.hold(False)
    for job in jobs:  # two had rows, one was waiting
        with pytest.raises(RuntimeError, match="out of memory"):
            list(job_pcm(job, None))
    assert not scheduler.batch.live() and len(scheduler.decoders) == 2
    scheduler.hold(True)  # the thread carries on: the next phrases run
    scheduler.batch.step.batch_frame = _scheduler(slots=1).batch.step.batch_frame
    job = scheduler.submit(_job(solo, "A", planned, "A2"))
    scheduler.hold(False)
    assert len(list(job_pcm(job, None))) == 2 and job.stop_reason == "max_length"
    scheduler.close()


class _CancelledOnceStarted(threading.Event):
    """Set as soon as its job has sent a chunk, as seen from the batch thread that checks it: set from the
    test's thread after the first chunk, it lost the race to all 40 of the tiny model's frames on a loaded
    machine (the phrase ended "max_length" on a fresh clone)."""

    def __init__(self) -> None:
        super().__init__()
        self.job: Job | None = None

    def is_set(self) -> bool:
        return self.job is not None and self.job.first_frame is not None


def test_a_cancelled_phrase_leaves_and_frees_its_session(solo) -> None:
    scheduler, planned = _scheduler(slots=1), []
    cancel = _CancelledOnceStarted()
    scheduler.hold(True)
    gone = scheduler.submit(_job(solo, "A", planned, "A1", frames=40))
    gone.cancel, cancel.job = cancel, gone
    kept = scheduler.submit(_job(solo, "A", planned, "A2"))
    scheduler.hold(False)
    assert list(job_pcm(kept, None)) and kept.stop_reason == "max_length"
    assert gone.stop_reason == "cancelled" and planned == ["A1", "A2"]
    assert gone.last_frame < 40  # it left long before its 40 frames
    scheduler.close()


def test_batch_setting_and_the_workers_threads(make_generator) -> None:
    with pytest.raises(ValueError, match="batch"):
        CsmSettings(batch=9)
    assert CsmSettings().batch == 1
    assert CsmEngine(make_generator(), CsmSettings(**GREEDY)).concurrency == 1
    engine = _batched_engine(make_generator)
    assert engine.concurrency == 2
    assert Worker("tts", threads=engine.concurrency)._executor._max_workers == 2
    engine.scheduler.close()


def test_a_session_remembers_a_phrase_that_ended_on_eos_before_its_next(make_generator) -> None:
    """Voice memory as on the one-at-a-time path: phrase 1 stops on EOS after 5 frames and is
    remembered on the batch thread; phrase 2 of the same session, already waiting, is planned after
    that, so its prompt holds phrase 1."""
    engine = _batched_engine(make_generator)
    scheduler, voice = engine.scheduler, engine.new_voice()
    jobs = _recording(scheduler)

    def eos_at_six(tokens, mask, positions, gumbel, *, topk, temperature) -> torch.Tensor:
        out = torch.ones(tokens.shape[0], 32, dtype=torch.long)
        for row in scheduler.batch.live():
            out[row.slot] = torch.tensor([0] * 32 if row.frames == 5 else varying_frame(row.frames))
        return out

    scheduler.batch.step.batch_frame = eos_at_six
    scheduler.hold(True)
    streams = [engine.synthesize(text, voice=voice) for text in ("Hello there.", "How are you?")]
    consumers = [threading.Thread(target=list, args=(stream,)) for stream in streams]
    for n, consumer in enumerate(consumers, 1):
        consumer.start()
        _wait_until(lambda n=n: scheduler.waiting_count() == n)  # in this order
    prompts = []
    for job in jobs:
        plan = job.plan
        job.plan = lambda plan=plan: prompts.append(plan()) or prompts[-1]
    scheduler.hold(False)
    for consumer in consumers:
        consumer.join(timeout=120)
    scheduler.close()
    assert [segment.text for segment in voice.segments] == ["Hello there.", "How are you?"]
    assert prompts[0].segments_used == 0 and prompts[1].segments_used == 1
    assert voice.segments[0].codes.shape[0] == jobs[0].codes.shape[0] == 5


def test_a_batched_engine_warms_up_on_its_batch_thread(make_generator) -> None:
    engine = _batched_engine(make_generator)
    jobs = _recording(engine.scheduler)
    engine.warm_up()  # compile is auto: off on a CPU; one short phrase through the batch
    assert len(jobs) == 1 and jobs[0].stop_reason == "max_length" and jobs[0].codes.shape[0] == 12
    assert engine.scheduler.call(threading.current_thread).name == "csm-batch"
    engine.scheduler.close()


def test_the_tts_worker_hands_several_sessions_phrases_to_the_batch(make_generator) -> None:
    """Through the server's Worker.stream: with as many threads as slots, the second session's phrase
    reaches the batch while the first one's is still waiting (one thread would hold it back)."""
    engine = _batched_engine(make_generator)
    scheduler, texts = engine.scheduler, ("Hello there.", "How are you?")
    voices, jobs = {text: engine.new_voice() for text in texts}, _recording(engine.scheduler)
    worker = Worker("tts", threads=engine.concurrency)

    async def consume(text: str) -> list:
        return [chunk async for chunk in worker.stream(
            lambda cancel: engine.synthesize(text, voice=voices[text], cancel=cancel))]

    async def both() -> list:
        scheduler.hold(True)
        tasks = [asyncio.create_task(consume(text)) for text in texts]
        await asyncio.to_thread(_wait_until, lambda: scheduler.waiting_count() == 2)
        scheduler.hold(False)
        return await asyncio.gather(*tasks)

    chunks = asyncio.run(both())
    worker.close()
    scheduler.close()
    assert all(len(spoken) >= 2 for spoken in chunks)
    a, b = jobs
    assert a.first_frame < b.last_frame and b.first_frame < a.last_frame
