// The page's client: microphone (WebM/Opus) and typed text -> WebSocket; events and reply PCM -> conversation + AudioWorklet.
"use strict";

(() => {
  const TIMESLICE_MS = 100; // MediaRecorder chunk size: small enough for the server's end-of-turn VAD
  const PREFERRED_MIME = "audio/webm;codecs=opus";
  const MAX_RETRY_MS = 15000;
  const LABELS = {
    connecting: "Connecting…",
    idle: "Idle",
    listening: "Listening",
    thinking: "Thinking…",
    speaking: "Speaking",
    error: "Error",
  };
  // Resolved against this script so the page works under any static prefix.
  const WORKLET_URL = new URL("player-worklet.js", document.currentScript.src);

  const $ = (id) => document.getElementById(id);
  const ui = {
    state: $("state"),
    talk: $("talk"),
    talkLabel: $("talk-label"),
    interrupt: $("interrupt"),
    reset: $("reset"),
    form: $("text-form"),
    input: $("text-input"),
    send: $("send"),
    log: $("conversation"),
    emptyHint: $("empty-hint"),
    error: $("error"),
    errorText: $("error-text"),
    reconnect: $("reconnect"),
    errorDismiss: $("error-dismiss"),
  };

  // What tests (and curious users) can read through window.voiceAssistant.
  const record = {
    state: "connecting",
    transcripts: [],
    replies: [],
    receivedAudioSamples: 0,
    turnEnds: [],
    metrics: [],
  };
  const conn = { ws: null, ready: null, retries: 0, retryTimer: 0, lost: false };
  const mic = { on: false, starting: false, rec: null, chain: Promise.resolve() };
  // audioTurn: the turn whose audio is arriving; discardUpTo: turns stopped here whose frames may still be on the wire.
  const player = { ctx: null, node: null, pending: [], active: false, rate: 0, audioTurn: null, discardUpTo: -Infinity };
  const view = { serverState: "idle", errorEvent: false, turns: new Map(), pendingTurn: null, lastTurn: -Infinity };

  // ------------------------------------------------------------------ read-only test hook

  window.voiceAssistant = Object.freeze({
    get state() { return record.state; },
    get transcripts() { return record.transcripts.slice(); },
    get replies() { return record.replies.slice(); },
    get receivedAudioSamples() { return record.receivedAudioSamples; },
    get turnEnds() { return record.turnEnds.slice(); },
    get metrics() { return record.metrics.slice(); },
  });

  // ------------------------------------------------------------------ state label and controls

  function displayState() {
    if (!conn.ready) return conn.lost ? "error" : "connecting";
    if (view.errorEvent) return "error";
    const server = view.serverState;
    if (server === "thinking" || server === "speaking") return server;
    // The server may be done sending while the reply is still playing here.
    if (player.active) return "speaking";
    if (server === "listening" || mic.on) return "listening";
    return "idle";
  }

  function render() {
    const state = displayState();
    record.state = state;
    document.body.dataset.state = state;
    // Only touch the live region when the words change, so screen readers are not spammed.
    if (ui.state.textContent !== LABELS[state]) ui.state.textContent = LABELS[state];
    const ready = Boolean(conn.ready);
    // Not disabled while the mic starts: that would drop keyboard focus; clicks are ignored instead.
    ui.talk.disabled = !ready;
    ui.talk.setAttribute("aria-busy", String(mic.starting));
    ui.talk.setAttribute("aria-pressed", String(mic.on));
    ui.talkLabel.textContent = mic.on ? "Stop talking" : "Start talking";
    ui.send.disabled = !ready;
    ui.reset.disabled = !ready;
    ui.interrupt.disabled = !ready || !isReplying();
    ui.emptyHint.hidden = ui.log.childElementCount > 0;
  }

  function isReplying() {
    return player.active || view.serverState === "thinking" || view.serverState === "speaking";
  }

  function showError(message, { reconnect = false } = {}) {
    ui.errorText.textContent = message;
    ui.reconnect.hidden = !reconnect;
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
    conn.lost = false;
    const ws = new WebSocket(wsUrl());
    ws.binaryType = "arraybuffer";
    ws.onopen = () => ws.send(JSON.stringify({ type: "hello" }));
    ws.onmessage = (event) => {
      if (ws !== conn.ws) return;
      if (typeof event.data === "string") onEvent(JSON.parse(event.data));
      else onPcm(event.data);
    };
    ws.onclose = () => onClose(ws);
    conn.ws = ws;
    render();
  }

  function onClose(ws) {
    if (ws !== conn.ws) return;
    const wasReady = Boolean(conn.ready);
    conn.ws = null;
    conn.ready = null;
    conn.lost = true;
    stopMic({ tellServer: false });
    stopPlayback();
    view.serverState = "idle";
    // Back off so a server that is down is not hammered; the button retries at once.
    const delay = Math.min(1000 * 2 ** conn.retries, MAX_RETRY_MS);
    conn.retries += 1;
    conn.retryTimer = setTimeout(connect, delay);
    const why = wasReady ? "Disconnected from the server." : "Cannot reach the server.";
    showError(`${why} Retrying in ${Math.round(delay / 1000)} s…`, { reconnect: true });
    render();
  }

  function sendJson(message) {
    if (conn.ws && conn.ws.readyState === WebSocket.OPEN) conn.ws.send(JSON.stringify(message));
  }

  // ------------------------------------------------------------------ server events

  const handlers = {
    ready(m) {
      conn.ready = m;
      conn.retries = 0;
      player.rate = m.sample_rate;
      postToPlayer({ type: "rate", rate: m.sample_rate });
      if (!ui.reconnect.hidden) hideError();
    },
    state(m) {
      view.serverState = m.state;
      view.errorEvent = false;
    },
    speech_started() { document.body.dataset.hearing = "true"; },
    speech_stopped() { delete document.body.dataset.hearing; },
    transcript(m) { showTranscript(m); },
    reply_text(m) { appendReply(m.turn, m.delta); },
    audio_start(m) {
      player.audioTurn = m.turn;
      if (!player.ctx || isDiscarded()) return;
      postToPlayer({ type: "rate", rate: m.sample_rate });
      // Speaking from now on, not from the worklet's first "playing": the server may say
      // "listening" before the jitter buffer has filled, and the label should not flicker.
      player.active = true;
    },
    audio_end() { if (!isDiscarded()) postToPlayer({ type: "end" }); },
    metrics(m) {
      record.metrics.push(Object.freeze(m));
      showMetrics(m);
    },
    turn_end(m) {
      record.turnEnds.push(Object.freeze(m));
      finishTurn(m);
    },
    error(m) {
      view.errorEvent = true;
      showError(m.message || m.code);
    },
  };

  function onEvent(message) {
    const handler = handlers[message.type];
    if (!handler) {
      console.warn("voice assistant: unknown event", message.type);
      return;
    }
    if (typeof message.turn === "number") noteTurn(message);
    handler(message);
    render();
  }

  // ------------------------------------------------------------------ conversation view

  function noteTurn(message) {
    view.lastTurn = Math.max(view.lastTurn, message.turn);
    // A typed message's bubble belongs to the next new turn, whatever its first event is
    // (a no_speech ending is the microphone's, not the typed message's).
    const noSpeech = message.type === "turn_end" && message.reason === "no_speech";
    if (view.pendingTurn && !view.turns.has(message.turn) && !noSpeech) turnFor(message.turn);
  }

  // A turn's <li> holds the user bubble, the assistant bubble and its metrics line.
  function turnFor(turn) {
    let entry = view.turns.get(turn);
    if (entry) return entry;
    // The first event of a new turn adopts the bubble of a message typed just before.
    entry = view.pendingTurn || newTurnEntry();
    view.pendingTurn = null;
    view.turns.set(turn, entry);
    return entry;
  }

  function newTurnEntry() {
    const item = document.createElement("li");
    item.className = "turn";
    ui.log.append(item);
    return { item, user: null, assistant: null, meta: null, reply: "" };
  }

  function bubble(entry, role) {
    if (entry[role]) return entry[role];
    const el = document.createElement("div");
    el.className = `bubble ${role}`;
    const who = document.createElement("span");
    who.className = "visually-hidden";
    who.textContent = role === "user" ? "You: " : "Assistant: ";
    const text = document.createElement("span");
    text.className = "text";
    el.append(who, text);
    // The user's words always come first, even if the transcript arrives after reply text.
    if (role === "user") entry.item.prepend(el);
    else entry.item.insertBefore(el, entry.meta);
    entry[role] = el;
    return el;
  }

  function setBubbleText(el, text) {
    el.querySelector(".text").textContent = text;
    scrollToEnd();
  }

  function scrollToEnd() {
    ui.log.parentElement.scrollTop = ui.log.parentElement.scrollHeight;
  }

  function addTypedMessage(text) {
    const entry = newTurnEntry();
    setBubbleText(bubble(entry, "user"), text);
    view.pendingTurn = entry;
  }

  function showTranscript(m) {
    if (m.final && m.text.trim()) record.transcripts.push(m.text);
    if (!m.text.trim() && !view.turns.has(m.turn)) return;
    const el = bubble(turnFor(m.turn), "user");
    el.classList.toggle("interim", !m.final);
    setBubbleText(el, m.text);
  }

  function appendReply(turn, delta) {
    const entry = turnFor(turn);
    entry.reply += delta;
    setBubbleText(bubble(entry, "assistant"), entry.reply);
  }

  function showMetrics(m) {
    if (m.first_audio_ms == null) return;
    const entry = turnFor(m.turn);
    if (!entry.meta) {
      entry.meta = document.createElement("p");
      entry.meta.className = "meta";
      entry.item.append(entry.meta);
    }
    entry.meta.textContent = `first audio after ${(m.first_audio_ms / 1000).toFixed(2)} s`;
    entry.meta.title = metricsTitle(m);
  }

  function metricsTitle(m) {
    const names = ["end_of_turn_ms", "transcript_ms", "first_token_ms", "first_phrase_ms", "first_audio_ms", "total_ms"];
    return names
      .filter((name) => m[name] != null)
      .map((name) => `${name.replace(/_ms$/, "").replace(/_/g, " ")}: ${Math.round(m[name])} ms`)
      .join("\n");
  }

  function finishTurn(m) {
    const entry = view.turns.get(m.turn);
    const text = m.reply || (entry ? entry.reply : "");
    if (text) record.replies.push(text);
    if (m.reason === "interrupted") stopPlayback();
    if (!entry) return;
    if (entry.assistant && m.reason === "interrupted") {
      entry.assistant.classList.add("interrupted");
      // Show what was actually spoken: that is what the assistant remembers.
      if (m.reply) setBubbleText(entry.assistant, m.reply);
    }
    if (!entry.assistant && m.reason === "error") {
      setBubbleText(bubble(entry, "assistant"), "(no reply: something went wrong)");
      entry.assistant.classList.add("failed");
    }
  }

  function clearConversation() {
    ui.log.replaceChildren();
    view.turns.clear();
    view.pendingTurn = null;
  }

  // ------------------------------------------------------------------ reply audio

  // Must run inside a click handler: browsers only let a user gesture start audio.
  function ensureAudio() {
    if (!player.ctx) {
      player.ctx = createAudioContext(player.rate);
      loadPlayer(player.ctx);
    }
    if (player.ctx.state === "suspended") player.ctx.resume();
  }

  function createAudioContext(rate) {
    try {
      return new AudioContext({ sampleRate: rate, latencyHint: "interactive" });
    } catch (err) {
      // Some browsers refuse unusual rates: the worklet then resamples.
      console.warn("voice assistant: AudioContext refused", rate, "Hz:", err.message);
      return new AudioContext({ latencyHint: "interactive" });
    }
  }

  async function loadPlayer(ctx) {
    try {
      await ctx.audioWorklet.addModule(WORKLET_URL);
      const node = new AudioWorkletNode(ctx, "pcm-player", {
        numberOfInputs: 0,
        outputChannelCount: [1],
        processorOptions: { inputRate: player.rate || ctx.sampleRate },
      });
      node.port.onmessage = (event) => onPlayerMessage(event.data);
      node.connect(ctx.destination);
      player.node = node;
      player.pending.splice(0).forEach((msg) => node.port.postMessage(msg));
    } catch (err) {
      showError(`Audio playback is unavailable: ${err.message}`);
    }
  }

  function postToPlayer(msg, transfer) {
    if (player.node) player.node.port.postMessage(msg, transfer || []);
    else if (player.ctx) player.pending.push(msg); // the worklet module is still loading
  }

  function onPlayerMessage(msg) {
    player.active = msg.type === "playing";
    render();
  }

  function onPcm(buffer) {
    const count = buffer.byteLength >> 1;
    record.receivedAudioSamples += count;
    // Without an AudioContext (no click yet) or after a local interrupt, the audio is dropped.
    if (!player.ctx || isDiscarded()) return;
    const pcm = new Int16Array(buffer, 0, count);
    const samples = new Float32Array(count);
    for (let i = 0; i < count; i++) samples[i] = pcm[i] / 32768;
    postToPlayer({ type: "chunk", samples }, [samples.buffer]);
  }

  function isDiscarded() {
    return player.audioTurn !== null && player.audioTurn <= player.discardUpTo;
  }

  function stopPlayback() {
    postToPlayer({ type: "flush" });
    player.active = false;
  }

  // ------------------------------------------------------------------ microphone

  function recorderOptions() {
    const ok = window.MediaRecorder && MediaRecorder.isTypeSupported(PREFERRED_MIME);
    return ok ? { mimeType: PREFERRED_MIME } : {};
  }

  // Sends run one after another so that audio_start, every blob and audio_stop keep their order.
  function enqueue(task) {
    mic.chain = mic.chain.then(task).catch((err) => console.warn("voice assistant: send failed", err));
  }

  async function startMic() {
    mic.starting = true;
    render();
    try {
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
      mic.rec = startRecording(stream);
      mic.on = true;
    } catch (err) {
      showError(micErrorText(err));
    } finally {
      mic.starting = false;
      render();
    }
  }

  function micErrorText(err) {
    if (!window.isSecureContext) return "The microphone needs a secure page (https or localhost).";
    if (err && err.name === "NotAllowedError") return "Microphone access was refused. Allow it in the browser and try again.";
    if (err && err.name === "NotFoundError") return "No microphone was found.";
    return `The microphone could not start: ${err && err.message ? err.message : err}`;
  }

  function startRecording(stream) {
    const recorder = new MediaRecorder(stream, recorderOptions());
    const rec = { recorder, stream, ws: conn.ws, started: false };
    recorder.ondataavailable = (event) => {
      if (event.data.size > 0) enqueue(() => sendBlob(rec, event.data));
    };
    recorder.start(TIMESLICE_MS);
    return rec;
  }

  // audio_start goes out just before the first blob (the WebM header), with the container really recorded.
  async function sendBlob(rec, blob) {
    const bytes = await blob.arrayBuffer();
    if (rec.ws !== conn.ws || rec.ws.readyState !== WebSocket.OPEN) return;
    if (!rec.started) {
      rec.started = true;
      rec.ws.send(JSON.stringify({ type: "audio_start", mime_type: rec.recorder.mimeType || blob.type }));
    }
    rec.ws.send(bytes);
  }

  async function stopMic({ tellServer }) {
    const rec = mic.rec;
    mic.rec = null;
    mic.on = false;
    render();
    if (!rec) return;
    if (rec.recorder.state !== "inactive") {
      // "stop" fires after the last dataavailable, so the final blob is queued before audio_stop.
      const stopped = new Promise((resolve) => rec.recorder.addEventListener("stop", resolve, { once: true }));
      rec.recorder.stop();
      await stopped;
    }
    rec.stream.getTracks().forEach((track) => track.stop());
    if (!tellServer) return;
    enqueue(() => {
      if (rec.started && rec.ws === conn.ws) sendJson({ type: "audio_stop" });
    });
  }

  // ------------------------------------------------------------------ user actions

  function onTalk() {
    if (mic.starting) return;
    hideErrorEvent();
    ensureAudio();
    if (mic.on) stopMic({ tellServer: true });
    else startMic();
  }

  function onSubmit(event) {
    event.preventDefault();
    const text = ui.input.value.trim();
    if (!text || !conn.ready) return;
    hideErrorEvent();
    ensureAudio();
    sendJson({ type: "text", text });
    addTypedMessage(text);
    ui.input.value = "";
    render();
  }

  function onInterrupt() {
    sendJson({ type: "interrupt" });
    stopPlayback();
    player.discardUpTo = view.lastTurn; // frames already on the wire belong to the stopped reply
    render();
  }

  function onReset() {
    sendJson({ type: "reset" });
    stopPlayback();
    clearConversation();
    // The server may number turns afresh after a reset.
    player.discardUpTo = -Infinity;
    view.lastTurn = -Infinity;
    hideError();
    view.errorEvent = false;
    render();
  }

  // A new action clears the label's "error" (the message itself stays until dismissed).
  function hideErrorEvent() {
    view.errorEvent = false;
  }

  function onKey(event) {
    if (event.key === "Escape" && !ui.interrupt.disabled) onInterrupt();
  }

  function onReconnect() {
    hideError();
    conn.retries = 0;
    connect();
  }

  ui.talk.addEventListener("click", onTalk);
  ui.form.addEventListener("submit", onSubmit);
  ui.interrupt.addEventListener("click", onInterrupt);
  ui.reset.addEventListener("click", onReset);
  ui.reconnect.addEventListener("click", onReconnect);
  ui.errorDismiss.addEventListener("click", hideError);
  document.addEventListener("keydown", onKey);
  connect();
  render();
})();
