// The page's audio graph: one AudioContext per call, holding the microphone, the two level meters, the capture
// worklet (WebSocket transport), a jitter-buffered player for decoded frames, and the route to the output device.
//
//   mic ─► micSource ─┬─► inputAnalyser ─► keepAlive (gain 0) ─► destination
//                     └─► capture worklet (20 ms chunks, 48 kHz mono) ─► keepAlive
//   decoded frames / remote WebRTC stream ─► outputBus ─► outputAnalyser ─► destination (or an <audio> element)
//
// Analysers and the worklet feed a silent gain node on the destination so that every browser keeps pulling them.

export const SAMPLE_RATE = 48000; // of the Opus packets, both ways (protocol v1)
export const FRAME_SAMPLES = 960; // 20 ms at 48 kHz
const WORKLET_URL = new URL("./capture-worklet.js", import.meta.url);

export class AudioSetupError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** Opens the microphone and builds the graph; call from a click handler so that the context may start. */
export async function openAudio({ inputDeviceId, outputDeviceId, outputElement, log }) {
  const micStream = await openMicrophone(inputDeviceId);
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

  const inputAnalyser = context.createAnalyser();
  inputAnalyser.fftSize = 2048;
  micSource.connect(inputAnalyser);
  inputAnalyser.connect(keepAlive);

  const outputBus = context.createGain();
  const outputAnalyser = context.createAnalyser();
  outputAnalyser.fftSize = 2048;
  outputBus.connect(outputAnalyser);

  const engine = {
    context,
    micStream,
    micSource,
    keepAlive,
    inputAnalyser,
    outputBus,
    outputAnalyser,
    outputElement,
    elementRoute: null, // a MediaStreamAudioDestinationNode when the output goes through outputElement
    sampleBuffer: new Float32Array(inputAnalyser.fftSize),
  };
  outputAnalyser.connect(context.destination);
  await setOutputDevice(engine, outputDeviceId);
  log(`audio context at ${context.sampleRate} Hz, base latency ${ms(context.baseLatency)}, `
    + `output latency ${ms(context.outputLatency)}`);
  return engine;
}

async function openMicrophone(deviceId) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new AudioSetupError("insecure_context",
      "the microphone is only available on a secure origin (https:// or http://localhost)");
  }
  const audio = {
    channelCount: 1,
    echoCancellation: true,
    noiseSuppression: false, // the model wants the voice as it is
    autoGainControl: false,
  };
  if (deviceId) audio.deviceId = { exact: deviceId };
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

/** Starts posting 20 ms chunks {samples: Float32Array(960), time} to onChunk; returns a function that stops it. */
export async function startCapture(engine, onChunk) {
  const { context, micSource, keepAlive } = engine;
  await context.audioWorklet.addModule(WORKLET_URL);
  const node = new AudioWorkletNode(context, "capture-processor", {
    numberOfInputs: 1,
    numberOfOutputs: 1,
    outputChannelCount: [1],
    channelCount: 1,
    channelCountMode: "explicit",
    channelInterpretation: "speakers", // down-mix stereo to mono
  });
  node.port.onmessage = (event) => onChunk(event.data);
  micSource.connect(node);
  node.connect(keepAlive);
  return function stopCapture() {
    node.port.onmessage = null;
    node.port.postMessage("stop");
    try {
      micSource.disconnect(node);
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
