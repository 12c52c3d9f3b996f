// The stream's live controls (protocol v1 `set_controls`, app/transport/protocol.py ControlOverrides): every element
// with data-control="<field>". Their ranges and neutral values are the server's (GET /v1/limits, applied by
// applyControlLimits before the page takes a call). Only fields moved away from neutral go in a start message, and
// only the fields just changed in a set_controls: a server that predates a control is asked for it only when it is
// used (it would answer bad_message and end the stream).

import { applyLimits } from "./limits.js";

const SEND_INTERVAL_MS = 250; // the server takes 5 text messages a second (ingress.max_text_per_s) beyond a burst

// The sliders, in the order the page shows them: one shape for all (a label with the value, the range input, an
// optional hint), so that it is written once (buildSliders).
const SLIDERS = [
  { id: "control-pitch", field: "pitch_shift", label: "Pitch shift", unit: " semitones", signed: true, step: 1 },
  { id: "control-input-gain", field: "input_gain_db", label: "Input gain", unit: " dB", signed: true, step: 1 },
  { id: "control-output-gain", field: "output_gain_db", label: "Output gain", unit: " dB", signed: true, step: 1 },
  {
    id: "control-rms-mix", field: "rms_mix_rate", label: "Loudness", step: 0.05,
    hint: "1 keeps the model's loudness, 0 follows your voice's.",
  },
  {
    id: "control-silence-hangover", field: "silence_hangover_s", label: "Hold after speech", unit: " s", step: 0.05,
    hint: "Keeps converting this long after the input falls below the silence threshold, so word ends are not cut.",
  },
];

/** Replaces `placeholder` with the SLIDERS' fields (ranges and values come with applyControlLimits). */
export function buildSliders(placeholder) {
  const fields = SLIDERS.map(({ id, field, label, unit, signed, step, hint }) => {
    const wrapper = document.createElement("div");
    wrapper.className = "field";
    const caption = document.createElement("label");
    caption.htmlFor = id;
    const value = document.createElement("output");
    value.id = `${id}-value`;
    value.htmlFor = id;
    caption.append(`${label}: `, value);
    const input = document.createElement("input");
    Object.assign(input, { id, type: "range", step: String(step) });
    input.dataset.control = field;
    if (unit) input.dataset.unit = unit;
    if (signed) input.dataset.signed = "";
    wrapper.append(caption, input);
    if (hint) {
      const text = document.createElement("p");
      text.id = `${id}-hint`;
      text.className = "hint";
      text.textContent = hint;
      input.setAttribute("aria-describedby", text.id);
      wrapper.append(text);
    }
    return wrapper;
  });
  placeholder.replaceWith(...fields);
}

export function controlElements() {
  return [...document.querySelectorAll("[data-control]")];
}

/** The server's ranges and neutral values (GET /v1/limits `controls`) onto the controls; their labels follow. */
export function applyControlLimits(limits) {
  for (const element of controlElements()) {
    applyLimits(element, limits[element.dataset.control]);
    element.dispatchEvent(new Event("input")); // shows the value (watchControls)
  }
}

/** As the protocol wants it: a checkbox's boolean, a number within the element's range, or null (an empty field). */
function valueOf(element) {
  if (element.type === "checkbox") return element.checked;
  const value = Number(element.value);
  if (element.value.trim() === "" || !Number.isFinite(value)) return null;
  return Math.min(Number(element.max), Math.max(Number(element.min), value));
}

function neutralOf(element) {
  if (element.type === "checkbox") return element.defaultChecked;
  return element.defaultValue === "" ? null : Number(element.defaultValue);
}

function formatted(element) {
  const value = valueOf(element);
  if (value === null || typeof value === "boolean") return "";
  const sign = "signed" in element.dataset && value > 0 ? "+" : "";
  return `${sign}${value}${element.dataset.unit || ""}`;
}

/** A control's value now (the protocol's field name), whether or not it is neutral; null when it is empty. */
export function currentControl(field) {
  const element = controlElements().find((candidate) => candidate.dataset.control === field);
  return element ? valueOf(element) : null;
}

/** The controls away from neutral: what a start message carries ({} when all are neutral). */
export function readControls() {
  const controls = {};
  for (const element of controlElements()) {
    const value = valueOf(element);
    if (value !== null && value !== neutralOf(element)) controls[element.dataset.control] = value;
  }
  return controls;
}

/** Calls onChange({field: value}) when the user commits a change (a slider let go, a box ticked, a field left). */
export function watchControls(onChange) {
  for (const element of controlElements()) {
    const label = document.getElementById(`${element.id}-value`);
    const show = () => {
      if (label) label.textContent = formatted(element);
    };
    element.addEventListener("input", show);
    element.addEventListener("change", () => {
      const value = valueOf(element);
      if (value === null) return; // an emptied field: the server keeps its value
      if (element.type !== "checkbox" && Number(element.value) !== value) element.value = String(value); // clamped
      show();
      onChange({ [element.dataset.control]: value });
    });
    show();
  }
}

/**
 * Sends changes as set_controls: merged, at most one message per SEND_INTERVAL_MS, so that a slider moved about
 * never trips the server's message rate limit. `send(changes)` says whether the session took them; changes it did
 * not take wait for flush() (the page calls it when a session is ready).
 */
export class ControlSender {
  constructor(send) {
    this.send = send;
    this.pending = {};
    this.timer = null;
    this.lastSent = -Infinity;
  }

  push(changes) {
    Object.assign(this.pending, changes);
    if (this.timer !== null) return;
    const wait = Math.max(0, this.lastSent + SEND_INTERVAL_MS - performance.now());
    this.timer = setTimeout(() => this.flush(), wait);
  }

  flush() {
    clearTimeout(this.timer);
    this.timer = null;
    if (Object.keys(this.pending).length === 0 || !this.send(this.pending)) return;
    this.pending = {};
    this.lastSent = performance.now();
  }

  /** A call ended: what it did not send is in the controls a next start message reads. */
  clear() {
    clearTimeout(this.timer);
    this.timer = null;
    this.pending = {};
  }
}
