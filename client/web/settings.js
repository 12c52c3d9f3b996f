// The stream settings (protocol v1 `settings`, app/transport/protocol.py SettingsOverrides): every element with
// data-setting="<field>", with the server's ranges (GET /v1/limits). They shape the blocks, so they apply to a new
// session only. An empty field keeps the
// server's value; once a ready event has said the effective settings, the fields show them as placeholders. Also
// what the settings cost in latency: block time and lookahead add their length; steps, guidance and contexts add
// server time per block, which the page measures during a call.

import { applyLimits } from "./limits.js";

const MEASURED_BLOCKS = 50; // the server's block latency: the median of the last this many blocks

let serverSettings = null; // the effective settings of the last ready event
const measured = { latencies: [], steps: null };

export function settingElements() {
  return [...document.querySelectorAll("[data-setting]")];
}

/** The server's ranges (GET /v1/limits `settings`) onto the fields and their labels. */
export function applySettingLimits(limits) {
  for (const element of settingElements()) applyLimits(element, limits[element.dataset.setting]);
}

/** The fields filled in, within their ranges: what a start message's settings carry. */
export function readSettings() {
  const settings = {};
  for (const element of settingElements()) {
    const value = "integer" in element.dataset ? parseInt(element.value, 10) : parseFloat(element.value);
    if (Number.isFinite(value)) {
      settings[element.dataset.setting] = Math.min(Number(element.max), Math.max(Number(element.min), value));
    }
  }
  return settings;
}

/** The ready event's effective settings: placeholders of the empty fields, and the base of the latency figures. */
export function showServerSettings(settings) {
  serverSettings = settings;
  for (const element of settingElements()) {
    const value = settings[element.dataset.setting];
    if (value !== undefined) element.placeholder = `server: ${value}`;
  }
}

export function resetMeasured() {
  measured.latencies = [];
  measured.steps = null;
}

/** A block event: its server latency (arrival of the block's last input to its event) and the steps it ran. */
export function noteBlock(event) {
  measured.latencies.push(event.latency_ms);
  if (measured.latencies.length > MEASURED_BLOCKS) measured.latencies.shift();
  measured.steps = event.steps;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

/** What the settings cost in latency, in words: the fields as filled in, else the server's values. */
export function describeLatency() {
  const chosen = { ...(serverSettings || {}), ...readSettings() };
  const parts = [];
  if (typeof chosen.block_time === "number" && typeof chosen.lookahead === "number") {
    const block = Math.round(chosen.block_time * 1000);
    const lookahead = Math.round(chosen.lookahead * 1000);
    parts.push(`Latency the settings add: ${block} ms block + ${lookahead} ms lookahead = ${block + lookahead} ms`);
  } else {
    parts.push("Latency the settings add: the block time plus the lookahead (the server's values show once a call starts)");
  }
  if (measured.latencies.length > 0) {
    parts.push(`then the server's time per block: ${Math.round(median(measured.latencies))} ms at ${measured.steps} `
      + "steps in the last call (median; it grows with steps, guidance and contexts)");
  } else {
    parts.push("then the server's time per block, which grows with steps, guidance and contexts (measured during a call)");
  }
  return `${parts.join(", ")}.`;
}
