// The conversation on screen: one <li> per turn with the user's bubble (interim, then final transcript),
// the assistant's bubble (its text revealed as its voice plays) and a discreet latency line. Screen readers hear
// each message once it is final, from a separate live region: never a reply rewritten word by word.

const DEFAULT_CHARS_PER_SECOND = 14; // speaking rate before any reply has been measured
const ANNOUNCED_KEPT = 4; // the live region keeps its last few messages; older ones are removed (not announced)
const PLACEHOLDER = "…";

export class Chat {
  constructor(log, scroller, announcer) {
    this.log = log;
    this.scroller = scroller;
    this.announcer = announcer; // role=log: only finished messages are added to it
    this.turns = new Map(); // turn id -> entry, for the current server session
    this.pendingTyped = null; // a typed message's entry, until the server gives its turn an id
    this.charsPerSecond = DEFAULT_CHARS_PER_SECOND;
  }

  get empty() {
    return this.log.childElementCount === 0;
  }

  has(turn) {
    return this.turns.has(turn);
  }

  /** Some reply's text is still being revealed (the page keeps its frame loop for it). */
  get revealing() {
    for (const entry of this.turns.values()) {
      if (entry.assistant && entry.shown !== entry.reply.length) return true;
    }
    return false;
  }

  /** One finished message for screen readers, added whole to the live region. */
  announce(text) {
    const line = document.createElement("p");
    line.textContent = text;
    this.announcer.append(line);
    while (this.announcer.childElementCount > ANNOUNCED_KEPT) this.announcer.firstElementChild.remove();
  }

  /** The reply is final on screen (played out, interrupted, failed): say it once. */
  announceIfSettled(entry) {
    if (entry.announced || !entry.done || !entry.assistant || entry.shown !== entry.reply.length) return;
    entry.announced = true;
    const interrupted = entry.assistant.classList.contains("interrupted") ? " (interrupted)" : "";
    this.announce(`Assistant: ${entry.reply}${interrupted}`);
  }

  /** A new server session numbers turns afresh: keep what is on screen, forget the ids. */
  newSession() {
    this.abandon("connection lost");
    if (!this.empty && !this.log.lastElementChild.classList.contains("divider")) {
      const note = document.createElement("li");
      note.className = "divider";
      note.setAttribute("role", "separator");
      note.textContent = "Reconnected. The assistant does not remember the messages above.";
      this.log.append(note);
    }
    this.turns.clear();
    this.pendingTyped = null;
  }

  clear() {
    this.log.replaceChildren();
    this.turns.clear();
    this.pendingTyped = null;
  }

  /** The entry of an event's turn; a typed message's entry is adopted by the next new turn. */
  entryFor(turn, { adopt = true } = {}) {
    let entry = this.turns.get(turn);
    if (entry) return entry;
    entry = (adopt && this.pendingTyped) || this.newEntry();
    if (entry === this.pendingTyped) this.pendingTyped = null;
    this.turns.set(turn, entry);
    return entry;
  }

  newEntry() {
    const item = document.createElement("li");
    item.className = "turn";
    this.log.append(item);
    return {
      item, user: null, assistant: null, meta: null,
      reply: "", shown: -1, final: false, audio: false, revealAll: false, done: false, announced: false,
      rate: 0, totalSamples: null,
    };
  }

  typed(text) {
    const entry = this.newEntry();
    entry.final = true;
    this.setText(this.bubble(entry, "user"), text);
    this.pendingTyped = entry;
  }

  /** The server heard speech begin: a placeholder bubble for this turn, filled by transcripts. */
  speechStarted(turn) {
    const entry = this.entryFor(turn, { adopt: false });
    if (entry.user) return;
    const el = this.bubble(entry, "user");
    el.classList.add("interim", "placeholder");
    el.setAttribute("aria-busy", "true"); // screen readers wait for the final words
    this.setText(el, PLACEHOLDER);
  }

  transcript(m) {
    const entry = this.turns.get(m.turn);
    if (entry && entry.final && !m.final) return; // a late guess after the final words
    if (!m.text.trim() && !entry) return;
    const current = entry || this.entryFor(m.turn);
    const el = this.bubble(current, "user");
    el.classList.remove("placeholder");
    el.classList.toggle("interim", !m.final);
    el.setAttribute("aria-busy", String(!m.final));
    if (m.final && !current.final && m.text.trim()) this.announce(`You: ${m.text.trim()}`);
    current.final = current.final || m.final;
    this.setText(el, m.text.trim() || PLACEHOLDER);
  }

  replyText(turn, delta) {
    const entry = this.entryFor(turn);
    entry.reply += delta;
    this.bubble(entry, "assistant");
  }

  /** Reply audio of this turn begins; `playing` false when this browser cannot play it. */
  audioStarted(turn, rate, playing) {
    const entry = this.entryFor(turn);
    entry.audio = playing;
    entry.rate = rate;
    if (!playing) entry.revealAll = true;
  }

  audioEnded(turn, samples) {
    const entry = this.turns.get(turn);
    if (entry) entry.totalSamples = samples;
  }

  /** Show as much of each reply as its voice has said (played: turn -> samples played). */
  reveal(playedOf) {
    for (const [turn, entry] of this.turns) {
      if (!entry.assistant || entry.shown === entry.reply.length) continue;
      const target = this.revealTarget(entry, playedOf(turn));
      if (target !== entry.shown) this.showReply(entry, target);
    }
  }

  revealTarget(entry, played) {
    const text = entry.reply;
    if (entry.revealAll) return text.length;
    if (!entry.audio || played <= 0) return 0;
    let chars = entry.totalSamples
      ? (text.length * played) / entry.totalSamples // exact once the whole reply's length is known
      : ((played / entry.rate) * this.charsPerSecond);
    chars = Math.min(text.length, Math.ceil(chars));
    // Whole words: a word appears as its first sound is played.
    const space = text.slice(chars).search(/\s/);
    return space < 0 ? text.length : chars + space;
  }

  showReply(entry, count) {
    entry.shown = count;
    const el = entry.assistant;
    el.classList.toggle("waiting", count === 0 && !entry.revealAll);
    el.setAttribute("aria-busy", String(count < entry.reply.length));
    this.setText(el, count === 0 ? "" : entry.reply.slice(0, count));
    this.announceIfSettled(entry);
  }

  /** The reply's voice could not play (no player, the device paused it): show its text whole now. */
  audioFailed() {
    for (const entry of this.turns.values()) {
      if (!entry.audio || entry.revealAll) continue;
      entry.audio = false;
      entry.revealAll = true;
    }
  }

  /** Playback of every queued reply has finished: whatever was said is all on screen. */
  drained() {
    for (const entry of this.turns.values()) {
      if (entry.audio && entry.done) this.finishReveal(entry);
    }
  }

  /** Playback was cut short locally. A reply whose turn had ended but whose voice was still playing keeps what
   * was heard, marked "(interrupted)": the server's history keeps just that much (the interrupt's played_samples). */
  flushed() {
    for (const entry of this.turns.values()) {
      if (entry.audio && entry.done && !entry.revealAll && entry.assistant) this.interrupted(entry, null);
    }
  }

  finishReveal(entry) {
    if (entry.revealAll) return;
    entry.revealAll = true;
    // Learn this voice's speaking rate, so the next reply's text keeps pace from its first word.
    if (entry.totalSamples && entry.rate && entry.reply.length > 20) {
      const measured = entry.reply.length / (entry.totalSamples / entry.rate);
      this.charsPerSecond = 0.5 * this.charsPerSecond + 0.5 * measured;
    }
  }

  metrics(m) {
    if (m.first_audio_ms == null) return;
    const entry = this.entryFor(m.turn);
    if (!entry.meta) {
      entry.meta = document.createElement("p");
      entry.meta.className = "meta";
      entry.item.append(entry.meta);
    }
    const seconds = (m.first_audio_ms / 1000).toFixed(2);
    entry.meta.textContent = `voice after ${seconds} s`;
    entry.meta.title = metricsTitle(m);
    entry.meta.setAttribute("aria-label", `The reply started ${seconds} seconds after you finished`);
  }

  /** turn_end: the last event of a turn. `playing`: its audio is still in the player. */
  finish(m, playing) {
    const entry = this.turns.get(m.turn);
    if (!entry) return;
    entry.done = true;
    if (m.reason === "no_speech" && !entry.final && !entry.assistant) {
      entry.item.remove(); // noise that never became words
      this.turns.delete(m.turn);
      return;
    }
    if (entry.user && !entry.final) {
      entry.user.setAttribute("aria-busy", "false");
      this.setText(entry.user, PLACEHOLDER); // no words were understood
    }
    if (m.reason === "interrupted") this.interrupted(entry, m.reply);
    else if (m.reason === "error" && !entry.reply) this.failed(entry, "(no reply: something went wrong)");
    else if (!playing) this.finishReveal(entry);
    this.announceIfSettled(entry);
  }

  interrupted(entry, spoken) {
    if (!entry.assistant) return;
    // What the assistant remembers is what was heard: the server's account, else what was shown.
    if (spoken) entry.reply = spoken;
    else entry.reply = entry.reply.slice(0, Math.max(0, entry.shown));
    entry.revealAll = true;
    entry.assistant.classList.add("interrupted");
    this.showReply(entry, entry.reply.length);
  }

  failed(entry, text) {
    const el = this.bubble(entry, "assistant");
    entry.reply = text;
    entry.revealAll = true;
    el.classList.add("failed");
    this.showReply(entry, text.length);
  }

  /** The connection dropped: turns in flight will never end, so say so instead of waiting. */
  abandon(why) {
    for (const entry of this.turns.values()) {
      if (entry.done) continue;
      entry.done = true;
      if (entry.assistant && !entry.revealAll) {
        entry.revealAll = true;
        entry.assistant.classList.add("interrupted");
        this.showReply(entry, entry.reply.length);
      } else if (!entry.assistant && entry.user && !entry.final) {
        this.setText(entry.user, `(${why})`);
      }
    }
  }

  bubble(entry, role) {
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
    if (role === "assistant") el.classList.add("waiting"); // dots until its voice starts
    entry[role] = el;
    this.scrollToEnd();
    return el;
  }

  setText(el, text) {
    const span = el.querySelector(".text");
    span.textContent = text;
    // The "…" stands for words still on their way: nothing to read out.
    if (text === PLACEHOLDER) span.setAttribute("aria-hidden", "true");
    else span.removeAttribute("aria-hidden");
    this.scrollToEnd();
  }

  scrollToEnd() {
    this.scroller.scrollTop = this.scroller.scrollHeight;
  }
}

function metricsTitle(m) {
  const names = ["end_of_turn_ms", "transcript_ms", "first_token_ms", "first_phrase_ms", "first_audio_ms", "total_ms"];
  return names
    .filter((name) => m[name] != null)
    .map((name) => `${name.replace(/_ms$/, "").replace(/_/g, " ")}: ${Math.round(m[name])} ms`)
    .join("\n");
}
