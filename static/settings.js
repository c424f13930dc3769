// The user's settings: kept in localStorage, edited in the settings dialog, sent to the server as `hello`.

const STORAGE_KEY = "voice-assistant.settings.v1";
const SEND_DELAY_MS = 600; // typing a system prompt sends one hello when the typing pauses
const DEFAULT_END_SILENCE_MS = 1300; // the server's default (turns.end_silence_ms), shown until the user chooses

// null = the server's own default; the server is told nothing more specific.
export const DEFAULTS = Object.freeze({
  mode: "hands_free",
  speaker: null,
  system_prompt: "",
  temperature: null,
  end_silence_ms: null,
});

/** Stored settings, each field checked: a stale or hand-edited entry falls back to its default. */
export function loadSettings() {
  let stored = {};
  try {
    stored = JSON.parse(localStorage.getItem(STORAGE_KEY) || "{}") || {};
  } catch (err) {
    stored = {}; // private mode or a corrupt entry: start from the defaults
  }
  return {
    mode: stored.mode === "push_to_talk" ? "push_to_talk" : "hands_free",
    speaker: intIn(stored.speaker, 0, 99),
    system_prompt: typeof stored.system_prompt === "string" ? stored.system_prompt.slice(0, 4000) : "",
    temperature: numberIn(stored.temperature, 0, 2),
    end_silence_ms: intIn(stored.end_silence_ms, 100, 5000),
  };
}

export function saveSettings(settings) {
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(settings));
  } catch (err) {
    // Storage full or disabled: the settings still apply to this visit.
  }
}

/** The `hello` message for these settings (sent on every new session and on every change). */
export function helloMessage(settings) {
  return {
    type: "hello",
    mode: settings.mode,
    speaker: settings.speaker,
    system_prompt: settings.system_prompt.trim() || null,
    temperature: settings.temperature,
    end_silence_ms: settings.end_silence_ms,
  };
}

function numberIn(value, min, max) {
  return typeof value === "number" && Number.isFinite(value) && value >= min && value <= max ? value : null;
}

function intIn(value, min, max) {
  const n = numberIn(value, min, max);
  return n === null ? null : Math.round(n);
}

/** Binds the settings dialog's controls to a settings object; onChange(settings) after each edit. */
export class SettingsPanel {
  constructor(root, settings, onChange) {
    this.root = root;
    this.form = root.querySelector("form");
    this.settings = settings;
    this.onChange = onChange;
    this.timer = 0;
    this.field = (name) => this.form.elements.namedItem(name);
    this.form.addEventListener("input", (event) => this.onInput(event));
    this.form.addEventListener("change", (event) => this.onInput(event, { now: true }));
    root.querySelector("[data-action=defaults]").addEventListener("click", () => this.restoreDefaults());
    this.show();
  }

  /** Settings -> controls. */
  show() {
    const s = this.settings;
    this.form.querySelectorAll("input[name=mode]").forEach((radio) => { radio.checked = radio.value === s.mode; });
    this.field("speaker").value = s.speaker === null ? "" : String(s.speaker);
    this.field("system_prompt").value = s.system_prompt;
    this.field("temperature").value = String(s.temperature ?? 0.7);
    this.field("end_silence_ms").value = String(s.end_silence_ms ?? DEFAULT_END_SILENCE_MS);
    this.showValues();
  }

  showValues() {
    const s = this.settings;
    this.root.querySelector("#temperature-value").textContent = s.temperature === null ? "model default" : s.temperature.toFixed(2);
    const ms = s.end_silence_ms ?? DEFAULT_END_SILENCE_MS;
    this.root.querySelector("#end-silence-value").textContent = `${(ms / 1000).toFixed(1)} s${s.end_silence_ms === null ? " (default)" : ""}`;
  }

  /** Controls -> settings. "input" fires while editing, "change" when an edit is done: send then
   * (a system prompt is also sent when typing pauses, a slider once it is let go). */
  onInput(event, { now = false } = {}) {
    const el = event.target;
    const s = this.settings;
    if (el.name === "mode") s.mode = el.value === "push_to_talk" ? "push_to_talk" : "hands_free";
    else if (el.name === "speaker") s.speaker = el.value === "" ? null : Number(el.value);
    else if (el.name === "system_prompt") s.system_prompt = el.value;
    else if (el.name === "temperature") s.temperature = Number(el.value);
    else if (el.name === "end_silence_ms") s.end_silence_ms = Number(el.value);
    else return;
    this.showValues();
    saveSettings(s);
    clearTimeout(this.timer);
    if (now) this.onChange(s);
    else if (el.name === "system_prompt") this.timer = setTimeout(() => this.onChange(s), SEND_DELAY_MS);
  }

  restoreDefaults() {
    Object.assign(this.settings, DEFAULTS);
    saveSettings(this.settings);
    this.show();
    this.onChange(this.settings);
  }

  /** CSM has several voices; Piper's packaged voice has one, so the control only shows for CSM. */
  showVoiceChoice(visible) {
    this.root.querySelector("#speaker-row").hidden = !visible;
  }
}
