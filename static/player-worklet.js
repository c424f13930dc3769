// AudioWorklet that plays the reply's mono PCM from a queue: ~80 ms jitter buffer, silence on underrun, linear resampling.
"use strict";

// Enough buffered audio to ride out network jitter without adding noticeable delay.
const JITTER_SECONDS = 0.08;

class PcmPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunks = []; // Float32Arrays in arrival order
    this.head = 0; // read index into chunks[0]
    this.available = 0; // samples queued, not yet read
    this.playing = false;
    this.ended = false; // audio_end arrived: play out whatever is left, then report "drained"
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
      this.chunks.push(msg.samples);
      this.available += msg.samples.length;
      // Audio after an "end" is the next reply, queued behind the last one: play on, end with it.
      this.ended = false;
    } else if (msg.type === "end") {
      this.ended = true;
    } else if (msg.type === "flush") {
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
    const value = chunk[this.head++];
    if (this.head >= chunk.length) {
      this.chunks.shift();
      this.head = 0;
    }
    this.available--;
    return value;
  }

  shouldStart() {
    return this.available >= this.inputRate * JITTER_SECONDS || (this.ended && this.available > 0);
  }

  drained() {
    this.playing = false;
    this.ended = false;
    this.resetInterpolation();
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
    if (!this.playing) {
      if (this.ended && this.available === 0) this.drained();
      if (!this.shouldStart()) {
        out.fill(0);
        return true;
      }
      this.playing = true;
      this.port.postMessage({ type: "playing" });
    }
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
