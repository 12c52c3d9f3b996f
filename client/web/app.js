// Seed-VC browser client: the page's controller. Plain ES modules, no build step, standard APIs only.
//
// Notes for the README:
// - Served by the ingress at `/` (client/web, mounted as static files). Open http://HOST:PORT/ and enter an API key.
// - The microphone needs a secure origin: https://, or http://localhost / http://127.0.0.1. On any other http://
//   origin the browser hides navigator.mediaDevices and the page says so.
// - Transports: WebRTC (default; signalling and events on the WebSocket /v1/rtc, ICE servers from GET /v1/ice) and
//   protocol v1 over the WebSocket /v1/stream with WebCodecs Opus (needs AudioEncoder/AudioDecoder). When WebRTC
//   fails (no answer within 8 s, signalling refused, ICE not connected within 4 s of the answer, or failed) the page
//   ends that session on the server (`end`: no converter slot held for a resume) and falls back to the WebSocket
//   transport once, in a new session, and shows "websocket (fallback)" and how long the fallback took.
// - Settings (settings.js) shape the blocks and apply to the next session; live controls (controls.js: pitch,
//   silence, gains, loudness, noise suppression, monitor) go with the start message and, during a call, as
//   set_controls, confirmed by controls_set. Their ranges and neutral values are the server's (GET /v1/limits):
//   Start waits for them. Record keeps what the page plays and offers it as a WAV download.
// - Noise suppression on turns the browser's own off (the microphone is re-opened: audio.js), so the voice is not
//   suppressed twice; off, the browser's default applies.
// - A start refused for capacity (overloaded, rate_limited) is tried again as the Python client does (the policy
//   comes with the limits: retry_after_s, doubled each time, at most max_s, up to `retries` times); the page says
//   "busy, retrying in N s" with a countdown and a Cancel button meanwhile.
// - Reconnecting: when an established call's connection drops (the socket closes without an end or error event; for
//   WebRTC also the media path failing), the page resumes the session on a new connection of the same transport
//   (protocol step 7): at once, then after 0.5 s, 1 s, 1.5 s, ... up to 6 tries, well within the 30 s the server
//   holds a dropped session. The session id stays; the page says "reconnecting…", then "resumed". When the server
//   no longer holds the session (session_expired), the call goes on in a new session ("new session").
// - Tested in headless Chromium only. Firefox is not tested here; the page uses standard APIs only (AudioWorklet,
//   WebCodecs audio, RTCPeerConnection, HTMLMediaElement.setSinkId when AudioContext.setSinkId is missing).
// - Latency: #latency is the browser-visible round trip of the last block — from the capture of the block's first
//   input sample to the moment its converted audio reaches the output: measured on the AudioContext clock for the
//   WebSocket transport, estimated for WebRTC (event arrival + jitter buffer; the page says "≈ … estimate");
//   #server-latency is the server's own figure (block event latency_ms).
//
// For tests, window.vcState holds the live figures (see the `vcState` object below for every field).

import { ApiError, getIceServers, getLimits, getToken, listVoices, uploadVoice } from "./api.js";
import {
  analyserRms, closeAudio, openAudio, outputRouteSupported, setOutputDevice, setServerNoiseSuppression,
} from "./audio.js";
import {
  applyControlLimits, buildSliders, ControlSender, currentControl, readControls, watchControls,
} from "./controls.js";
import { describeError, errorInfo, isFatal, SessionError, socketUrl, startMessage } from "./protocol.js";
import { Recorder } from "./recorder.js";
import {
  applySettingLimits, describeLatency, noteBlock, readSettings, resetMeasured, settingElements, showServerSettings,
} from "./settings.js";
import { RtcSession } from "./transport-rtc.js";
import { WebSocketSession } from "./transport-ws.js";

const READY_TIMEOUT_MS = 10000; // start message sent -> ready event
const METER_INTERVAL_MS = 50;
const TOKEN_MARGIN_S = 60; // fetch a new session token when the cached one expires within this
const LOG_LIMIT = 300;
// Resuming a dropped session: try at once, then after 0.5 s, 1 s, 1.5 s, ...: 6 tries span 7.5 s, well within the
// 30 s for which the server holds a dropped session (the converter's detached_session_ttl_s).
const RESUME_ATTEMPTS = 6;
const RESUME_BACKOFF_MS = 500;
// Refusals that a later try may not meet: counted as failed tries, like a connection that would not open. Any other
// error event in answer to a resume (unknown_voice, bad_settings, ...) would come again, so it ends the call.
const TRANSIENT_ERRORS = new Set(["overloaded", "rate_limited", "internal"]);
// Refusals of a start for capacity: tried again after a wait (startRetryPolicy), saying so.
const CAPACITY_REFUSALS = new Set(["overloaded", "rate_limited"]);
const COUNTDOWN_MS = 250;
const STORAGE = {
  apiKey: "seedvc.apiKey",
  voice: "seedvc.voiceId",
  input: "seedvc.inputDevice",
  output: "seedvc.outputDevice",
  transport: "seedvc.transport",
};

/** The live figures, for people (rendered below) and tests (window.vcState). Updated in place. */
const vcState = {
  connection: "idle", // idle | connecting | waiting (to retry a refused start) | connected | reconnecting | closing
  // | closed | failed
  transport: null, // null | "webrtc" | "websocket" | "websocket (fallback)"
  latencyMs: null, // browser-visible round trip of the last block (ms), null until measured
  serverLatencyMs: null, // the last block event's latency_ms
  blocks: 0, // block events received in this call
  blockMs: null, // from the ready event
  lateMs: 0, // sum of the late events' dropped_ms
  lateBlocks: 0, // lateMs / blockMs
  lastError: null, // {code, message, retryAfterS} of the last error, null when none since Start
  startRetry: null, // while a refused start waits to be tried again: {code, attempt, of, waitS}
  startRetries: 0, // starts refused for capacity and tried again in this call
  outputRms: 0, // linear RMS (0..1) of what is being played
  inputRms: 0, // linear RMS (0..1) of the microphone
  sessionId: null, // from the ready event; kept when a dropped connection is resumed
  sessionNote: null, // null | "resumed" | "new session": how the call came back after its last drop
  resumes: 0, // dropped connections after which the session was resumed (same id, block indexes go on)
  restarts: 0, // dropped connections after which the server no longer held the session: a new one took over
  resumedAtBlock: null, // the index of the first block after the last resume
  lastBlockIndex: null, // the index of the last block event
  fallbackReason: null, // why WebRTC was abandoned, when it was
  fallbackMs: null, // WebRTC's failure (ICE failed or its deadline) to the fallback connection carrying audio, in ms
  latencyEstimated: false, // latencyMs is an estimate (WebRTC) rather than measured on the audio clock (WebSocket)
  controls: null, // the stream's controls, as the last controls_set event confirmed them
  recording: false, // the converted voice is being recorded
  recordingSeconds: null, // the length of the last finished recording (its WAV is behind #recording-link)
  ice: null, // WebRTC only: iceConnectionState
  iceGathering: null,
  signaling: null,
  peer: null, // RTCPeerConnection.connectionState
  packetsSent: 0, // Opus packets sent / received (WebSocket) or RTP audio packets (WebRTC, from getStats)
  packetsReceived: 0,
};
window.vcState = vcState;

const ui = {};
let call = null; // the current call (see start()); null when idle
let tokenCache = null; // {apiKey, token, expiresAt}
let listedKey = null; // the API key whose voices #voice-select lists
let recorder = null; // the recording in progress, if any
let startRetryPolicy = null; // GET /v1/limits start_retry: {retries, default_s, max_s}
const controlSender = new ControlSender(sendControls);

function $(id) {
  return document.getElementById(id);
}

function init() {
  for (const id of ["api-key", "remember-key", "voice-select", "refresh-voices", "voice-file", "voice-name",
    "upload-voice", "transport", "input-device", "output-device", "settings-latency",
    "start", "stop", "cancel-retry", "record", "recording-link", "status", "connection-state", "rtc-states", "ice-state", "ice-gathering-state", "signaling-state", "peer-state",
    "session-id", "session-note", "transport-used", "latency", "latency-basis", "server-latency", "block-count", "late-count",
    "input-level", "output-level", "input-db", "output-db", "log", "remote-audio", "output-audio"]) {
    ui[id.replace(/-(\w)/g, (_, c) => c.toUpperCase())] = $(id);
  }

  // The key is kept for the page's lifetime; it is in local storage only when the user asked to remember it.
  ui.apiKey.value = localStorage.getItem(STORAGE.apiKey) || "";
  ui.rememberKey.checked = ui.apiKey.value !== "";
  const transport = localStorage.getItem(STORAGE.transport);
  if (transport === "webrtc" || transport === "websocket") ui.transport.value = transport;

  ui.apiKey.addEventListener("change", onApiKeyChange);
  ui.rememberKey.addEventListener("change", onRememberChange);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault(); // Enter in the key field: apply the key, never reload the page
    onApiKeyChange();
  });
  ui.refreshVoices.addEventListener("click", () => refreshVoices());
  ui.uploadVoice.addEventListener("click", onUpload);
  ui.voiceSelect.addEventListener("change", onVoiceChange);
  ui.transport.addEventListener("change", () => localStorage.setItem(STORAGE.transport, ui.transport.value));
  ui.inputDevice.addEventListener("change", () => localStorage.setItem(STORAGE.input, ui.inputDevice.value));
  ui.outputDevice.addEventListener("change", onOutputDeviceChange);
  ui.start.addEventListener("click", start);
  ui.stop.addEventListener("click", stop);
  ui.cancelRetry.addEventListener("click", stop);
  ui.record.addEventListener("click", () => (recorder ? stopRecording() : startRecording()));
  buildSliders($("control-sliders"));
  watchControls((changes) => onControlChange(changes));
  loadLimits();
  for (const element of settingElements()) element.addEventListener("input", showLatencyCost);
  showLatencyCost();
  window.addEventListener("pagehide", () => {
    if (call && call.session) call.session.abort({ code: "page_closed", message: "the page was closed" });
  });

  if (!outputRouteSupported()) {
    ui.outputDevice.disabled = true;
    ui.outputDevice.title = "This browser cannot choose the output device.";
  }
  if (navigator.mediaDevices) {
    navigator.mediaDevices.addEventListener("devicechange", refreshDevices);
    refreshDevices();
  } else {
    setStatus("The microphone needs a secure origin: open this page over https:// or on localhost.", "warning");
  }
  if (ui.apiKey.value.trim()) refreshVoices();
  setInterval(updateMeters, METER_INTERVAL_MS);
  render();
  log("page ready");
}

/** The server's ranges onto the fields, and its retry policy; Start waits for them (the fields have no others). */
async function loadLimits() {
  try {
    const limits = await getLimits();
    applySettingLimits(limits.settings);
    applyControlLimits(limits.controls);
    startRetryPolicy = limits.start_retry;
    showLatencyCost();
    if (!call) ui.start.disabled = false;
  } catch (error) {
    showError({ code: errorInfo(error).code, message: `cannot load the server's limits (${errorInfo(error).message}); `
      + "reload the page" });
  }
}

// ---------------------------------------------------------------- page output: status, log, figures

function setStatus(text, kind = "info") {
  ui.status.textContent = text;
  ui.status.dataset.kind = kind;
  delete ui.status.dataset.code;
}

/** Shows an error ({code, message}) in #status and the log, and records it as vcState.lastError. */
function showError(failure) {
  const error = { ...errorInfo(failure), retry_after_s: failure && failure.retry_after_s };
  const text = describeError(error);
  vcState.lastError = {
    code: error.code,
    message: error.message,
    retryAfterS: typeof error.retry_after_s === "number" ? error.retry_after_s : null,
  };
  ui.status.textContent = text;
  ui.status.dataset.kind = "error";
  ui.status.dataset.code = error.code;
  log(text, "error");
}

function log(text, kind = "info") {
  const item = document.createElement("li");
  item.dataset.kind = kind;
  const time = document.createElement("time");
  const now = new Date();
  time.textContent = now.toTimeString().slice(0, 8) + "." + String(now.getMilliseconds()).padStart(3, "0");
  item.append(time, text);
  const atBottom = ui.log.scrollTop + ui.log.clientHeight >= ui.log.scrollHeight - 4;
  ui.log.append(item);
  while (ui.log.childElementCount > LOG_LIMIT) ui.log.firstElementChild.remove();
  if (atBottom) ui.log.scrollTop = ui.log.scrollHeight;
}

function update(patch) {
  Object.assign(vcState, patch);
  render();
}

function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

function render() {
  setText(ui.connectionState, vcState.connection);
  ui.connectionState.dataset.state = vcState.connection;
  setText(ui.transportUsed, vcState.transport || "none");
  setText(ui.sessionId, vcState.sessionId || "–");
  setText(ui.sessionNote, vcState.sessionNote ? `(${vcState.sessionNote})` : "");
  const measured = vcState.latencyMs !== null;
  const approximately = vcState.latencyEstimated ? "≈ " : "";
  setText(ui.latency, measured ? `${approximately}${Math.round(vcState.latencyMs)} ms` : "–");
  setText(ui.latencyBasis, !measured ? "" : vcState.latencyEstimated
    ? "(estimate: WebRTC audio cannot be tied to a block; block event arrival + receive jitter buffer + output "
      + "latency, from the capture of the block's input)"
    : "(measured on the audio clock: capture of a block's input to its converted audio at the output)");
  setText(ui.serverLatency, vcState.serverLatencyMs === null ? "–" : `${Math.round(vcState.serverLatencyMs)} ms`);
  setText(ui.blockCount, String(vcState.blocks));
  ui.record.disabled = !vcState.recording && vcState.connection !== "connected";
  ui.record.setAttribute("aria-pressed", String(vcState.recording));
  setText(ui.record, vcState.recording ? "Stop recording" : "Record");
  setText(ui.lateCount, String(Math.round(vcState.lateBlocks * 10) / 10));
  ui.lateCount.title = `${vcState.lateMs} ms of input dropped`;
  const rtc = vcState.peer !== null;
  ui.rtcStates.hidden = !rtc;
  if (rtc) {
    setText(ui.iceState, vcState.ice || "new");
    setText(ui.iceGatheringState, vcState.iceGathering || "new");
    setText(ui.signalingState, vcState.signaling || "stable");
    setText(ui.peerState, vcState.peer);
  }
}

function setConnection(state) {
  if (vcState.connection !== state) log(`connection: ${state}`);
  update({ connection: state });
}

function onRtcState(name, value) {
  if (vcState[name] === value) return;
  const labels = { ice: "ICE connection", iceGathering: "ICE gathering", signaling: "signalling", peer: "peer connection" };
  log(`${labels[name]}: ${value}`, value === "failed" ? "error" : "info");
  const patch = { [name]: value };
  if (vcState.peer === null && name !== "peer") patch.peer = "new"; // shows the WebRTC states on the page
  update(patch);
}

function updateMeters() {
  const engine = call && call.engine;
  let input = 0;
  let output = 0;
  if (engine && engine.context.state !== "closed") {
    input = analyserRms(engine, engine.inputAnalyser);
    output = analyserRms(engine, engine.outputAnalyser);
  }
  showLevel(ui.inputLevel, ui.inputDb, input);
  showLevel(ui.outputLevel, ui.outputDb, output);
  vcState.inputRms = input;
  vcState.outputRms = output;
  if (call && call.session) {
    const stats = call.session.stats();
    vcState.packetsSent = stats.packetsSent;
    vcState.packetsReceived = stats.packetsReceived;
  }
}

/** The meter shows dBFS from -60 (empty) to 0 (full). */
function showLevel(meter, label, rms) {
  const db = rms > 0 ? 20 * Math.log10(rms) : -Infinity;
  meter.value = Math.max(0, Math.min(1, (db + 60) / 60));
  setText(label, Number.isFinite(db) && db > -100 ? `${db.toFixed(0)} dB` : "–∞ dB");
}

// ---------------------------------------------------------------- API key, tokens, voices

function onApiKeyChange() {
  // A changed key is saved (when asked to) only once the server took it: see sessionToken. The voices listed were
  // the previous key's: they go at once, and come back only if the new key lists them.
  localStorage.removeItem(STORAGE.apiKey);
  tokenCache = null;
  if (ui.apiKey.value.trim() !== listedKey) {
    listedKey = null;
    fillVoices([], null, "Checking the key…");
  }
  refreshVoices();
}

function onRememberChange() {
  if (!ui.rememberKey.checked) localStorage.removeItem(STORAGE.apiKey);
  else if (tokenCache) localStorage.setItem(STORAGE.apiKey, tokenCache.apiKey); // a key that has worked
}

/** A session token for the API key in the page, reused until a minute before it expires. */
async function sessionToken({ fresh = false } = {}) {
  const apiKey = ui.apiKey.value.trim();
  if (!apiKey) throw new ApiError("missing_api_key", "enter an API key first");
  const now = Date.now() / 1000;
  if (!fresh && tokenCache && tokenCache.apiKey === apiKey && tokenCache.expiresAt !== null
    && tokenCache.expiresAt - now > TOKEN_MARGIN_S) {
    return tokenCache.token;
  }
  const { token, expiresAt } = await getToken(apiKey);
  tokenCache = { apiKey, token, expiresAt };
  if (ui.rememberKey.checked && ui.apiKey.value.trim() === apiKey) localStorage.setItem(STORAGE.apiKey, apiKey);
  return token;
}

/** Calls fn(token); on 401 once more with a fresh token (another ingress replica may not know the old one). */
async function withToken(fn) {
  try {
    return await fn(await sessionToken());
  } catch (error) {
    if (error.code !== "unauthorized" || !tokenCache) throw error;
    tokenCache = null;
    return fn(await sessionToken({ fresh: true }));
  }
}

async function refreshVoices(selectId = null) {
  const apiKey = ui.apiKey.value.trim();
  if (!apiKey) {
    listedKey = null;
    fillVoices([], null, "Enter an API key to list voices");
    return;
  }
  ui.refreshVoices.disabled = true;
  try {
    const voices = await withToken(listVoices);
    if (ui.apiKey.value.trim() !== apiKey) return; // the key changed meanwhile: its own refresh lists its voices
    listedKey = apiKey;
    fillVoices(voices, selectId, "No voices yet: upload a recording");
    log(`${voices.length} voice${voices.length === 1 ? "" : "s"} available`);
  } catch (error) {
    if (ui.apiKey.value.trim() !== apiKey) return;
    // Whatever was listed may not be this key's to use: none are listed until a refresh works.
    listedKey = null;
    fillVoices([], null, error.code === "unauthorized" ? "The API key was refused" : "Cannot list the voices");
    showError(error);
  } finally {
    ui.refreshVoices.disabled = false;
  }
}

function fillVoices(voices, selectId, emptyText) {
  const wanted = selectId || ui.voiceSelect.value || localStorage.getItem(STORAGE.voice);
  ui.voiceSelect.replaceChildren();
  if (voices.length === 0) {
    ui.voiceSelect.append(new Option(emptyText, ""));
    return;
  }
  for (const voice of voices) {
    const seconds = typeof voice.seconds === "number" ? ` (${voice.seconds.toFixed(1)} s)` : "";
    ui.voiceSelect.append(new Option(`${voice.name || voice.voice_id}${seconds}`, voice.voice_id));
  }
  if (voices.some((voice) => voice.voice_id === wanted)) ui.voiceSelect.value = wanted;
  localStorage.setItem(STORAGE.voice, ui.voiceSelect.value);
}

async function onUpload() {
  const file = ui.voiceFile.files[0];
  if (!file) {
    showError({ code: "no_file", message: "choose a recording to upload first" });
    return;
  }
  const name = (ui.voiceName.value.trim() || file.name.replace(/\.[^.]+$/, "")).slice(0, 64);
  ui.uploadVoice.disabled = true;
  setStatus(`Uploading ${file.name}…`);
  try {
    const voice = await withToken((token) => uploadVoice(token, file, name));
    const seconds = typeof voice.seconds === "number" ? ` (${voice.seconds.toFixed(1)} s)` : "";
    setStatus(`Voice "${voice.name || voice.voice_id}" added${seconds}.`, "ok");
    log(`voice uploaded: ${voice.voice_id}`);
    ui.voiceFile.value = "";
    ui.voiceName.value = "";
    await refreshVoices(voice.voice_id);
  } catch (error) {
    showError(error);
  } finally {
    ui.uploadVoice.disabled = false;
  }
}

function onVoiceChange() {
  const voiceId = ui.voiceSelect.value;
  if (voiceId) localStorage.setItem(STORAGE.voice, voiceId);
  if (call && call.session && voiceId && voiceId !== call.voiceId) {
    if (call.session.setVoice(voiceId)) {
      call.voiceId = voiceId;
      log(`set_voice ${voiceId} sent`);
    }
  }
}

// ---------------------------------------------------------------- devices

async function refreshDevices() {
  let devices;
  try {
    devices = await navigator.mediaDevices.enumerateDevices();
  } catch {
    return;
  }
  fillDevices(ui.inputDevice, devices.filter((d) => d.kind === "audioinput"), "Default microphone", STORAGE.input);
  fillDevices(ui.outputDevice, devices.filter((d) => d.kind === "audiooutput"), "Default output", STORAGE.output);
}

/** Options for the devices (labels appear once the page may use the mic); keeps the choice when it still exists. */
function fillDevices(select, devices, defaultLabel, storageKey) {
  const wanted = select.value || localStorage.getItem(storageKey) || "";
  select.replaceChildren(new Option(defaultLabel, ""));
  devices
    .filter((device) => device.deviceId && device.deviceId !== "default")
    .forEach((device, i) => select.append(new Option(device.label || `${defaultLabel.split(" ")[1]} ${i + 1}`,
      device.deviceId)));
  select.value = [...select.options].some((option) => option.value === wanted) ? wanted : "";
}

async function onOutputDeviceChange() {
  localStorage.setItem(STORAGE.output, ui.outputDevice.value);
  if (!call || !call.engine) return;
  try {
    await setOutputDevice(call.engine, ui.outputDevice.value);
    log(`output device: ${ui.outputDevice.selectedOptions[0].text}`);
  } catch (error) {
    log(`cannot switch the output device: ${error.message}`, "warning");
    setStatus(`Cannot switch the output device: ${error.message}`, "warning");
  }
}

// ---------------------------------------------------------------- start / stop

/** Start and Stop, and what needs a new session (transport, microphone, settings), locked while a call runs. */
function lockForCall(running) {
  ui.start.disabled = running;
  ui.stop.disabled = !running;
  for (const element of [ui.transport, ui.inputDevice, ...settingElements()]) element.disabled = running;
}

function showLatencyCost() {
  setText(ui.settingsLatency, describeLatency());
}

// ---------------------------------------------------------------- live controls

/** A control moved: into the next start message (it reads them all), and to the running session, if any. */
function onControlChange(changes) {
  log(`control: ${JSON.stringify(changes)}`);
  if (call) controlSender.push(changes);
  if ("noise_suppression" in changes && call && call.engine) matchMicrophone(call.engine);
}

/** The browser's noise suppression off while the server's is on, the browser's default otherwise (audio.js). */
function matchMicrophone(engine) {
  const serverSuppresses = currentControl("noise_suppression") === true;
  setServerNoiseSuppression(engine, serverSuppresses).then(
    () => log(`microphone: the browser's noise suppression ${serverSuppresses ? "off" : "as the browser's default"}`),
    (error) => showError({ code: "microphone", message: `cannot re-open the microphone: ${errorInfo(error).message}` }),
  );
}

function sendControls(changes) {
  if (!call || !call.session || !call.session.setControls(changes)) return false;
  log(`set_controls sent: ${JSON.stringify(changes)}`);
  return true;
}

// ---------------------------------------------------------------- recording

async function startRecording() {
  const engine = call && call.engine;
  if (!engine || recorder) return;
  recorder = new Recorder();
  update({ recording: true });
  try {
    await recorder.start(engine);
    log("recording the converted voice");
  } catch (error) {
    recorder = null;
    update({ recording: false });
    showError({ code: "recording_failed", message: `cannot record: ${errorInfo(error).message}` });
  }
}

/** Stops the recording (the call may go on) and offers it as a WAV file. */
function stopRecording() {
  if (!recorder) return;
  const seconds = recorder.seconds;
  const blob = recorder.stop();
  recorder = null;
  if (ui.recordingLink.href) URL.revokeObjectURL(ui.recordingLink.href);
  ui.recordingLink.href = URL.createObjectURL(blob);
  const stamp = new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-");
  ui.recordingLink.download = `seedvc-converted-${stamp}.wav`;
  ui.recordingLink.textContent = `Download the recording (${seconds.toFixed(1)} s, WAV)`;
  ui.recordingLink.hidden = false;
  update({ recording: false, recordingSeconds: seconds });
  log(`recording stopped: ${seconds.toFixed(1)} s`);
}

function resetFigures(kind) {
  update({
    transport: kind,
    latencyMs: null,
    serverLatencyMs: null,
    blocks: 0,
    blockMs: null,
    lateMs: 0,
    lateBlocks: 0,
    lastError: null,
    startRetry: null,
    startRetries: 0,
    sessionId: null,
    sessionNote: null,
    resumes: 0,
    restarts: 0,
    resumedAtBlock: null,
    lastBlockIndex: null,
    fallbackReason: null,
    fallbackMs: null,
    latencyEstimated: false,
    controls: null,
    ice: null,
    iceGathering: null,
    signaling: null,
    peer: null,
    packetsSent: 0,
    packetsReceived: 0,
  });
}

async function start() {
  if (call) return;
  const kind = ui.transport.value === "websocket" ? "websocket" : "webrtc";
  const thisCall = {
    kind,
    engine: null,
    session: null,
    generation: 0,
    fellBack: false,
    stopping: false,
    readyTimer: null,
    voiceId: ui.voiceSelect.value, // the voice asked for last
    activeVoice: ui.voiceSelect.value, // the voice the server converts with (start, then voice_set events)
    settings: readSettings(), // what a new session of this call asks for (the fields are locked during a call)
    resume: null, // {session_id, resume_token} once the server is ready: what resumes the session after a drop
    reconnect: null, // while the call is being resumed: {attempts, tokenRetried, timer, outcome}
    retry: null, // while a start refused for capacity waits to be tried again: {timer, countdown}
    startRetries: 0, // starts of this call refused for capacity so far
    iceServers: null, // the last ICE servers fetched (a reconnect reuses them when GET /v1/ice fails)
    fallbackFrom: null, // performance.now() of WebRTC's failure, until the fallback connection carries audio
  };
  call = thisCall;
  resetFigures(kind);
  resetMeasured();
  lockForCall(true);
  setConnection("connecting");
  setStatus("Connecting…");
  try {
    if (!ui.apiKey.value.trim()) throw new SessionError("missing_api_key", "enter an API key first");
    if (!thisCall.voiceId) throw new SessionError("no_voice", "choose a voice, or upload a recording, first");
    const token = await sessionToken();
    if (thisCall.stopping) {
      abandon(thisCall);
      return;
    }
    const microphone = {
      inputDeviceId: ui.inputDevice.value,
      serverSuppresses: currentControl("noise_suppression") === true,
      outputElement: ui.outputAudio,
      log,
    };
    thisCall.engine = await openAudio({
      ...microphone,
      outputDeviceId: ui.outputDevice.disabled ? "" : ui.outputDevice.value,
    }).catch((error) => {
      if (error.code !== "output_device") throw error;
      log(error.message, "warning");
      return openAudio({ ...microphone, outputDeviceId: "" });
    });
    matchMicrophone(thisCall.engine); // noise suppression switched while the microphone opened
    refreshDevices(); // labels are visible now that the page may use the mic
    if (thisCall.stopping) {
      abandon(thisCall);
      return;
    }
    if (kind === "webrtc") await beginWebRtc(thisCall, token);
    else beginWebSocket(thisCall, token);
  } catch (error) {
    failCall(thisCall, error);
  }
}

async function beginWebRtc(thisCall, token) {
  let { iceServers, error } = await getIceServers(token);
  if (error && thisCall.iceServers) {
    // Mid-outage the API may not answer yet: the servers of the last connection are likely still good.
    log(`GET /v1/ice failed (${error.code}); using the ICE servers of the last connection`, "warning");
    iceServers = thisCall.iceServers;
  } else if (error) {
    log(`GET /v1/ice failed (${error.code}); no ICE servers, host candidates only`, "warning");
  } else {
    log(`ICE servers: ${iceServers.length}`);
    thisCall.iceServers = iceServers;
  }
  if (thisCall.stopping) {
    abandon(thisCall);
    return;
  }
  thisCall.generation += 1;
  thisCall.session = new RtcSession({
    url: socketUrl("/v1/rtc"),
    start: callStart(thisCall, token),
    iceServers,
    engine: thisCall.engine,
    remoteAudio: ui.remoteAudio,
    hooks: sessionHooks(thisCall, thisCall.generation),
    // A failed first connection is followed by a new session over WebSocket (fallBack): the server may free this
    // one. A failed try to resume is followed by another try, which needs the session held.
    endsOnFallback: !thisCall.reconnect,
  }).begin();
}

function beginWebSocket(thisCall, token) {
  thisCall.generation += 1;
  thisCall.session = new WebSocketSession({
    url: socketUrl("/v1/stream"),
    start: callStart(thisCall, token),
    engine: thisCall.engine,
    hooks: sessionHooks(thisCall, thisCall.generation),
  }).begin();
}

/**
 * The start message of the call's next session: a resume of the session the call holds, or a new session. A resume
 * names the voice the server converts with and no settings (the session keeps its own; settings sent again would
 * only risk bad_settings against a redeployed server's defaults); a voice asked for but not yet confirmed is asked
 * for again once the call is back (reconnected()).
 */
function callStart(thisCall, token) {
  const controls = readControls(); // the controls live with the connection: a resume sends them again
  if (thisCall.resume) {
    thisCall.voiceId = thisCall.activeVoice;
    return startMessage({ token, voiceId: thisCall.activeVoice, controls, resume: thisCall.resume });
  }
  return startMessage({ token, voiceId: thisCall.voiceId, settings: thisCall.settings, controls });
}

/** What a transport session reports; anything from a session that is no longer the current one is ignored. */
function sessionHooks(thisCall, generation) {
  const current = () => call === thisCall && thisCall.generation === generation;
  return {
    log: (text) => current() && log(text),
    onState: (state) => current() && sessionState(thisCall, state),
    onStartSent: () => current() && armReadyTimer(thisCall),
    onEvent: (event) => current() && handleEvent(thisCall, event),
    onRoundTrip: (ms) => current() && update({
      latencyMs: Math.max(0, Math.round(ms)),
      latencyEstimated: thisCall.session instanceof RtcSession,
    }),
    onRtcState: (name, value) => current() && onRtcState(name, value),
    onClosed: (outcome) => current() && sessionClosed(thisCall, outcome),
  };
}

function sessionState(thisCall, state) {
  if (thisCall.stopping && state === "connected") return;
  if (thisCall.reconnect) {
    // The page says "reconnecting" until a new connection carries audio both ways, whatever each try goes through.
    if (state !== "connected") return;
    reconnected(thisCall);
  }
  if (state === "connected" && thisCall.fallbackFrom !== null) {
    const fallbackMs = Math.round(performance.now() - thisCall.fallbackFrom);
    thisCall.fallbackFrom = null;
    update({ fallbackMs });
    log(`fallback connected ${fallbackMs} ms after WebRTC failed`);
  }
  setConnection(state);
}

/** A start that gets no ready within 10 s is an error, never a silent hang; while reconnecting, a failed try. */
function armReadyTimer(thisCall) {
  clearTimeout(thisCall.readyTimer);
  thisCall.readyTimer = setTimeout(() => {
    if (call === thisCall && thisCall.session) {
      const message = `no ready from the server within ${READY_TIMEOUT_MS / 1000} s`;
      thisCall.session.abort({ code: "timeout", message }, { dropped: true });
    }
  }, READY_TIMEOUT_MS);
}

function handleEvent(thisCall, event) {
  switch (event.type) {
    case "ready":
      clearTimeout(thisCall.readyTimer);
      thisCall.resume = { session_id: event.session_id, resume_token: event.resume_token };
      update({ sessionId: event.session_id, blockMs: event.block_ms });
      showServerSettings(event.settings);
      showLatencyCost();
      controlSender.flush(); // controls changed while the session was not ready
      if (thisCall.reconnect) {
        const resumed = event.resumed_at_block !== null && event.resumed_at_block !== undefined;
        thisCall.reconnect.outcome = resumed ? "resumed" : "new session";
        if (resumed) update({ resumedAtBlock: event.resumed_at_block });
        log(resumed ? `ready: session ${event.session_id} resumed at block ${event.resumed_at_block}`
          : `ready: new session ${event.session_id}, ${event.block_ms} ms blocks`);
        break; // the status changes once audio flows again (reconnected)
      }
      log(`ready: session ${event.session_id}, ${event.block_ms} ms blocks`);
      setStatus(vcState.fallbackReason
        ? `Converting over WebSocket + WebCodecs (fallback: WebRTC failed, ${vcState.fallbackReason}).`
        : `Converting (${vcState.transport}, ${event.block_ms} ms blocks).`, vcState.fallbackReason ? "warning" : "ok");
      break;
    case "resume_token":
      // The session moved to another converter: from now on only this token resumes it.
      if (thisCall.resume) thisCall.resume.resume_token = event.resume_token;
      log("resume_token: the session moved to another converter");
      break;
    case "block":
      if (vcState.blocks === 0) log(`first block: server latency ${Math.round(event.latency_ms)} ms`);
      update({ blocks: vcState.blocks + 1, serverLatencyMs: event.latency_ms, lastBlockIndex: event.index });
      noteBlock(event);
      showLatencyCost();
      break;
    case "late": {
      const lateMs = vcState.lateMs + event.dropped_ms;
      update({ lateMs, lateBlocks: vcState.blockMs ? lateMs / vcState.blockMs : 0 });
      log(`late: the server dropped ${event.dropped_ms} ms of input (${event.total_dropped_ms} ms so far)`, "warning");
      break;
    }
    case "voice_set":
      thisCall.activeVoice = event.voice_id;
      log(`voice_set: ${event.voice_id} from block ${event.from_block}`);
      setStatus(`Voice switched to ${voiceName(event.voice_id)} from block ${event.from_block}.`, "ok");
      break;
    case "controls_set":
      update({ controls: event.controls });
      log(`controls_set: ${JSON.stringify(event.controls)}`);
      break;
    case "warning":
      log(`warning ${event.code}: ${event.message}`, "warning");
      setStatus(`Warning: ${event.code}: ${event.message}`, "warning");
      break;
    case "error": {
      const fatal = !thisCall.session || isFatal(event, thisCall.session.ready);
      const mediaDied = event.code === "connection_failed" && thisCall.session && thisCall.session.established;
      if (fatal && (thisCall.reconnect || mediaDied)) {
        // The answer to a try to resume, or the media path of an established call dying (the server keeps the
        // session): sessionClosed decides whether the call goes on, and shows the error only if it does not.
        log(`error ${event.code}: ${event.message}`, "warning");
        break;
      }
      showError(event);
      if (!fatal && event.code === "unknown_voice") {
        // The answer to set_voice: the stream goes on with the previous voice, and so does the selection.
        thisCall.voiceId = thisCall.activeVoice;
        if ([...ui.voiceSelect.options].some((option) => option.value === thisCall.activeVoice)) {
          ui.voiceSelect.value = thisCall.activeVoice;
        }
      }
      break;
    }
    case "end":
      log(`end: ${event.blocks} blocks, ${event.dropped_ms} ms of input dropped`);
      break;
    default:
      log(`unknown event ${event.type}`, "warning");
  }
}

function voiceName(voiceId) {
  const option = [...ui.voiceSelect.options].find((o) => o.value === voiceId);
  return option ? option.text : voiceId;
}

function sessionClosed(thisCall, { error, fallback, dropped, failedAt }) {
  clearTimeout(thisCall.readyTimer);
  if (error && !thisCall.stopping) {
    if (thisCall.reconnect) {
      afterFailedTry(thisCall, error, dropped);
      return;
    }
    if (dropped && thisCall.session && thisCall.session.established) {
      beginReconnect(thisCall, error);
      return;
    }
  }
  if (error && fallback && thisCall.kind === "webrtc" && !thisCall.fellBack && !thisCall.stopping) {
    fallBack(thisCall, error, failedAt);
    return;
  }
  if (error && CAPACITY_REFUSALS.has(error.code) && !thisCall.stopping && !thisCall.reconnect
    && thisCall.session && !thisCall.session.ready && thisCall.startRetries < startRetryPolicy.retries) {
    waitToRetryStart(thisCall, error);
    return;
  }
  if (error && CAPACITY_REFUSALS.has(error.code) && thisCall.startRetries > 0) {
    error = { ...error, message: `${error.message} (gave up after ${thisCall.startRetries} tries again)` };
  }
  if (error) {
    if (vcState.lastError === null || vcState.lastError.code !== error.code
      || vcState.lastError.message !== error.message) {
      showError(error);
    }
    setConnection("failed");
  } else {
    setConnection("closed");
    if (ui.status.dataset.kind !== "error") setStatus("Stopped.");
  }
  endCall(thisCall);
}

// ---------------------------------------------------------------- a start refused for capacity

/**
 * The server had no room for a new session (overloaded, rate_limited): wait as the Python client does
 * (client/stream_client.py retry_wait_s: the error's retry_after_s, doubled for each retry already made, at most
 * max_s), counting down on the page with a Cancel button, then start again on the same microphone.
 */
function waitToRetryStart(thisCall, error) {
  const policy = startRetryPolicy;
  const afterS = typeof error.retry_after_s === "number" ? error.retry_after_s : policy.default_s;
  const waitS = Math.min(policy.max_s, afterS * 2 ** thisCall.startRetries);
  thisCall.startRetries += 1;
  thisCall.session = null;
  const due = performance.now() + waitS * 1000;
  const attempt = { code: error.code, attempt: thisCall.startRetries, of: policy.retries, waitS };
  log(`start refused (${describeError(error)}); trying again in ${waitS} s (${attempt.attempt} of ${attempt.of})`,
    "warning");
  const countDown = () => {
    const leftS = Math.max(0, Math.ceil((due - performance.now()) / 1000));
    setStatus(`Busy: the service has no room for another call right now (${error.code}). Retrying in ${leftS} s `
      + `(try ${attempt.attempt} of ${attempt.of}); Cancel to stop waiting.`, "warning");
  };
  thisCall.retry = {
    timer: setTimeout(() => retryStart(thisCall), waitS * 1000),
    countdown: setInterval(countDown, COUNTDOWN_MS),
  };
  countDown();
  ui.cancelRetry.hidden = false;
  update({ startRetry: attempt, startRetries: thisCall.startRetries, sessionId: null });
  setConnection("waiting");
}

function clearRetry(thisCall) {
  if (!thisCall.retry) return;
  clearTimeout(thisCall.retry.timer);
  clearInterval(thisCall.retry.countdown);
  thisCall.retry = null;
  ui.cancelRetry.hidden = true;
  update({ startRetry: null });
}

async function retryStart(thisCall) {
  clearRetry(thisCall);
  if (call !== thisCall) return;
  setConnection("connecting");
  setStatus(`Connecting (try ${thisCall.startRetries + 1})…`);
  try {
    await beginSession(thisCall, await sessionToken());
  } catch (failure) {
    failCall(thisCall, failure);
  }
}

/** The call's next session, on its transport (WebSocket once it fell back), unless Stop was pressed meanwhile. */
async function beginSession(thisCall, token) {
  if (call !== thisCall) return;
  if (thisCall.stopping) {
    abandon(thisCall);
    return;
  }
  if (thisCall.kind === "webrtc" && !thisCall.fellBack) await beginWebRtc(thisCall, token);
  else beginWebSocket(thisCall, token);
}

// ---------------------------------------------------------------- reconnecting

/** An established call's connection dropped: resume its session on a new connection of the same transport. */
function beginReconnect(thisCall, error) {
  // The old session stopped its capture (or its peer connection) when it closed: what the microphone hears from
  // here until a new connection is up is dropped, not queued. This is a live call: input minutes old is worth
  // nothing to the listener, and the server would drop most of it as late anyway.
  thisCall.session = null;
  thisCall.reconnect = { attempts: 0, tokenRetried: false, timer: null, outcome: null };
  log(`connection lost (${describeError(error)}); reconnecting`, "warning");
  update({ sessionNote: null });
  setConnection("reconnecting");
  setStatus("Connection lost: reconnecting…", "warning");
  scheduleTry(thisCall, 0);
}

function scheduleTry(thisCall, delayMs) {
  clearTimeout(thisCall.reconnect.timer);
  thisCall.reconnect.timer = setTimeout(() => tryAgain(thisCall), delayMs);
}

async function tryAgain(thisCall) {
  const again = thisCall.reconnect;
  if (call !== thisCall || !again) return;
  if (thisCall.stopping) {
    abandon(thisCall);
    return;
  }
  again.attempts += 1;
  log(thisCall.resume
    ? `resuming session ${thisCall.resume.session_id} (try ${again.attempts} of ${RESUME_ATTEMPTS})`
    : `starting a new session (try ${again.attempts} of ${RESUME_ATTEMPTS})`);
  let token;
  try {
    token = await sessionToken();
  } catch (failure) {
    // The API cannot be reached (network, or the proxy has no ingress yet): a failed try, as a socket that would not
    // open. An API key that was refused is not.
    if (call === thisCall && !thisCall.stopping) {
      afterFailedTry(thisCall, errorInfo(failure), failure.code === "network" || failure.status >= 500);
    } else {
      abandon(thisCall);
    }
    return;
  }
  await beginSession(thisCall, token);
}

/** A try to get the call back failed: try again, start a new session, or give up. */
function afterFailedTry(thisCall, error, dropped) {
  const again = thisCall.reconnect;
  thisCall.session = null;
  if (error.code === "session_expired" && thisCall.resume) {
    // Both the ingress and the converter of the session were replaced meanwhile: go on in a new session.
    log("the server no longer holds the session; starting a new one", "warning");
    thisCall.resume = null;
    scheduleTry(thisCall, 0);
  } else if (error.code === "unauthorized" && !again.tokenRetried) {
    // The session token expired during the call: a new one, got as the first was, and once more at once.
    log("the session token was refused; getting a new one", "warning");
    again.tokenRetried = true;
    tokenCache = null;
    scheduleTry(thisCall, 0);
  } else if (!dropped && !TRANSIENT_ERRORS.has(error.code)) {
    giveUp(thisCall, error);
  } else if (again.attempts >= RESUME_ATTEMPTS) {
    giveUp(thisCall, {
      code: "resume_failed",
      message: `the connection dropped and ${RESUME_ATTEMPTS} tries to get it back failed `
        + `(last: ${describeError(error)}); press Start for a new call`,
    });
  } else {
    log(`try ${again.attempts} failed (${describeError(error)})`, "warning");
    scheduleTry(thisCall, again.attempts * RESUME_BACKOFF_MS);
  }
}

/** A new connection carries audio both ways: say how the call came back. */
function reconnected(thisCall) {
  const { outcome } = thisCall.reconnect;
  thisCall.reconnect = null;
  if (outcome === "resumed") {
    update({ sessionNote: "resumed", resumes: vcState.resumes + 1 });
    log(`resumed: session ${vcState.sessionId} from block ${vcState.resumedAtBlock}`);
    setStatus(`Reconnected: session resumed at block ${vcState.resumedAtBlock} (${vcState.transport}).`, "ok");
  } else {
    update({ sessionNote: "new session", restarts: vcState.restarts + 1 });
    log(`new session ${vcState.sessionId}: the server no longer held the old one`, "warning");
    setStatus("Reconnected in a new session: the server no longer held the old one, so the conversion "
      + "started afresh (the voice's context was lost).", "warning");
  }
  onVoiceChange(); // a voice chosen while the call was away
}

function giveUp(thisCall, error) {
  thisCall.reconnect = null;
  showError(error);
  setConnection("failed");
  endCall(thisCall);
}

// ---------------------------------------------------------------- fallback, failures, stop

/**
 * WebRTC failed: once per call, go on over the WebSocket transport with the same mic and output, in a new session
 * (the failed one was ended on the server when it had started: RtcSession.fail).
 */
async function fallBack(thisCall, error, failedAt) {
  thisCall.fellBack = true;
  thisCall.fallbackFrom = failedAt ?? performance.now();
  thisCall.resume = null;
  const reason = describeError(error);
  log(`WebRTC failed (${reason}); falling back to WebSocket + WebCodecs`, "warning");
  setStatus(`WebRTC failed (${reason}). Fell back to WebSocket + WebCodecs.`, "warning");
  update({ transport: "websocket (fallback)", fallbackReason: reason, sessionId: null });
  setConnection("connecting");
  thisCall.session = null;
  try {
    const token = await sessionToken();
    if (call !== thisCall) return;
    if (thisCall.stopping) {
      abandon(thisCall);
      return;
    }
    beginWebSocket(thisCall, token);
  } catch (failure) {
    failCall(thisCall, failure);
  }
}

/** An error outside a running session (token, microphone, setup). */
function failCall(thisCall, failure) {
  if (call !== thisCall) return;
  const error = errorInfo(failure);
  if (thisCall.session && !thisCall.session.closed) {
    thisCall.session.abort(error);
    return;
  }
  showError(error);
  setConnection("failed");
  endCall(thisCall);
}

/** Stop was pressed before a session existed, or between two tries to reconnect. */
function abandon(thisCall) {
  if (call !== thisCall) return;
  setConnection("closed");
  setStatus("Stopped.");
  endCall(thisCall);
}

function endCall(thisCall) {
  if (call !== thisCall) return;
  call = null;
  clearTimeout(thisCall.readyTimer);
  if (thisCall.reconnect) clearTimeout(thisCall.reconnect.timer);
  clearRetry(thisCall);
  stopRecording(); // before the audio context closes
  if (thisCall.engine) closeAudio(thisCall.engine);
  controlSender.clear();
  lockForCall(false);
  updateMeters();
}

async function stop() {
  const thisCall = call;
  if (!thisCall || thisCall.stopping) return;
  thisCall.stopping = true;
  ui.stop.disabled = true;
  setConnection("closing");
  setStatus("Stopping…");
  // With a session, its onClosed ends the call; without one, start(), fallBack(), tryAgain() or retryStart()
  // notices `stopping`, and between two tries (to reconnect, or to start) nothing runs that would.
  if (thisCall.session) await thisCall.session.stop();
  else if (thisCall.reconnect || thisCall.retry) abandon(thisCall);
}

init();
