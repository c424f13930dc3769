// The page's client: microphone and typed text -> WebSocket; events and reply PCM -> conversation,
// speaker and animation. Audio lives in audio.js, the conversation view in chat.js, settings in settings.js.

import { Mic, Player, micErrorText } from "./audio.js";
import { Chat } from "./chat.js";
import { SettingsPanel, helloMessage, loadSettings } from "./settings.js";

// At most this long between tries: a server that restarted is found again within ~5 s, and one try every 4 s
// costs a server that is down nothing.
const MAX_RETRY_MS = 4000;
// The heartbeat: one ping at a time, every few seconds once ready. Nothing at all heard for PONG_TIMEOUT_MS after
// a ping (no pong, no event, no audio) means a half-open socket (sleep, a Wi-Fi change), which the browser would
// show as open for minutes: found within ~7.5 s of the cut. Counted from the ping, not from the last message, so
// that a background tab whose timers the browser slows to one a minute is not taken for dead.
const PING_EVERY_MS = 2500;
const PONG_TIMEOUT_MS = 4000;
const CONNECT_TIMEOUT_MS = 10000; // a socket not ready by then is given up and tried again
const TAP_MS = 350; // push-to-talk: a press shorter than this is a tap (tap to start, tap again to send)
const CLICK_AFTER_POINTER_MS = 600; // the click a pointer press ends with comes within this
const STARTING_RETRY_MS = 2000; // the server is up but its models still load: ask again soon
const IDLE_CLOSE = 1000; // with reason "idle": the server closed a session nobody used (limits.idle_timeout_s)
const PTT_KEEP_MIC_MS = 30000; // push-to-talk keeps the mic open between presses, so no word is lost
// The page pauses a reply as soon as its own detector hears the person; the server's stricter gate then says
// whether it was them (`barge_in`): after ~0.4 s of confident speech, twice that over its own voice, later
// for soft speech (JFK's "ask not" passes 2.5 s on, with the words after it). Without a verdict, the reply
// plays on once the page has heard nothing for a second, or after a few seconds at most.
const HOLD_QUIET_MS = 1000;
const HOLD_MAX_MS = 4000;
const TRUST_AFTER_REJECT_MS = 1000; // after "not the person", the page's detector is not trusted for a while
const LABELS = {
  connecting: "Connecting…",
  idle: "Idle",
  listening: "Listening",
  thinking: "Thinking…",
  speaking: "Speaking",
  error: "Error",
};

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"),
  orb: $("orb"),
  talk: $("talk"),
  talkLabel: $("talk-label"),
  interrupt: $("interrupt"),
  reset: $("reset"),
  form: $("text-form"),
  input: $("text-input"),
  send: $("send"),
  log: $("conversation"),
  announcer: $("announcer"),
  chat: $("chat"),
  emptyHint: $("empty-hint"),
  error: $("error"),
  errorText: $("error-text"),
  reconnect: $("reconnect"),
  errorDismiss: $("error-dismiss"),
  settings: $("settings"),
  openSettings: $("open-settings"),
  settingsReset: $("settings-reset"),
};

const settings = loadSettings();
// What tests (and curious users) can read through window.voiceAssistant.
const record = {
  state: "connecting",
  states: [], // each display state as it was entered, in order
  transcripts: [],
  interims: [],
  replies: [],
  receivedAudioSamples: 0,
  turnEnds: [],
  metrics: [],
  outputLevel: 0,
  outputLevelMax: 0,
  micLevel: 0,
  micLevelMax: 0,
  wakeLock: false,
  bargeIns: [], // {onsetAt, quietAt, verdict}: what the page's detector heard over a reply (ctx seconds)
  frames: 0, // animation frames run: none while nothing moves (idle, reading, typing)
  echoCancelled: null, // the open microphone's echo cancellation, as the browser reports it
};
// refused: the error event of a connection the server turned away before `ready`; idle: its `idle` error, before
// it closed an unused session; asleep: closed so, the page waits for the user to act; waking: they did, and it
// connects (onReady: what they did, done once connected).
const conn = { ws: null, ready: null, refused: null, idle: null, asleep: false, waking: false, onReady: null, retries: 0,
  retryTimer: 0, lost: false, heardAt: 0, pingAt: 0, heartbeat: 0, connectTimer: 0 };
// want: the user wants the mic recording (hands-free on, or the talk button / Space held down).
// tapped: push-to-talk started by a tap, click, Enter or a screen reader, sent by the next one; pressedAt: when the
// pointer went down; pointerDone: that press started here; pointerUpAt: when it ended (the click after it is no tap);
// epoch: counts mic on/off, so that a slow off does not close the stream of a newer on.
const talk = { want: false, starting: false, keyHeld: false, chain: Promise.resolve(), closeTimer: 0, tapped: false,
  pressedAt: 0, pointerDone: false, pointerUpAt: -Infinity, epoch: 0 };
// audioTurn: the turn whose audio frames are arriving; answering: the newest turn the server answers;
// discardUpTo: turns stopped here whose events and frames may still be on the wire.
const view = { serverState: "idle", errorEvent: false, audioTurn: null, answering: -Infinity, discardUpTo: -Infinity };
const wake = { lock: null, pending: false };
// held: a reply paused on the page's own detector, awaiting the server's verdict.
const barge = { held: null, timer: 0, quietTimer: 0, distrustUntil: 0 };

const chat = new Chat(ui.log, ui.chat, ui.announcer);
// ?tap: the microphone is also tapped on the playback clock, for measuring latency as heard (bench_heard.py).
const TAP_MIC = new URLSearchParams(location.search).has("tap");
const mic = new Mic({ onSource: TAP_MIC ? tapMicrophone : null, onEnded: onMicEnded });
mic.onVoice = onLocalVoice;
const player = new Player({
  workletUrl: new URL("player-worklet.js", import.meta.url),
  onChange: onPlayerChange,
  onError: (message) => showError(message),
});
// The orb follows the voice only for those who accept motion; the levels are still measured (and recorded).
const REDUCED_MOTION = window.matchMedia("(prefers-reduced-motion: reduce)");
const panel = new SettingsPanel(ui.settings, settings, () => {
  sendJson(helloMessage(settings)); // the server takes a hello at any time
  render();
});

window.voiceAssistant = Object.freeze({
  get state() { return record.state; },
  get states() { return record.states.slice(); },
  get transcripts() { return record.transcripts.slice(); },
  get interims() { return record.interims.slice(); },
  get replies() { return record.replies.slice(); },
  get receivedAudioSamples() { return record.receivedAudioSamples; },
  get turnEnds() { return record.turnEnds.slice(); },
  get metrics() { return record.metrics.slice(); },
  get outputLevel() { return record.outputLevel; },
  get outputLevelMax() { return record.outputLevelMax; },
  get micLevel() { return record.micLevel; },
  get micLevelMax() { return record.micLevelMax; },
  get wakeLock() { return record.wakeLock; },
  // Voice-to-voice as heard: each reply's first audible sample, and with ?tap the microphone, on one clock.
  get heard() { return player.heard.slice(); },
  get micLevels() { return player.micLevels.map((b) => ({ frame: b.frame, rms: Array.from(b.rms) })); },
  // What the clock does not see: the output's buffers after the worklet, the microphone's before the tap.
  get audioClock() {
    const ctx = player.ctx;
    const track = mic.stream && mic.stream.getAudioTracks()[0];
    return ctx && { sampleRate: ctx.sampleRate, baseLatency: ctx.baseLatency, outputLatency: ctx.outputLatency ?? null,
      micLatency: (track && track.getSettings().latency) ?? null };
  },
  get bargeIns() { return record.bargeIns.map((b) => ({ ...b })); },
  get frames() { return record.frames; },
  get echoCancelled() { return record.echoCancelled; },
  get micOpen() { return mic.open; },
  get settings() { return { ...settings }; },
});

// ------------------------------------------------------------------ state and controls

function displayState() {
  if (!conn.ready) return conn.asleep ? "idle" : conn.lost ? "error" : "connecting";
  if (view.errorEvent) return "error";
  const server = view.serverState;
  if (server === "thinking" || server === "speaking") return server;
  // The server may be done sending while the reply is still playing here.
  if (player.active) return "speaking";
  if (server === "listening" || mic.recording) return "listening";
  return "idle";
}

function render() {
  const state = displayState();
  if (state !== record.state || !record.states.length) record.states.push(state);
  record.state = state;
  document.body.dataset.state = state;
  document.body.dataset.mode = settings.mode;
  // Only touch the live region when the words change, so screen readers are not spammed.
  if (ui.state.textContent !== LABELS[state]) ui.state.textContent = LABELS[state];
  renderTalk();
  const ready = Boolean(conn.ready);
  const wakes = conn.asleep || conn.waking; // sending or talking connects again, then is done
  ui.send.disabled = !ready && !wakes;
  ui.reset.disabled = !ready;
  ui.settingsReset.disabled = !ready;
  ui.interrupt.disabled = !ready || !isReplying();
  ui.emptyHint.hidden = !chat.empty;
  syncWakeLock();
  startTicking();
}

function renderTalk() {
  const recording = Boolean(mic.recording) || talk.starting;
  const ptt = settings.mode === "push_to_talk";
  // Not disabled while the mic starts: that would drop keyboard focus; presses are ignored instead.
  ui.talk.disabled = !conn.ready && !conn.asleep && !conn.waking;
  ui.talk.setAttribute("aria-busy", String(talk.starting));
  ui.talk.setAttribute("aria-pressed", String(recording));
  const pttLabel = !recording ? "Hold or tap to talk" : talk.tapped ? "Tap to send" : "Release to send";
  const label = ptt ? pttLabel : recording ? "Stop talking" : "Start talking";
  if (ui.talkLabel.textContent !== label) ui.talkLabel.textContent = label;
}

function isReplying() {
  return player.active || view.serverState === "thinking" || view.serverState === "speaking";
}

// notice: news that is not a fault (the server is still starting), shown without the alarm colour.
function showError(message, { reconnect = false, notice = false } = {}) {
  ui.errorText.textContent = message;
  ui.reconnect.hidden = !reconnect;
  ui.error.classList.toggle("notice", notice);
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.errorText.textContent = "";
}

// ------------------------------------------------------------------ WebSocket

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${document.body.dataset.wsPath || "/ws"}`;
}

function connect() {
  clearTimeout(conn.retryTimer);
  if (conn.ws) return;
  const ws = new WebSocket(wsUrl());
  ws.binaryType = "arraybuffer";
  ws.onmessage = (event) => {
    if (ws !== conn.ws) return;
    conn.heardAt = performance.now(); // anything heard says the socket works
    if (typeof event.data === "string") onEvent(JSON.parse(event.data));
    else onPcm(event.data);
  };
  ws.onclose = (event) => onClose(ws, event);
  conn.ws = ws;
  // A socket stuck connecting (a server that takes the connection but never answers) is given up in time.
  conn.connectTimer = setTimeout(() => { if (ws === conn.ws && !conn.ready) abandonSocket(ws); }, CONNECT_TIMEOUT_MS);
  render();
}

/** Give a socket up now, as if it had closed: its own close event may come minutes later, or never. */
function abandonSocket(ws, reason = "no answer") {
  try {
    ws.close(4000, reason);
  } catch (err) {
    // Closing a socket that is still connecting may throw in some browsers; it is dropped all the same.
  }
  onClose(ws, { code: 4000, reason });
}

/** Ping while ready; a ping left unanswered for PONG_TIMEOUT_MS means the socket is half-open: drop it, reconnect. */
function startHeartbeat(ws) {
  clearInterval(conn.heartbeat);
  conn.pingAt = 0;
  conn.heartbeat = setInterval(() => {
    if (ws !== conn.ws) return clearInterval(conn.heartbeat);
    const waiting = conn.pingAt > conn.heardAt; // nothing heard since the last ping
    if (waiting && performance.now() - conn.pingAt > PONG_TIMEOUT_MS) abandonSocket(ws, "heartbeat");
    else if (!waiting) ping();
  }, PING_EVERY_MS);
}

function ping() {
  conn.pingAt = performance.now();
  sendJson({ type: "ping" });
}

/** Back online, or the page seen again (a laptop that woke): check the socket now rather than at the next beat. */
function checkConnection() {
  if (conn.asleep) return;
  if (conn.ready && conn.pingAt <= conn.heardAt) ping();
  else if (!conn.ws) {
    conn.retries = 0;
    connect();
  }
}

function onClose(ws, event) {
  if (ws !== conn.ws) return;
  clearInterval(conn.heartbeat);
  clearTimeout(conn.connectTimer);
  const wasReady = Boolean(conn.ready);
  const starting = conn.refused && conn.refused.code === "loading";
  const idle = conn.idle || (event.code === IDLE_CLOSE && event.reason === "idle");
  conn.ws = null;
  conn.ready = null;
  conn.lost = !starting && !idle;
  conn.waking = false;
  conn.onReady = null;
  micOff({ tellServer: false, close: true });
  player.flush();
  view.serverState = "idle";
  chat.abandon("connection lost");
  if (idle) {
    fallAsleep(conn.idle ? conn.idle.message : "Disconnected after a while without use.");
    return;
  }
  // Back off so a server that is down is not hammered; the button retries at once.
  const delay = starting ? STARTING_RETRY_MS : Math.min(1000 * 2 ** conn.retries, MAX_RETRY_MS);
  conn.retries += starting ? 0 : 1;
  conn.retryTimer = setTimeout(connect, delay);
  const why = conn.refused ? conn.refused.message
    : event.reason === "heartbeat" ? "The server stopped answering."
      : wasReady ? "Disconnected from the server." : "Cannot reach the server.";
  conn.refused = null;
  if (starting) showError(why, { notice: true });
  else showError(`${why} Retrying in ${Math.round(delay / 1000)} s…`, { reconnect: true });
  render();
}

/** The server closed the session for want of use: no retry loop; the user's next action connects again. */
function fallAsleep(message) {
  conn.idle = null;
  conn.refused = null;
  conn.asleep = true;
  conn.retries = 0;
  showError(message, { reconnect: true, notice: true });
  render();
}

/** Connect again after an idle close, then do what the user did (`then`) once the session is ready. */
function wakeUp(then = null) {
  conn.asleep = false;
  conn.waking = true;
  hideError();
  connect(); // no-op while it connects already
  conn.onReady = then || conn.onReady;
  render();
}

function sendJson(message) {
  if (conn.ws && conn.ws.readyState === WebSocket.OPEN) conn.ws.send(JSON.stringify(message));
}

// ------------------------------------------------------------------ server events

const handlers = {
  pong() {}, // the heartbeat's answer: being heard is all it says
  ready(m) {
    conn.ready = m;
    clearTimeout(conn.connectTimer);
    startHeartbeat(conn.ws);
    conn.retries = 0;
    conn.lost = false;
    // A new server session: turn ids start again and it knows nothing of the settings yet.
    chat.newSession();
    Object.assign(view, { serverState: "idle", errorEvent: false, audioTurn: null, answering: -Infinity, discardUpTo: -Infinity });
    player.newSession();
    player.setRate(m.sample_rate);
    panel.showVoiceChoice(/csm/i.test(m.tts || ""));
    sendJson(helloMessage(settings));
    if (!ui.reconnect.hidden || ui.error.classList.contains("notice")) hideError();
    const then = conn.onReady;
    conn.waking = false;
    conn.onReady = null;
    if (then) then();
  },
  state(m) {
    view.serverState = m.state;
    view.errorEvent = false;
  },
  speech_started(m) {
    document.body.dataset.hearing = "true";
    chat.speechStarted(m.turn);
    // Barge-in: the user talks over the reply, so it stops at once (the server cancels it too).
    if (player.active) stopReply();
  },
  speech_stopped() { delete document.body.dataset.hearing; },
  barge_in(m) {
    // The hold it answers (speech_started, just before a confirmation, may have stopped the reply already).
    const last = record.bargeIns[record.bargeIns.length - 1];
    if (last && !last.verdict) {
      last.verdict = m.confirmed ? "confirmed" : "rejected";
      last.verdictAt = player.ctx ? player.ctx.currentTime : null; // where a page without its detector stops
    }
    if (m.confirmed) {
      if (player.active) stopReply();
    } else if (barge.held) {
      barge.distrustUntil = performance.now() + TRUST_AFTER_REJECT_MS;
      resumeReply();
    }
  },
  transcript(m) {
    (m.final ? record.transcripts : record.interims).push(m.text);
    chat.transcript(m);
    if (m.final) view.answering = Math.max(view.answering, m.turn);
  },
  reply_text(m) {
    view.answering = Math.max(view.answering, m.turn);
    chat.replyText(m.turn, m.delta);
  },
  audio_start(m) {
    view.audioTurn = m.turn;
    if (isDiscarded(m.turn)) return;
    chat.audioStarted(m.turn, m.sample_rate, player.begin(m.turn, m.sample_rate));
  },
  audio_end(m) {
    chat.audioEnded(m.turn, m.samples);
    if (!isDiscarded(m.turn)) player.end(m.turn);
  },
  metrics(m) {
    record.metrics.push(Object.freeze(m));
    chat.metrics(m);
  },
  turn_end(m) {
    record.turnEnds.push(Object.freeze(m));
    if (m.reply) record.replies.push(m.reply);
    const interrupted = m.reason === "interrupted";
    if (interrupted) discardUpTo(m.turn);
    if (interrupted && view.audioTurn === m.turn && player.active) player.flush();
    chat.finish(m, player.active && player.accepted.has(m.turn));
  },
  error(m) {
    // Before `ready`: the server turns the connection away (models still loading, or failed) and closes it.
    if (!conn.ready) conn.refused = m;
    else if (m.code === "idle") conn.idle = m; // the close follows: onClose says it
    else view.errorEvent = true;
    showError(m.message || m.code, { notice: m.code === "loading" || m.code === "idle" });
  },
};

function onEvent(message) {
  const handler = handlers[message.type];
  if (!handler) {
    console.warn("voice assistant: unknown event", message.type);
    return;
  }
  // Late events of a turn dropped here (New conversation, a stop) must not open a new bubble.
  const stale = typeof message.turn === "number" && isDiscarded(message.turn) && !chat.has(message.turn);
  if (!stale || message.type === "turn_end") handler(message);
  render();
}

function onPcm(buffer) {
  record.receivedAudioSamples += buffer.byteLength >> 1;
  // After a local interrupt the frames of the stopped reply still arrive: they are dropped.
  if (view.audioTurn !== null && !isDiscarded(view.audioTurn)) player.chunk(view.audioTurn, buffer);
}

function isDiscarded(turn) {
  return turn <= view.discardUpTo;
}

function discardUpTo(turn) {
  view.discardUpTo = Math.max(view.discardUpTo, turn);
}

// ------------------------------------------------------------------ reply audio

function onPlayerChange(kind) {
  if (kind === "drained") chat.drained();
  if (kind === "failed") chat.audioFailed(); // its text, shown whole: the words are not lost with the voice
  render();
}

/** The page's own detector heard the person over the reply: pause it now, while the server judges. */
function onLocalVoice(message) {
  if (barge.held) {
    clearTimeout(barge.quietTimer); // still talking: keep waiting; stopped: wait a second more
    if (message.type === "quiet") barge.quietTimer = setTimeout(() => holdTimedOut(barge.held), HOLD_QUIET_MS);
    return;
  }
  if (message.type !== "voice" || !player.active || player.held || !mic.recording) return;
  if (performance.now() < barge.distrustUntil) return;
  player.hold();
  const quiet = player.quietAt.length;
  barge.held = { onsetAt: message.onsetAt, heardAt: message.at, verdict: null, verdictAt: null };
  // When the worklet fell silent, from its own message whenever that comes (its clock is the detector's: one
  // AudioContext); read when asked, as a timer could read it before the message arrived.
  Object.defineProperty(barge.held, "quietAt", { enumerable: true, get: () => player.quietAt[quiet] ?? null });
  record.bargeIns.push(barge.held);
  const held = barge.held;
  barge.timer = setTimeout(() => holdTimedOut(held), HOLD_MAX_MS);
  render();
}

function holdTimedOut(held) {
  if (!held || barge.held !== held) return;
  held.verdict = "timeout";
  resumeReply();
}

function resumeReply() {
  clearTimeout(barge.timer);
  clearTimeout(barge.quietTimer);
  barge.held = null;
  if (player.held) player.resume();
  render();
}

/** Stop the reply now (Stop button, Esc, barge-in, push-to-talk press): tell the server how much was heard. */
function stopReply() {
  clearTimeout(barge.timer);
  clearTimeout(barge.quietTimer);
  barge.held = null;
  // The server's reply in progress is the newest turn; 0 played if its audio is still queued here.
  const current = Math.max(view.audioTurn ?? -Infinity, view.answering);
  const played = Number.isFinite(current) ? player.playedOf(current) : 0;
  player.flush();
  chat.flushed();
  discardUpTo(current);
  sendJson({ type: "interrupt", played_samples: played });
  render();
}

// Levels and text reveal follow the audio clock, once per frame, but only while something moves: an idle page
// (or one left open on a phone) runs no frames at all.
let ticking = false;

function needsFrames() {
  return record.state === "speaking" || record.state === "listening" || chat.revealing;
}

function startTicking() {
  if (ticking || !needsFrames()) return;
  ticking = true;
  requestAnimationFrame(tick);
}

function tick() {
  record.frames += 1;
  const out = player.level();
  const voice = mic.level();
  record.outputLevel = out;
  record.outputLevelMax = Math.max(record.outputLevelMax, out);
  record.micLevel = voice;
  record.micLevelMax = Math.max(record.micLevelMax, voice);
  const level = record.state === "speaking" ? out : record.state === "listening" ? voice : 0;
  ui.orb.style.setProperty("--level", REDUCED_MOTION.matches ? "0" : level.toFixed(3));
  chat.reveal((turn) => player.playedOf(turn));
  ticking = needsFrames();
  if (ticking) requestAnimationFrame(tick);
  else ui.orb.style.setProperty("--level", "0");
}

// ------------------------------------------------------------------ microphone

function tapMicrophone(_context, source, sink) {
  player.tapMicrophone(source, sink).catch((err) => console.warn("voice assistant: no microphone tap", err));
}

// Sends run one after another so that audio_start, every piece and audio_stop keep their order.
function enqueue(task) {
  talk.chain = talk.chain.then(task).catch((err) => console.warn("voice assistant: send failed", err));
}

/** Make sure a recording runs (the stream is opened first if needed). */
async function micOn() {
  talk.want = true;
  talk.epoch += 1;
  if (talk.starting || mic.recording) return;
  talk.starting = true;
  render();
  try {
    // Pressed off and on again while the browser was opening it: that stream was dropped (Mic.openStream), and
    // the last press wants one, so ask again.
    do await mic.openStream(player.ctx); while (talk.want && !mic.open);
    if (!talk.want) return; // let go before the microphone was ready
    adviseOnEcho();
    const rec = mic.record((r, blob) => enqueue(() => sendBlob(r, blob)));
    rec.ws = conn.ws;
    // A recording that fails (its encoder, the device) is said in words, and the microphone goes off:
    // the page must not go on showing "Listening" with nothing sent.
    rec.recorder.addEventListener("error", (event) => {
      const why = (event.error && event.error.message) || event.message || "the recording failed";
      showError(`The microphone stopped: ${why}`);
      if (mic.recording === rec) micOff({ close: true });
    });
  } catch (err) {
    talk.want = false;
    showError(micErrorText(err));
  } finally {
    talk.starting = false;
    if (!talk.want && settings.mode === "hands_free") mic.close();
    render();
  }
}

// audio_start goes out just before the first piece (the container header), naming the container recorded.
async function sendBlob(rec, blob) {
  const bytes = await blob.arrayBuffer();
  if (rec.ws !== conn.ws || !rec.ws || rec.ws.readyState !== WebSocket.OPEN) return;
  if (!rec.started) {
    rec.started = true;
    rec.ws.send(JSON.stringify({ type: "audio_start", mime_type: rec.recorder.mimeType || blob.type }));
  }
  rec.ws.send(bytes);
}

async function micOff({ tellServer = true, close = false } = {}) {
  talk.want = false;
  talk.tapped = false;
  const epoch = ++talk.epoch;
  const stopping = mic.stopRecording(); // "stop" fires after the last piece, so audio_stop follows it
  render();
  const rec = await stopping;
  // Talk pressed (even pressed and let go) while the recorder flushed: a newer on/off owns the stream now.
  if (close && epoch === talk.epoch) mic.close();
  if (rec && tellServer) {
    enqueue(() => {
      if (rec.started && rec.ws === conn.ws) sendJson({ type: "audio_stop" });
    });
  }
  render();
}

/** The microphone went away by itself (unplugged, taken by another app): say so, and turn it off cleanly. */
function onMicEnded() {
  showError("The microphone was disconnected. Plug it in (or allow it again), then press the talk button.");
  micOff({ close: true });
}

/** Without echo cancellation the assistant hears its own voice through the speaker and answers itself. Said once
 * a visit, not at every press. */
function adviseOnEcho() {
  const advised = record.echoCancelled === false;
  record.echoCancelled = mic.echoCancelled;
  if (!record.echoCancelled && !advised) {
    showError("This browser does not cancel echo on this microphone: use headphones, or the assistant may hear "
      + "itself.", { notice: true });
  }
}

// ------------------------------------------------------------------ user actions

/** Hands-free: the button toggles the microphone; the server finds the end of each turn. */
function toggleTalk() {
  player.unlock();
  view.errorEvent = false;
  if (talk.want || mic.recording) micOff({ close: true });
  else micOn();
}

/** Push-to-talk: a turn is exactly what is said while the button (or Space) is held. */
function pressTalk() {
  player.unlock();
  view.errorEvent = false;
  clearTimeout(talk.closeTimer);
  if (isReplying()) stopReply();
  micOn();
}

function releaseTalk() {
  talk.tapped = false;
  if (!talk.want && !mic.recording) return;
  micOff();
  clearTimeout(talk.closeTimer);
  talk.closeTimer = setTimeout(() => { if (!talk.want) mic.close(); render(); }, PTT_KEEP_MIC_MS);
}

function onTalkClick() {
  player.unlock(); // iOS wants audio started from a click/touchend, also in push-to-talk
  if (conn.asleep || conn.waking) {
    wakeUp(settings.mode === "hands_free" ? toggleTalk : null); // push-to-talk: the next press talks
    return;
  }
  if (settings.mode === "hands_free" && conn.ready && !talk.starting) toggleTalk();
  else if (settings.mode === "push_to_talk") onTalkTapped();
}

/** Push-to-talk without holding: a click from Enter, a screen reader or switch access starts a turn, the next
 * one sends it. A pointer's press and release were handled already: its click is not a second tap. */
function onTalkTapped() {
  if (performance.now() - talk.pointerUpAt < CLICK_AFTER_POINTER_MS || !conn.ready) return;
  if (talk.tapped) {
    releaseTalk();
    return;
  }
  pressTalk();
  talk.tapped = true;
  render();
}

function onTalkPointerDown(event) {
  if (settings.mode === "push_to_talk" && conn.asleep) wakeUp();
  if (settings.mode !== "push_to_talk" || !conn.ready || event.button !== 0) return;
  event.preventDefault(); // no focus-steal, text selection or long-press menu while held
  ui.talk.setPointerCapture(event.pointerId); // a finger sliding off the button still releases it
  talk.pointerDone = true;
  talk.pressedAt = performance.now();
  if (!talk.tapped) pressTalk(); // else this press is the tap that sends, on its release
}

/** A hold sends on release; a tap (a short press) keeps listening until the next tap. */
function onTalkPointerUp(event) {
  if (settings.mode !== "push_to_talk" || !talk.pointerDone) return;
  talk.pointerDone = false;
  talk.pointerUpAt = performance.now();
  const short = performance.now() - talk.pressedAt < TAP_MS;
  if (event.type === "pointerup" && short && !talk.tapped && talk.want) {
    talk.tapped = true;
    render();
    return;
  }
  releaseTalk();
}

function onSubmit(event) {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (text && (conn.asleep || conn.waking)) wakeUp(() => ui.form.requestSubmit()); // sent once connected
  if (!text || !conn.ready) return;
  view.errorEvent = false;
  player.unlock();
  if (isReplying()) stopReply(); // a new message replaces the reply being spoken
  sendJson({ type: "text", text });
  chat.typed(text);
  ui.input.value = "";
  render();
}

function onReset() {
  sendJson({ type: "reset" });
  player.flush();
  // The reply being answered is cancelled; its frames may still be on the wire.
  discardUpTo(Math.max(view.audioTurn ?? -Infinity, view.answering));
  chat.clear();
  hideError();
  view.errorEvent = false;
  if (ui.settings.open) ui.settings.close();
  render();
}

function isTextField(el) {
  return Boolean(el) && (el.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(el.tagName));
}

// Space talks (held: push-to-talk) unless the user is typing or another button has focus; Esc stops the reply.
function onKeyDown(event) {
  if (ui.settings.open || event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.key === "Escape") {
    if (isReplying()) stopReply();
    return;
  }
  if (event.key !== " " || isTextField(event.target)) return;
  if (event.target.tagName === "BUTTON" && event.target !== ui.talk) return;
  event.preventDefault(); // no page scroll, no native click on the talk button
  if ((conn.asleep || conn.waking) && !event.repeat) wakeUp(settings.mode === "hands_free" ? toggleTalk : null);
  if (event.repeat || !conn.ready) return;
  talk.keyHeld = true;
  if (settings.mode === "push_to_talk") pressTalk();
  else toggleTalk();
}

function onKeyUp(event) {
  if (event.key !== " " || !talk.keyHeld) return;
  event.preventDefault();
  talk.keyHeld = false;
  if (settings.mode === "push_to_talk") releaseTalk();
}

function onSettingsChanged() {
  // Leaving push-to-talk mid-press, or changing mode with the mic on: start clean.
  if (mic.recording || mic.open) micOff({ close: true });
}

function onReconnect() {
  hideError();
  conn.retries = 0;
  if (conn.asleep) wakeUp();
  else if (conn.ws && !conn.ready) {
    const stuck = conn.ws; // still connecting: start over now instead of waiting on it
    conn.ws = null;
    stuck.onclose = null;
    clearTimeout(conn.connectTimer);
    stuck.close();
    connect();
  } else connect();
}

function onTyping() {
  if (conn.asleep) wakeUp(); // connected again by the time the message is sent
}

// ------------------------------------------------------------------ screen wake lock

// Keep the screen on while a conversation is under way (where the browser has the Wake Lock API).
async function syncWakeLock() {
  if (!("wakeLock" in navigator) || wake.pending) return;
  const busy = Boolean(mic.recording) || talk.want || isReplying();
  const want = busy && document.visibilityState === "visible";
  if (want && !wake.lock) {
    wake.pending = true;
    try {
      wake.lock = await navigator.wakeLock.request("screen");
      wake.lock.addEventListener("release", () => { wake.lock = null; record.wakeLock = false; });
      record.wakeLock = true;
    } catch (err) {
      // Refused (battery saver, no user activation yet): the screen may sleep, nothing else breaks.
    } finally {
      wake.pending = false;
    }
  } else if (!want && wake.lock) {
    const lock = wake.lock;
    wake.lock = null;
    record.wakeLock = false;
    lock.release().catch(() => {});
  }
}

function onVisibilityChange() {
  // The browser drops the wake lock when the page is hidden; a held push-to-talk key or finger is let go.
  if (document.visibilityState === "hidden" && settings.mode === "push_to_talk") releaseTalk();
  if (document.visibilityState === "visible") checkConnection();
  syncWakeLock();
}

// ------------------------------------------------------------------ wiring

ui.talk.addEventListener("click", onTalkClick);
ui.talk.addEventListener("pointerdown", onTalkPointerDown);
ui.talk.addEventListener("pointerup", onTalkPointerUp);
ui.talk.addEventListener("pointercancel", onTalkPointerUp);
ui.talk.addEventListener("contextmenu", (event) => event.preventDefault());
ui.form.addEventListener("submit", onSubmit);
ui.input.addEventListener("input", onTyping);
ui.interrupt.addEventListener("click", stopReply);
ui.reset.addEventListener("click", onReset);
ui.settingsReset.addEventListener("click", onReset);
ui.reconnect.addEventListener("click", onReconnect);
ui.errorDismiss.addEventListener("click", hideError);
ui.openSettings.addEventListener("click", () => ui.settings.showModal());
ui.settings.addEventListener("change", (event) => { if (event.target.name === "mode") onSettingsChanged(); });
document.addEventListener("keydown", onKeyDown);
document.addEventListener("keyup", onKeyUp);
document.addEventListener("visibilitychange", onVisibilityChange);
window.addEventListener("online", checkConnection);
window.addEventListener("blur", () => { if (talk.keyHeld) onKeyUp({ key: " ", preventDefault() {} }); });
connect();
render();
