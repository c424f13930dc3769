// AudioWorklet that listens for the person on the echo-cancelled microphone, in the page, so that a reply can
// be paused the moment they speak instead of after the server's verdict (a round trip and its stricter gate).
// Energy over an adaptive noise floor, and a zero-crossing rate voices stay under (hiss and clicks do not):
// cheap, no model; the server's gate decides whether it really was the person (the `barge_in` event).
"use strict";

const FRAME_S = 0.01;
const ONSET_S = 0.12; // this much speech-like sound in a run: the person is talking ("voice")
const GAP_S = 0.06; // a shorter gap (between syllables) does not break a run
const QUIET_S = 0.3; // this much without it: they stopped ("quiet")
const MARGIN_DB = 12; // above the noise floor
const MIN_DB = -50; // and loud enough to be a voice near the microphone
const MAX_CROSSINGS_PER_S = 4000; // voiced speech crosses zero 100-1500 times a second, hiss ~half the rate
const FLOOR_RISE_DB = 0.03; // per frame (3 dB/s): a steady noise becomes the floor, a voice stays above it

class VoiceDetector extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = Math.max(1, Math.round(sampleRate * FRAME_S));
    this.sum = 0;
    this.crossings = 0;
    this.count = 0;
    this.last = 0;
    this.floorDb = -60;
    this.voiced = 0; // seconds of speech-like frames in the run
    this.gap = 0; // seconds since the last one
    this.talking = false;
    this.onsetAt = 0; // currentTime of the run's first speech-like frame
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    for (let i = 0; i < input.length; i++) {
      const x = input[i];
      this.sum += x * x;
      if (x >= 0 !== this.last >= 0) this.crossings++;
      this.last = x;
      if (++this.count === this.frame) this.endFrame(currentTime + (i + 1) / sampleRate);
    }
    return true;
  }

  endFrame(at) {
    const db = 10 * Math.log10(this.sum / this.count + 1e-12);
    const crossingsPerS = this.crossings / FRAME_S;
    this.sum = 0;
    this.crossings = 0;
    this.count = 0;
    // The floor falls at once to a quieter frame and rises slowly, so that it follows the room, not the voice.
    this.floorDb = db < this.floorDb ? db : this.floorDb + FLOOR_RISE_DB;
    const speechLike = db > this.floorDb + MARGIN_DB && db > MIN_DB && crossingsPerS < MAX_CROSSINGS_PER_S;
    if (speechLike) {
      if (this.voiced === 0) this.onsetAt = at - FRAME_S;
      this.voiced += FRAME_S;
      this.gap = 0;
      if (!this.talking && this.voiced >= ONSET_S - 1e-6) {
        this.talking = true;
        this.port.postMessage({ type: "voice", onsetAt: this.onsetAt, at });
      }
      return;
    }
    this.gap += FRAME_S;
    if (this.gap >= GAP_S) this.voiced = 0;
    if (this.talking && this.gap >= QUIET_S) {
      this.talking = false;
      this.port.postMessage({ type: "quiet", at });
    }
  }
}

registerProcessor("voice-detector", VoiceDetector);
