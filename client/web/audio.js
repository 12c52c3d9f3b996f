// The page's audio graph: one AudioContext per call, holding the microphone, the two level meters, the capture
// worklet (WebSocket transport), a jitter-buffered player for decoded frames, and the route to the output device.
//
//   mic ─► micSource ─► micBus ─┬─► inputAnalyser ─► keepAlive (gain 0) ─► destination
//                               └─► capture worklet (20 ms chunks, 48 kHz mono) ─► keepAlive
//   decoded frames / remote WebRTC stream ─► outputBus ─┬─► outputAnalyser ─► destination (or an <audio> element)
//                                                       └─► capture worklet while recording (recorder.js) ─► keepAlive
//
// Analysers and the worklet feed a silent gain node on the destination so that every browser keeps pulling them.
// micBus stays while the microphone behind it is re-opened (setServerNoiseSuppression).

export const SAMPLE_RATE = 48000; // of the Opus packets, both ways (protocol v1)
export const FRAME_SAMPLES = 960; // 20 ms at 48 kHz
const WORKLET_URL = new URL("./capture-worklet.js", import.meta.url);

export class AudioSetupError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/**
 * Opens the microphone and builds the graph; call from a click handler so that the context may start.
 * `serverSuppresses`: the stream's noise_suppression control (see microphoneConstraints).
 */
export async function openAudio({ inputDeviceId, serverSuppresses, outputDeviceId, outputElement, log }) {
  const micStream = await openMicrophone(inputDeviceId, serverSuppresses);
  let context;
  let micSource;
  try {
    context = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
    micSource = context.createMediaStreamSource(micStream);
  } catch (error) {
    // Some browsers (older Firefox) cannot feed a mic into a context at another rate: use the device's rate, and
    // let the capture worklet resample to 48 kHz.
    if (context) await context.close().catch(() => {});
    log(`48 kHz audio context refused (${error.name}); using the device rate and resampling`);
    context = new AudioContext({ latencyHint: "interactive" });
    micSource = context.createMediaStreamSource(micStream);
  }
  if (context.state !== "running") await context.resume().catch(() => {});

  const keepAlive = context.createGain();
  keepAlive.gain.value = 0;
  keepAlive.connect(context.destination);

  const micBus = context.createGain();
  micSource.connect(micBus);
  const inputAnalyser = context.createAnalyser();
  inputAnalyser.fftSize = 2048;
  micBus.connect(inputAnalyser);
  inputAnalyser.connect(keepAlive);

  const outputBus = context.createGain();
  const outputAnalyser = context.createAnalyser();
  outputAnalyser.fftSize = 2048;
  outputBus.connect(outputAnalyser);

  const engine = {
    context,
    micStream,
    micSource,
    micBus,
    micDeviceId: inputDeviceId,
    serverSuppresses: serverSuppresses === true,
    micSwitch: Promise.resolve(), // the last re-opening of the microphone, so that they run one after another
    micListeners: new Set(), // fn(track): told when a re-opened microphone's track replaces the previous one
    closed: false,
    keepAlive,
    inputAnalyser,
    outputBus,
    outputAnalyser,
    outputElement,
    elementRoute: null, // a MediaStreamAudioDestinationNode when the output goes through outputElement
    sampleBuffer: new Float32Array(inputAnalyser.fftSize),
    captureModule: null, // the capture worklet's addModule promise, once the first capture starts
  };
  outputAnalyser.connect(context.destination);
  await setOutputDevice(engine, outputDeviceId);
  log(`audio context at ${context.sampleRate} Hz, base latency ${ms(context.baseLatency)}, `
    + `output latency ${ms(context.outputLatency)}`);
  return engine;
}

/**
 * What the page asks of the microphone. With the server's noise suppression on (the stream's noise_suppression
 * control) the browser's own is off, so that the voice is not suppressed twice; with it off, the browser's default.
 */
export function microphoneConstraints(deviceId, serverSuppresses) {
  const audio = { channelCount: 1, echoCancellation: true, autoGainControl: false };
  if (serverSuppresses) audio.noiseSuppression = false;
  if (deviceId) audio.deviceId = { exact: deviceId };
  return audio;
}

async function openMicrophone(deviceId, serverSuppresses) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new AudioSetupError("insecure_context",
      "the microphone is only available on a secure origin (https:// or http://localhost)");
  }
  const audio = microphoneConstraints(deviceId, serverSuppresses);
  try {
    return await navigator.mediaDevices.getUserMedia({ audio, video: false });
  } catch (error) {
    const reasons = {
      NotAllowedError: ["mic_denied", "microphone permission was denied"],
      NotFoundError: ["no_microphone", "no microphone found"],
      OverconstrainedError: ["no_microphone", "the chosen microphone is not available"],
      NotReadableError: ["mic_busy", "the microphone is in use or could not be opened"],
    };
    const [code, message] = reasons[error.name] || ["microphone", `cannot open the microphone: ${error.message}`];
    throw new AudioSetupError(code, message);
  }
}

export function outputRouteSupported() {
  return typeof AudioContext !== "undefined" && "setSinkId" in AudioContext.prototype
    || typeof HTMLMediaElement !== "undefined" && "setSinkId" in HTMLMediaElement.prototype;
}

/** Sends the output to a device ('' = the default): AudioContext.setSinkId, else an <audio> element's setSinkId. */
export async function setOutputDevice(engine, deviceId) {
  const { context, outputAnalyser, outputElement } = engine;
  if (typeof context.setSinkId === "function") {
    if ((context.sinkId || "") === (deviceId || "")) return;
    try {
      await context.setSinkId(deviceId || "");
    } catch (error) {
      throw new AudioSetupError("output_device", `cannot use that output device (${error.name}: ${error.message})`);
    }
    return;
  }
  if (!deviceId) {
    if (engine.elementRoute) routeToDestination(engine);
    return;
  }
  if (!outputElement || typeof outputElement.setSinkId !== "function") {
    throw new AudioSetupError("output_device", "this browser cannot choose the output device; using the default");
  }
  if (!engine.elementRoute) {
    engine.elementRoute = context.createMediaStreamDestination();
    outputAnalyser.disconnect();
    outputAnalyser.connect(engine.elementRoute);
    outputElement.srcObject = engine.elementRoute.stream;
    outputElement.muted = false;
  }
  try {
    await outputElement.setSinkId(deviceId);
  } catch (error) {
    throw new AudioSetupError("output_device", `cannot use that output device (${error.name}: ${error.message})`);
  }
  await outputElement.play().catch(() => {});
}

function routeToDestination(engine) {
  engine.outputAnalyser.disconnect();
  engine.outputAnalyser.connect(engine.context.destination);
  engine.outputElement.pause();
  engine.outputElement.srcObject = null;
  engine.elementRoute = null;
}

/**
 * Keeps the microphone consistent with the server's noise suppression turned on or off during a call (see
 * microphoneConstraints). Chromium resolves applyConstraints({noiseSuppression}) but keeps the old processing
 * (getSettings() unchanged), and a second getUserMedia on an open device gets the open source's processing (both
 * measured with Chromium 156): so the track is stopped and the microphone opened again (a few ms), and the new
 * track takes the old one's place behind micBus and with the micListeners (a WebRTC sender). Returns when done.
 */
export function setServerNoiseSuppression(engine, serverSuppresses) {
  engine.micSwitch = engine.micSwitch.catch(() => {}).then(async () => {
    if (engine.closed || engine.serverSuppresses === serverSuppresses) return;
    engine.serverSuppresses = serverSuppresses;
    for (const track of engine.micStream.getTracks()) track.stop();
    const stream = await openMicrophone(engine.micDeviceId, serverSuppresses);
    if (engine.closed) {
      for (const track of stream.getTracks()) track.stop();
      return;
    }
    engine.micSource.disconnect();
    engine.micStream = stream;
    engine.micSource = engine.context.createMediaStreamSource(stream);
    engine.micSource.connect(engine.micBus);
    for (const listener of engine.micListeners) listener(stream.getAudioTracks()[0]);
  });
  return engine.micSwitch;
}

/**
 * Starts posting 20 ms chunks {samples: Float32Array(960), time} of `source` (the microphone unless given: the
 * recorder taps outputBus) to onChunk; returns a function that stops it.
 */
export async function startCapture(engine, onChunk, source = engine.micBus) {
  const { context, keepAlive } = engine;
  // Once per context: a module added again would register its processor again, which throws.
  engine.captureModule ??= context.audioWorklet.addModule(WORKLET_URL);
  await engine.captureModule;
  const node = new AudioWorkletNode(context, "capture-processor", {
    numberOfInputs: 1,
    numberOfOutputs: 1,
    outputChannelCount: [1],
    channelCount: 1,
    channelCountMode: "explicit",
    channelInterpretation: "speakers", // down-mix stereo to mono
  });
  node.port.onmessage = (event) => onChunk(event.data);
  source.connect(node);
  node.connect(keepAlive);
  return function stopCapture() {
    node.port.onmessage = null;
    node.port.postMessage("stop");
    try {
      source.disconnect(node);
      node.disconnect();
    } catch {
      // already disconnected: the context is closing
    }
  };
}

/**
 * Plays 48 kHz mono frames back to back on the context clock, behind a small jitter buffer. After an underrun it
 * refills the buffer; when frames pile up beyond maxAheadMs (the sender's clock runs fast) it drops frames, so
 * that the output delay stays bounded.
 */
export function createPlayer(engine, { jitterMs = 60, maxAheadMs = 200 } = {}) {
  const { context, outputBus } = engine;
  const sources = new Set();
  const counters = { underruns: 0, dropped: 0 };
  let next = 0;
  return {
    counters,
    /** Schedules one frame; returns the context time at which it starts (or would have started, if dropped). */
    play(samples) {
      const now = context.currentTime;
      if (next < now + 0.003) {
        if (next > 0) counters.underruns += 1;
        next = now + jitterMs / 1000;
      } else if (next - now > maxAheadMs / 1000) {
        counters.dropped += 1;
        return next;
      }
      const buffer = context.createBuffer(1, samples.length, SAMPLE_RATE);
      buffer.copyToChannel(samples, 0);
      const source = context.createBufferSource();
      source.buffer = buffer;
      source.connect(outputBus);
      source.onended = () => {
        sources.delete(source);
        source.disconnect();
      };
      source.start(next);
      sources.add(source);
      const at = next;
      next += buffer.duration;
      return at;
    },
    /** Milliseconds of audio still scheduled. */
    pendingMs() {
      return Math.max(0, (next - context.currentTime) * 1000);
    },
    stop() {
      for (const source of sources) {
        try {
          source.stop();
        } catch {
          // never started or already stopped
        }
      }
      sources.clear();
    },
  };
}

/** Routes a remote WebRTC stream into the output bus; returns the source node (disconnect it when done). */
export function connectRemoteStream(engine, stream) {
  const source = engine.context.createMediaStreamSource(stream);
  source.connect(engine.outputBus);
  return source;
}

/** Seconds between a sample leaving the graph and reaching the speaker, as far as the browser knows. */
export function outputLatency(engine) {
  const { context } = engine;
  return (context.outputLatency || 0) + (context.baseLatency || 0);
}

/** Root mean square of the analyser's current window (linear, 0..1). */
export function analyserRms(engine, analyser) {
  const data = engine.sampleBuffer;
  analyser.getFloatTimeDomainData(data);
  let sum = 0;
  for (let i = 0; i < data.length; i++) sum += data[i] * data[i];
  return Math.sqrt(sum / data.length);
}

export async function closeAudio(engine) {
  engine.closed = true;
  for (const track of engine.micStream.getTracks()) track.stop();
  if (engine.elementRoute) {
    engine.outputElement.pause();
    engine.outputElement.srcObject = null;
  }
  await engine.context.close().catch(() => {});
}

function ms(seconds) {
  return typeof seconds === "number" ? `${Math.round(seconds * 1000)} ms` : "unknown";
}
