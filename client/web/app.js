// Seed-VC browser client: the page's controller. Plain ES modules, no build step, standard APIs only.
//
// Notes for the README:
// - Served by the ingress at `/` (client/web, mounted as static files). Open http://HOST:PORT/ and enter an API key.
// - The microphone needs a secure origin: https://, or http://localhost / http://127.0.0.1. On any other http://
//   origin the browser hides navigator.mediaDevices and the page says so.
// - Transports: WebRTC (default; signalling and events on the WebSocket /v1/rtc, ICE servers from GET /v1/ice) and
//   protocol v1 over the WebSocket /v1/stream with WebCodecs Opus (needs AudioEncoder/AudioDecoder). When WebRTC
//   fails (no answer within 8 s, signalling refused, ICE or connection failed) the page falls back to the
//   WebSocket transport once and shows "websocket (fallback)".
// - Tested in headless Chromium only. Firefox is not tested here; the page uses standard APIs only (AudioWorklet,
//   WebCodecs audio, RTCPeerConnection, HTMLMediaElement.setSinkId when AudioContext.setSinkId is missing).
// - Latency: #latency is the browser-visible round trip of the last block — from the capture of the block's first
//   input sample to the moment its converted audio reaches the output (measured on the AudioContext clock for the
//   WebSocket transport, estimated from event arrival + jitter buffer for WebRTC); #server-latency is the server's
//   own figure (block event latency_ms).
//
// For tests, window.vcState holds the live figures (see the `vcState` object below for every field).

import { ApiError, getIceServers, getToken, listVoices, uploadVoice } from "./api.js";
import { analyserRms, closeAudio, openAudio, outputRouteSupported, setOutputDevice } from "./audio.js";
import { describeError, errorInfo, SessionError, socketUrl, startMessage } from "./protocol.js";
import { RtcSession } from "./transport-rtc.js";
import { WebSocketSession } from "./transport-ws.js";

const READY_TIMEOUT_MS = 10000; // start message sent -> ready event
const METER_INTERVAL_MS = 50;
const TOKEN_MARGIN_S = 60; // fetch a new session token when the cached one expires within this
const LOG_LIMIT = 300;
const STORAGE = {
  apiKey: "seedvc.apiKey",
  voice: "seedvc.voiceId",
  input: "seedvc.inputDevice",
  output: "seedvc.outputDevice",
  transport: "seedvc.transport",
};

/** The live figures, for people (rendered below) and tests (window.vcState). Updated in place. */
const vcState = {
  connection: "idle", // idle | connecting | connected | closing | closed | failed
  transport: null, // null | "webrtc" | "websocket" | "websocket (fallback)"
  latencyMs: null, // browser-visible round trip of the last block (ms), null until measured
  serverLatencyMs: null, // the last block event's latency_ms
  blocks: 0, // block events received in this call
  blockMs: null, // from the ready event
  lateMs: 0, // sum of the late events' dropped_ms
  lateBlocks: 0, // lateMs / blockMs
  lastError: null, // {code, message, retryAfterS} of the last error, null when none since Start
  outputRms: 0, // linear RMS (0..1) of what is being played
  inputRms: 0, // linear RMS (0..1) of the microphone
  sessionId: null, // from the ready event
  fallbackReason: null, // why WebRTC was abandoned, when it was
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

function $(id) {
  return document.getElementById(id);
}

function init() {
  for (const id of ["api-key", "voice-select", "refresh-voices", "voice-file", "voice-name", "upload-voice",
    "transport", "input-device", "output-device", "setting-block-time", "setting-diffusion-steps", "start", "stop",
    "status", "connection-state", "rtc-states", "ice-state", "ice-gathering-state", "signaling-state", "peer-state",
    "transport-used", "latency", "server-latency", "block-count", "late-count", "input-level", "output-level",
    "input-db", "output-db", "log", "remote-audio", "output-audio"]) {
    ui[id.replace(/-(\w)/g, (_, c) => c.toUpperCase())] = $(id);
  }

  ui.apiKey.value = localStorage.getItem(STORAGE.apiKey) || "";
  const transport = localStorage.getItem(STORAGE.transport);
  if (transport === "webrtc" || transport === "websocket") ui.transport.value = transport;

  ui.apiKey.addEventListener("change", onApiKeyChange);
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
  setText(ui.latency, vcState.latencyMs === null ? "–" : `${Math.round(vcState.latencyMs)} ms`);
  ui.latency.title = vcState.transport === "webrtc"
    ? "estimated: block event arrival + receive jitter buffer + output latency, from the capture of the block's input"
    : "capture of a block's first input sample to the start of its converted audio at the output";
  setText(ui.serverLatency, vcState.serverLatencyMs === null ? "–" : `${Math.round(vcState.serverLatencyMs)} ms`);
  setText(ui.blockCount, String(vcState.blocks));
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
  const key = ui.apiKey.value.trim();
  if (key) localStorage.setItem(STORAGE.apiKey, key);
  else localStorage.removeItem(STORAGE.apiKey);
  tokenCache = null;
  refreshVoices();
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
  if (!ui.apiKey.value.trim()) {
    fillVoices([], null, "Enter an API key to list voices");
    return;
  }
  ui.refreshVoices.disabled = true;
  try {
    const voices = await withToken(listVoices);
    fillVoices(voices, selectId, "No voices yet: upload a recording");
    log(`${voices.length} voice${voices.length === 1 ? "" : "s"} available`);
  } catch (error) {
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

function readSettings() {
  const settings = {};
  const blockTime = parseFloat(ui.settingBlockTime.value);
  if (Number.isFinite(blockTime)) settings.block_time = blockTime;
  const steps = parseInt(ui.settingDiffusionSteps.value, 10);
  if (Number.isFinite(steps)) settings.diffusion_steps = steps;
  return settings;
}

function setControls(running) {
  ui.start.disabled = running;
  ui.stop.disabled = !running;
  for (const element of [ui.transport, ui.inputDevice, ui.settingBlockTime, ui.settingDiffusionSteps]) {
    element.disabled = running;
  }
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
    sessionId: null,
    fallbackReason: null,
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
  };
  call = thisCall;
  resetFigures(kind);
  setControls(true);
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
    thisCall.engine = await openAudio({
      inputDeviceId: ui.inputDevice.value,
      outputDeviceId: ui.outputDevice.disabled ? "" : ui.outputDevice.value,
      outputElement: ui.outputAudio,
      log,
    }).catch((error) => {
      if (error.code !== "output_device") throw error;
      log(error.message, "warning");
      return openAudio({ inputDeviceId: ui.inputDevice.value, outputDeviceId: "", outputElement: ui.outputAudio, log });
    });
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
  const { iceServers, error } = await getIceServers(token);
  if (error) log(`GET /v1/ice failed (${error.code}); no ICE servers, host candidates only`, "warning");
  else log(`ICE servers: ${iceServers.length}`);
  if (thisCall.stopping) {
    abandon(thisCall);
    return;
  }
  thisCall.generation += 1;
  thisCall.session = new RtcSession({
    url: socketUrl("/v1/rtc"),
    start: startMessage({ token, voiceId: thisCall.voiceId, settings: readSettings() }),
    iceServers,
    engine: thisCall.engine,
    remoteAudio: ui.remoteAudio,
    hooks: sessionHooks(thisCall, thisCall.generation),
  }).begin();
}

function beginWebSocket(thisCall, token) {
  thisCall.generation += 1;
  thisCall.session = new WebSocketSession({
    url: socketUrl("/v1/stream"),
    start: startMessage({ token, voiceId: thisCall.voiceId, settings: readSettings() }),
    engine: thisCall.engine,
    hooks: sessionHooks(thisCall, thisCall.generation),
  }).begin();
}

/** What a transport session reports; anything from a session that is no longer the current one is ignored. */
function sessionHooks(thisCall, generation) {
  const current = () => call === thisCall && thisCall.generation === generation;
  return {
    log: (text) => current() && log(text),
    onState: (state) => current() && !(thisCall.stopping && state === "connected") && setConnection(state),
    onStartSent: () => current() && armReadyTimer(thisCall),
    onEvent: (event) => current() && handleEvent(thisCall, event),
    onRoundTrip: (ms) => current() && update({ latencyMs: Math.max(0, Math.round(ms)) }),
    onRtcState: (name, value) => current() && onRtcState(name, value),
    onClosed: (outcome) => current() && sessionClosed(thisCall, outcome),
  };
}

/** A start that gets no ready within 10 s is an error, never a silent hang. */
function armReadyTimer(thisCall) {
  clearTimeout(thisCall.readyTimer);
  thisCall.readyTimer = setTimeout(() => {
    if (call === thisCall && thisCall.session) {
      thisCall.session.abort({ code: "timeout", message: `no ready from the server within ${READY_TIMEOUT_MS / 1000} s` });
    }
  }, READY_TIMEOUT_MS);
}

function handleEvent(thisCall, event) {
  switch (event.type) {
    case "ready":
      clearTimeout(thisCall.readyTimer);
      update({ sessionId: event.session_id, blockMs: event.block_ms });
      log(`ready: session ${event.session_id}, ${event.block_ms} ms blocks`);
      setStatus(vcState.fallbackReason
        ? `Converting over WebSocket + WebCodecs (fallback: WebRTC failed, ${vcState.fallbackReason}).`
        : `Converting (${vcState.transport}, ${event.block_ms} ms blocks).`, vcState.fallbackReason ? "warning" : "ok");
      break;
    case "block":
      if (vcState.blocks === 0) log(`first block: server latency ${Math.round(event.latency_ms)} ms`);
      update({ blocks: vcState.blocks + 1, serverLatencyMs: event.latency_ms });
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
    case "warning":
      log(`warning ${event.code}: ${event.message}`, "warning");
      setStatus(`Warning: ${event.code}: ${event.message}`, "warning");
      break;
    case "error":
      showError(event);
      if (event.code === "unknown_voice" && thisCall.session && thisCall.session.ready) {
        // The answer to set_voice: the stream goes on with the previous voice, and so does the selection.
        thisCall.voiceId = thisCall.activeVoice;
        if ([...ui.voiceSelect.options].some((option) => option.value === thisCall.activeVoice)) {
          ui.voiceSelect.value = thisCall.activeVoice;
        }
      }
      break;
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

function sessionClosed(thisCall, { error, fallback }) {
  clearTimeout(thisCall.readyTimer);
  if (error && fallback && thisCall.kind === "webrtc" && !thisCall.fellBack && !thisCall.stopping) {
    fallBack(thisCall, error);
    return;
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

/** WebRTC failed: once per call, go on over the WebSocket transport with the same mic and output. */
async function fallBack(thisCall, error) {
  thisCall.fellBack = true;
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

/** Stop was pressed before a session existed. */
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
  if (thisCall.engine) closeAudio(thisCall.engine);
  setControls(false);
  updateMeters();
}

async function stop() {
  const thisCall = call;
  if (!thisCall || thisCall.stopping) return;
  thisCall.stopping = true;
  ui.stop.disabled = true;
  setConnection("closing");
  setStatus("Stopping…");
  // With a session, its onClosed ends the call; without one, start() or fallBack() notices `stopping`.
  if (thisCall.session) await thisCall.session.stop();
}

init();
