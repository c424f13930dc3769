// AudioWorklets: the player of the reply's mono PCM from a queue (~80 ms jitter buffer, silence on underrun,
// linear resampling, a count of the samples of each turn played, the frame where each turn became audible),
// and a microphone tap that reports loudness on the same clock (for measuring latency as heard). "hold"
// pauses the player where it is (the page heard the person start to talk), "resume" plays on from there.
"use strict";

// Enough buffered audio to ride out network jitter without adding noticeable delay.
const JITTER_SECONDS = 0.08;
// Report progress about every 20 ms (blocks of 128 frames): smooth text reveal, few messages.
const PROGRESS_EVERY_BLOCKS = Math.max(1, Math.round((0.02 * sampleRate) / 128));
// A reply is heard from its first output sample above this (-60 dBFS): the faint start of a fade-in is not.
const AUDIBLE = 1e-3;
// The microphone tap sends its blocks' loudness in batches this long (~0.37 s at 22 kHz): few messages.
const TAP_BATCH_BLOCKS = 64;

class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunks = []; // {samples: Float32Array, turn} in arrival order
    this.head = 0; // read index into chunks[0].samples
    this.available = 0; // samples queued, not yet read
    this.playing = false;
    this.ended = false; // audio_end arrived: play out whatever is left, then report "drained"
    this.turn = null; // turn of the samples being played
    this.played = 0; // input samples of this.turn played so far
    this.blocks = 0;
    this.heardTurn = null; // the last turn whose first audible sample was reported
    this.held = false;
    // The page's flush count: "playing" and "drained" carry it, so the page knows the stale ones.
    this.epoch = (options.processorOptions || {}).epoch || 0;
    this.setRate((options.processorOptions || {}).inputRate || sampleRate);
    this.resetInterpolation();
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  setRate(rate) {
    this.inputRate = rate;
    // Input samples per output sample; 1 when the AudioContext took the server's rate.
    this.step = rate / sampleRate;
  }

  // a and b are the input samples around the read position; frac is how far past a it is.
  resetInterpolation() {
    this.a = 0;
    this.b = 0;
    this.frac = 1;
  }

  onMessage(msg) {
    if (msg.type === "chunk" && msg.samples.length) {
      this.chunks.push({ samples: msg.samples, turn: msg.turn });
      this.available += msg.samples.length;
      // Audio after an "end" is the next reply, queued behind the last one: play on, end with it.
      this.ended = false;
    } else if (msg.type === "end") {
      this.ended = true;
    } else if (msg.type === "hold" || msg.type === "resume") {
      if (msg.type === "hold" && !this.held && this.playing) this.port.postMessage({ type: "quiet", at: currentTime });
      this.held = msg.type === "hold";
    } else if (msg.type === "flush") {
      this.epoch = msg.epoch;
      if (this.playing && !this.held) this.port.postMessage({ type: "quiet", at: currentTime });
      this.held = false;
      this.reportProgress();
      this.chunks = [];
      this.head = 0;
      this.available = 0;
      this.playing = false;
      this.ended = false;
      this.heardTurn = null; // a new session numbers its turns from 1 again
      this.resetInterpolation();
    } else if (msg.type === "rate") {
      this.setRate(msg.rate);
    }
  }

  pop() {
    const chunk = this.chunks[0];
    if (chunk.turn !== this.turn) {
      this.reportProgress(); // the last count of the previous turn
      this.turn = chunk.turn;
      this.played = 0;
    }
    const value = chunk.samples[this.head++];
    this.played++;
    if (this.head >= chunk.samples.length) {
      this.chunks.shift();
      this.head = 0;
    }
    this.available--;
    return value;
  }

  reportProgress() {
    if (this.turn !== null) this.port.postMessage({ type: "progress", turn: this.turn, played: this.played });
  }

  shouldStart() {
    return this.available >= this.inputRate * JITTER_SECONDS || (this.ended && this.available > 0);
  }

  drained() {
    this.playing = false;
    this.ended = false;
    this.resetInterpolation();
    this.reportProgress();
    this.port.postMessage({ type: "drained", epoch: this.epoch });
  }

  // Out of samples: silence for the rest of the block, then either finish or re-buffer.
  underrun(out, from) {
    out.fill(0, from);
    if (this.ended) this.drained();
    else this.playing = false;
    return true;
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (this.held) {
      out.fill(0); // paused: nothing consumed, nothing counted as played
      return true;
    }
    if (!this.playing) {
      if (this.ended && this.available === 0) this.drained();
      if (!this.shouldStart()) {
        out.fill(0);
        return true;
      }
      this.playing = true;
      this.port.postMessage({ type: "playing", epoch: this.epoch });
    }
    if (++this.blocks % PROGRESS_EVERY_BLOCKS === 0) this.reportProgress();
    for (let i = 0; i < out.length; i++) {
      while (this.frac >= 1) {
        if (this.available === 0) return this.underrun(out, i);
        this.a = this.b;
        this.b = this.pop();
        this.frac -= 1;
      }
      out[i] = this.a + (this.b - this.a) * this.frac;
      if (this.turn !== this.heardTurn && Math.abs(out[i]) > AUDIBLE) this.reportHeard(currentFrame + i);
      this.frac += this.step;
    }
    return true;
  }

  // Once per turn, one message: the AudioContext frame of its first audible sample (voice-to-voice as heard).
  reportHeard(frame) {
    this.heardTurn = this.turn;
    this.port.postMessage({ type: "audible", turn: this.turn, frame });
  }
}

registerProcessor("pcm-player", PcmPlayer);

/** The microphone's loudness per 128-frame block, on the AudioContext's clock: batches of
 * {frame: the first block's first frame, rms: Float32Array}. Only made when the page is opened with
 * ?tap (benchmarks/bench_heard.py), so that the microphone's time and the reply's are one clock. */
class MicTap extends AudioWorkletProcessor {
  constructor() {
    super();
    this.rms = new Float32Array(TAP_BATCH_BLOCKS);
    this.count = 0;
    this.first = 0;
  }

  process(inputs) {
    const input = inputs[0][0]; // absent while the stream gives nothing: a silent block
    let sum = 0;
    if (input) for (let i = 0; i < input.length; i++) sum += input[i] * input[i];
    if (this.count === 0) this.first = currentFrame;
    this.rms[this.count++] = Math.sqrt(sum / 128);
    if (this.count === TAP_BATCH_BLOCKS) {
      this.port.postMessage({ frame: this.first, rms: this.rms }, [this.rms.buffer]);
      this.rms = new Float32Array(TAP_BATCH_BLOCKS);
      this.count = 0;
    }
    return true;
  }
}

registerProcessor("mic-tap", MicTap);
