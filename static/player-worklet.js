// AudioWorklet that plays the reply's mono PCM from a queue: ~80 ms jitter buffer, silence on underrun,
// linear resampling, and a count of the samples of each turn actually played (for text reveal and barge-in).
// "hold" pauses it where it is (the page heard the person start to talk), "resume" plays on from there.
"use strict";

// Enough buffered audio to ride out network jitter without adding noticeable delay.
const JITTER_SECONDS = 0.08;
// Report progress about every 20 ms (blocks of 128 frames): smooth text reveal, few messages.
const PROGRESS_EVERY_BLOCKS = Math.max(1, Math.round((0.02 * sampleRate) / 128));

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
    this.held = false;
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
      if (this.playing && !this.held) this.port.postMessage({ type: "quiet", at: currentTime });
      this.held = false;
      this.reportProgress();
      this.chunks = [];
      this.head = 0;
      this.available = 0;
      this.playing = false;
      this.ended = false;
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
    this.port.postMessage({ type: "drained" });
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
      this.port.postMessage({ type: "playing" });
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
      this.frac += this.step;
    }
    return true;
  }
}

registerProcessor("pcm-player", PcmPlayer);
