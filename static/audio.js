// Browser audio: reply playback (AudioWorklet + AnalyserNode for the speaking animation) and the
// microphone (MediaRecorder in whatever container this browser records, plus a level meter).

// Chromium and Firefox record WebM/Opus or Ogg/Opus; Safari records MP4/AAC. The server probes any of them.
const RECORDER_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/mp4"];
// MediaRecorder chunk size. Chromium encodes 60 ms Opus frames: with 40 each frame is sent as soon as
// it exists (measured: 60 ms apart; with 100, two frames every 120 ms), so the end of speech reaches
// the server ~30 ms sooner on average.
const TIMESLICE_MS = 40;
// Where WebCodecs can encode the microphone's own frames (Chromium), the page writes Ogg/Opus itself,
// one 20 ms packet a page, each sent as soon as it is encoded: the newest audio reaches the server
// ~8 ms old instead of 60-110 ms in MediaRecorder's 60 ms frames (tests' decoder, 2026-11-29).
const OPUS_FRAME_US = 20_000;
const OPUS_BITRATE = 32_000;
// Reply audio queued while the AudioContext is not running (iOS locked, a phone call, a browser that suspended
// it) is given up after this long: its text is shown whole instead of waiting for a voice that never plays.
const STALL_MS = 1500;

/** A 0..1 loudness from an AnalyserNode: RMS on a square-root scale (quiet speech still shows),
 * less a floor so that room noise keeps the animation still. */
export class LevelMeter {
  constructor(analyser) {
    this.analyser = analyser;
    analyser.fftSize = 1024;
    this.buffer = new Float32Array(analyser.fftSize);
    this.smoothed = 0;
  }

  read() {
    this.analyser.getFloatTimeDomainData(this.buffer);
    let sum = 0;
    for (const v of this.buffer) sum += v * v;
    const level = Math.min(1, Math.max(0, Math.sqrt(Math.sqrt(sum / this.buffer.length)) * 2.4 - 0.12));
    // Rise at once, fall slowly: the animation follows syllables without flickering.
    this.smoothed = Math.max(level, this.smoothed * 0.85);
    return this.smoothed;
  }
}

/** Plays the reply PCM of each turn and counts, per turn, the samples actually played. */
export class Player {
  constructor({ workletUrl, onChange, onError }) {
    this.workletUrl = workletUrl;
    this.onChange = onChange; // "playing", "drained", or "failed" (the queued audio was given up)
    this.onError = onError; // (message): why the reply is not heard, in words
    this.failed = false; // the worklet could not load: nothing can play, replies are text only
    this.epoch = 0; // counts flushes: the worklet's "playing"/"drained" from before the last one are stale
    this.stallTimer = 0;
    this.ctx = null;
    this.node = null;
    this.meter = null;
    this.pending = []; // messages for the worklet while its module loads
    this.rate = 0; // the server's sample rate
    this.active = false; // audio of some turn is queued or playing
    this.played = new Map(); // turn -> samples played
    this.accepted = new Set(); // turns whose audio went to the worklet
    // {turn, time}: the AudioContext time of each reply's first audible sample (one entry a reply).
    this.heard = [];
    this.micLevels = []; // the microphone tap's batches, where the page was opened with ?tap
    this.loaded = null; // resolves with the worklet node once its module is in
    this.held = false; // paused while the server judges whether the person barged in
    this.quietAt = []; // ctx.currentTime each time a hold or a flush silenced playing audio
  }

  /** Must run inside a user gesture (click, key, touch): browsers only let one start audio. */
  unlock() {
    if (!this.ctx) {
      setAudioSession();
      this.ctx = createAudioContext(this.rate);
      this.ctx.addEventListener("statechange", () => this.watchStall());
      this.loaded = this.load();
    }
    if (this.ctx.state !== "running") this.ctx.resume().catch(() => {});
  }

  get running() {
    return Boolean(this.ctx && this.ctx.state === "running");
  }

  async load() {
    const ctx = this.ctx;
    try {
      await ctx.audioWorklet.addModule(this.workletUrl);
      const node = new AudioWorkletNode(ctx, "pcm-player", {
        numberOfInputs: 0,
        outputChannelCount: [1],
        processorOptions: { inputRate: this.rate || ctx.sampleRate, epoch: this.epoch },
      });
      // The analyser sits on the playback path, so the animation follows what is really heard.
      const analyser = ctx.createAnalyser();
      node.connect(analyser).connect(ctx.destination);
      node.port.onmessage = (event) => this.onWorkletMessage(event.data);
      this.meter = new LevelMeter(analyser);
      this.node = node;
      this.pending.splice(0).forEach((msg) => node.port.postMessage(msg));
      return node;
    } catch (err) {
      console.warn("voice assistant: the audio player did not load", err);
      this.failed = true;
      this.pending = [];
      this.giveUp("Replies cannot be played in this browser, so they are shown as text.");
      return null;
    }
  }

  /** The queued audio will not be heard: drop it, say why, and let the page show its text. */
  giveUp(message) {
    clearTimeout(this.stallTimer);
    const wasActive = this.active;
    this.flush();
    this.accepted.clear(); // the rest of these replies' audio is dropped as it comes, not queued for later
    this.onError(message);
    if (wasActive || this.failed) this.onChange("failed");
  }

  /** Audio waits while the context is not running: try to resume it; if it stays stopped, give the audio up. */
  watchStall() {
    clearTimeout(this.stallTimer);
    if (!this.ctx || !this.active || this.ctx.state === "running") return;
    this.ctx.resume().catch(() => {});
    this.stallTimer = setTimeout(() => {
      if (this.active && this.ctx.state !== "running") {
        this.giveUp("The device paused the sound (another app, a call or the lock screen), so the reply is shown "
          + "as text. Tap the page to hear the next one.");
      }
    }, STALL_MS);
  }

  /** Listen to the microphone's `source` (a node of this context) on the playback clock: a measuring
   * aid (?tap), not a part of normal use. The tap's silent output goes to `sink` so that it runs. */
  async tapMicrophone(source, sink) {
    if (!(await this.loaded) || source.context !== this.ctx) return;
    const tap = new AudioWorkletNode(this.ctx, "mic-tap", { numberOfInputs: 1, outputChannelCount: [1] });
    tap.port.onmessage = (event) => this.micLevels.push(event.data);
    source.connect(tap).connect(sink);
  }

  post(msg, transfer) {
    if (this.failed) return;
    if (this.node) this.node.port.postMessage(msg, transfer || []);
    else if (this.ctx) this.pending.push(msg);
  }

  setRate(rate) {
    this.rate = rate;
    this.post({ type: "rate", rate });
  }

  /** Reply audio of `turn` begins; false when nothing can play it (no gesture yet). */
  begin(turn, rate) {
    if (!this.ctx || this.failed) return false;
    this.setRate(rate);
    this.accepted.add(turn);
    // Speaking from now on, not from the worklet's first "playing": no flicker while it buffers.
    this.active = true;
    this.watchStall();
    return true;
  }

  /** s16le bytes of `turn` -> float samples for the worklet. */
  chunk(turn, buffer) {
    if (!this.accepted.has(turn)) return;
    const count = buffer.byteLength >> 1;
    const pcm = new Int16Array(buffer, 0, count);
    const samples = new Float32Array(count);
    for (let i = 0; i < count; i++) samples[i] = pcm[i] / 32768;
    this.post({ type: "chunk", turn, samples }, [samples.buffer]);
  }

  end(turn) {
    if (this.accepted.has(turn)) this.post({ type: "end" });
  }

  /** A new server session numbers its turns from 1 again: forget the old turns' counts. */
  newSession() {
    this.flush();
    this.played.clear();
    this.accepted.clear();
  }

  /** Stop at once: everything queued is dropped. */
  flush() {
    this.epoch += 1;
    this.post({ type: "flush", epoch: this.epoch });
    this.active = false;
    this.held = false;
  }

  /** Pause where it is (silent at the next 128-sample block), keeping what is queued. */
  hold() {
    this.post({ type: "hold" });
    this.held = true;
  }

  resume() {
    this.post({ type: "resume" });
    this.held = false;
  }

  playedOf(turn) {
    return this.played.get(turn) || 0;
  }

  level() {
    return this.meter && this.active ? this.meter.read() : 0;
  }

  onWorkletMessage(msg) {
    if (msg.type === "progress") {
      this.played.set(msg.turn, msg.played);
      return;
    }
    if (msg.type === "audible") {
      this.heard.push({ turn: msg.turn, time: msg.frame / this.ctx.sampleRate });
      return;
    }
    if (msg.type === "quiet") {
      this.quietAt.push(msg.at);
      return;
    }
    // A "playing" sent just before the worklet took a flush would turn "Speaking" on for good: dropped.
    if (msg.epoch !== this.epoch) return;
    this.active = msg.type === "playing";
    this.onChange(msg.type);
  }
}

/** iOS: without this, the ring/silent switch can mute Web Audio while the microphone is closed. */
function setAudioSession() {
  try {
    if (navigator.audioSession) navigator.audioSession.type = "play-and-record";
  } catch (err) {
    console.warn("voice assistant: the audio session type was refused", err);
  }
}

function createAudioContext(rate) {
  try {
    return new AudioContext({ sampleRate: rate || undefined, latencyHint: "interactive" });
  } catch (err) {
    // Some browsers refuse unusual rates: the worklet then resamples.
    console.warn("voice assistant: AudioContext refused", rate, "Hz:", err.message);
    return new AudioContext({ latencyHint: "interactive" });
  }
}

/** The microphone: one stream kept while needed, one MediaRecorder (one container) per recording. */
export class Mic {
  /** onSource(context, source, sink), if given, is told of each microphone source node made; onEnded() when the
   * microphone goes away by itself (unplugged, taken by another app, a permission withdrawn). */
  constructor({ onSource = null, onEnded = () => {} } = {}) {
    this.onSource = onSource;
    this.onEnded = onEnded;
    this.stream = null;
    this.opening = 0; // counts opens and closes: a stream granted after a close is not kept
    this.nodes = []; // this stream's audio nodes, disconnected on close so that no chain outlives it
    this.meter = null;
    this.meterCtx = null; // only when the player's context cannot take the mic (Firefox, other rate)
    this.recording = null;
    this.oggOpus = false; // record with OggOpusRecorder (WebCodecs), else MediaRecorder
    this.onVoice = null; // (message) from the page's own voice detector: {type: "voice" | "quiet", ...}
    this.detector = null;
  }

  get open() {
    return Boolean(this.stream);
  }

  async openStream(ctx) {
    if (this.stream) return;
    const opening = ++this.opening;
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    if (opening !== this.opening) { // closed while the browser asked: this stream is nobody's
      stream.getTracks().forEach((track) => track.stop());
      return;
    }
    this.stream = stream;
    const track = stream.getAudioTracks()[0];
    track.addEventListener("ended", () => { if (this.stream === stream) this.onEnded(); });
    this.meter = this.makeMeter(ctx);
    this.oggOpus = await OggOpusRecorder.usable(stream);
  }

  /** Whether the browser cancels the reply's echo on this microphone (false: the assistant may hear itself). */
  get echoCancelled() {
    const track = this.stream && this.stream.getAudioTracks()[0];
    return !track || track.getSettings().echoCancellation !== false;
  }

  makeMeter(ctx) {
    for (const make of [() => ctx, () => (this.meterCtx = new AudioContext())]) {
      try {
        const context = make();
        if (!context) continue;
        const analyser = context.createAnalyser();
        // Through a muted gain to the destination: every engine then runs the analyser, and the
        // user does not hear their own voice.
        const mute = context.createGain();
        mute.gain.value = 0;
        const source = context.createMediaStreamSource(this.stream);
        source.connect(analyser).connect(mute).connect(context.destination);
        this.nodes.push(source, analyser, mute);
        this.listen(context, source, mute);
        if (this.onSource) this.onSource(context, source, mute);
        return new LevelMeter(analyser);
      } catch (err) {
        // Firefox refuses a stream whose rate differs from the context's: try a context of its own.
      }
    }
    return null;
  }

  /** The page's own voice detector (voice-worklet.js) on the echo-cancelled microphone, beside the meter. */
  async listen(context, source, sink) {
    const stream = this.stream;
    try {
      await context.audioWorklet.addModule(new URL("voice-worklet.js", import.meta.url));
      if (this.stream !== stream) return; // closed (and maybe opened again) meanwhile: this source is gone
      const node = new AudioWorkletNode(context, "voice-detector", { numberOfInputs: 1, numberOfOutputs: 1 });
      node.port.onmessage = (event) => { if (this.onVoice) this.onVoice(event.data); };
      source.connect(node).connect(sink); // to the muted gain: every engine runs a node that reaches the output
      this.nodes.push(node);
      this.detector = node;
    } catch (err) {
      console.warn("voice assistant: no voice detector in the page; barge-in waits for the server", err);
    }
  }

  /** Start a recording; onBlob(rec, blob) gets each piece in order. */
  record(onBlob) {
    const recorder = this.oggOpus ? new OggOpusRecorder(this.stream) : new MediaRecorder(this.stream, recorderOptions());
    const rec = { recorder, started: false };
    recorder.ondataavailable = (event) => {
      if (event.data.size > 0) onBlob(rec, event.data);
    };
    recorder.start(TIMESLICE_MS);
    this.recording = rec;
    return rec;
  }

  /** Stop the recording; resolves after its last piece was handed to onBlob. */
  async stopRecording() {
    const rec = this.recording;
    this.recording = null;
    if (!rec || rec.recorder.state === "inactive") return rec;
    const stopped = new Promise((resolve) => rec.recorder.addEventListener("stop", resolve, { once: true }));
    rec.recorder.stop();
    await stopped;
    return rec;
  }

  close() {
    this.opening += 1;
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    if (this.meterCtx) this.meterCtx.close().catch(() => {});
    // The player's context lives on: a chain left connected to its output would run (and be kept) for good.
    this.nodes.splice(0).forEach((node) => node.disconnect());
    if (this.detector) this.detector.port.onmessage = null;
    this.stream = null;
    this.meter = null;
    this.meterCtx = null;
    this.detector = null;
  }

  level() {
    return this.meter && this.recording ? this.meter.read() : 0;
  }
}

/** The microphone's frames -> WebCodecs Opus -> one Ogg page per packet, handed on at once. It has
 * the part of MediaRecorder's surface the page uses: mimeType, state, ondataavailable, start(), stop(),
 * an "error" event if it fails and a "stop" event after the last piece. */
class OggOpusRecorder extends EventTarget {
  static async usable(stream) {
    if (typeof MediaStreamTrackProcessor !== "function" || typeof AudioEncoder !== "function") return false;
    try {
      const { supported } = await AudioEncoder.isConfigSupported(encoderConfig(stream.getAudioTracks()[0]));
      return supported;
    } catch (err) {
      return false;
    }
  }

  constructor(stream) {
    super();
    this.track = stream.getAudioTracks()[0];
    this.mimeType = "audio/ogg;codecs=opus";
    this.state = "inactive";
    this.ondataavailable = null;
    this.reader = null;
    this.stopping = false;
  }

  start() {
    this.state = "recording";
    this.run()
      .catch((err) => {
        console.warn("voice assistant: recording failed", err);
        this.dispatchEvent(new ErrorEvent("error", { error: err, message: String((err && err.message) || err) }));
      })
      .finally(() => {
        this.state = "inactive";
        this.dispatchEvent(new Event("stop"));
      });
  }

  stop() {
    this.stopping = true;
    if (this.reader) this.reader.cancel().catch(() => {});
  }

  async run() {
    const config = encoderConfig(this.track);
    const ogg = new OggWriter();
    let granule = 0; // 48 kHz samples up to the end of the last packet, as Ogg/Opus counts
    const encoder = new AudioEncoder({
      output: (chunk) => {
        const packet = new Uint8Array(chunk.byteLength);
        chunk.copyTo(packet);
        granule += Math.round((chunk.duration || OPUS_FRAME_US) * 0.048);
        // The stream's two header pages go out with its first packet, as MediaRecorder's header does.
        const pages = ogg.sequence === 0 ? opusHeaderPages(ogg, config) : [];
        pages.push(ogg.page(packet, granule));
        this.emit(pages);
      },
      error: (err) => console.warn("voice assistant: Opus encoder failed", err),
    });
    encoder.configure(config);
    // Frames wait here while the page is busy; the default queue (a few frames) would drop them.
    this.reader = new MediaStreamTrackProcessor({ track: this.track, maxBufferSize: 100 }).readable.getReader();
    try {
      while (!this.stopping) {
        const { value: frame, done } = await this.reader.read();
        if (done) break;
        encoder.encode(frame);
        frame.close();
      }
      await encoder.flush(); // the last packets, before "stop"
    } finally {
      if (encoder.state !== "closed") encoder.close();
    }
  }

  emit(pages) {
    if (this.ondataavailable) this.ondataavailable({ data: new Blob(pages, { type: this.mimeType }) });
  }
}

function encoderConfig(track) {
  const { sampleRate = 48_000, channelCount = 1 } = track.getSettings();
  return {
    codec: "opus",
    sampleRate,
    numberOfChannels: channelCount,
    bitrate: OPUS_BITRATE,
    opus: { frameDuration: OPUS_FRAME_US },
  };
}

// Ogg's CRC-32: polynomial 0x04c11db7, not reflected, no final xor.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let bit = 0; bit < 8; bit++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

/** Pages of one Ogg logical stream, a whole packet in each (an Opus packet is far below a page's 64 kB). */
class OggWriter {
  constructor() {
    this.serial = (Math.random() * 0xffffffff) >>> 0;
    this.sequence = 0;
  }

  page(packet, granule, flags = 0) {
    const lacing = new Array(Math.floor(packet.length / 255)).fill(255).concat(packet.length % 255);
    const page = new Uint8Array(27 + lacing.length + packet.length);
    const view = new DataView(page.buffer);
    page.set([0x4f, 0x67, 0x67, 0x53]); // "OggS"
    view.setUint8(5, flags);
    view.setBigUint64(6, BigInt(granule), true);
    view.setUint32(14, this.serial, true);
    view.setUint32(18, this.sequence++, true);
    view.setUint8(26, lacing.length);
    page.set(lacing, 27);
    page.set(packet, 27 + lacing.length);
    let crc = 0;
    for (const byte of page) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ byte) & 0xff]) >>> 0;
    view.setUint32(22, crc, true);
    return page;
  }
}

/** OpusHead (the first page: flag 0x02) and OpusTags. */
function opusHeaderPages(ogg, { numberOfChannels, sampleRate }) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(new TextEncoder().encode("OpusHead"));
  view.setUint8(8, 1); // version
  view.setUint8(9, numberOfChannels);
  view.setUint16(10, 312, true); // pre-skip: libopus's delay at 48 kHz
  view.setUint32(12, sampleRate, true); // the microphone's rate, for information (Opus itself runs at 48 kHz)
  const vendor = new TextEncoder().encode("voice-assistant");
  const tags = new Uint8Array(8 + 4 + vendor.length + 4);
  tags.set(new TextEncoder().encode("OpusTags"));
  new DataView(tags.buffer).setUint32(8, vendor.length, true);
  tags.set(vendor, 12);
  return [ogg.page(head, 0, 0x02), ogg.page(tags, 0)];
}

function recorderOptions() {
  if (!window.MediaRecorder || !MediaRecorder.isTypeSupported) return {};
  const mimeType = RECORDER_TYPES.find((type) => MediaRecorder.isTypeSupported(type));
  return mimeType ? { mimeType } : {};
}

export function micErrorText(err) {
  if (!window.isSecureContext) return "The microphone needs a secure page (https or localhost).";
  if (!navigator.mediaDevices) return "This browser gives no access to a microphone.";
  if (err && err.name === "NotAllowedError") return "Microphone access was refused. Allow it in the browser and try again.";
  if (err && err.name === "NotFoundError") return "No microphone was found.";
  return `The microphone could not start: ${err && err.message ? err.message : err}`;
}
