// Transport 1: protocol v1 over a WebSocket at /v1/stream, with WebCodecs for Opus.
//
// mic ─► capture worklet (960-sample chunks) ─► AudioEncoder (Opus, 20 ms) ─► one binary message per packet
// binary messages ─► AudioDecoder ─► jitter-buffered player ─► output device
//
// Round trip: the worklet stamps every chunk with its capture time on the AudioContext clock, and the player
// knows when each decoded frame starts on the same clock. Block i answers the input that started
// input_start_ms after the first packet sent, so its round trip is
//   (start of its first output frame + output latency) - (capture time of the first packet + input_start_ms).
// A resumed session's input starts again at block resumed_at_block, so that block's input_start_ms is subtracted.
//
// One session is one connection. A connection that drops is not repaired here: the page starts a new session whose
// start message resumes the old one (app.js). Capture starts with each session's ready event and stops with the
// session, so what the microphone hears while no connection is up is dropped, never queued: this is a live call,
// and minutes of stale input sent after an outage would only be dropped by the server as late.
//
// Session interface (shared with transport-rtc.js): stop() ends gracefully (end message, wait for the end event),
// abort(error, {dropped}) tears down at once, setVoice(id), stats(), and `established` (audio flows both ways).
// Hooks: log, onState, onStartSent, onEvent, onRoundTrip, onClosed({error, fallback, dropped}) — called exactly
// once; `dropped` says the connection failed without the server's end or error event, so the server may still hold
// the session for a resume.

import { createPlayer, outputLatency, SAMPLE_RATE, FRAME_SAMPLES, startCapture } from "./audio.js";
import { deferred, describeClose, errorInfo, isFatal, parseEvent, SessionError, sleep } from "./protocol.js";

const ENCODER_CONFIG = {
  codec: "opus",
  sampleRate: SAMPLE_RATE,
  numberOfChannels: 1,
  bitrate: 32000,
  opus: { frameDuration: 20000 }, // µs: one packet per 20 ms frame, as the protocol wants
};
const DECODER_CONFIG = { codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 };
const FRAME_US = (FRAME_SAMPLES / SAMPLE_RATE) * 1e6;
const JITTER_MS = 60;
const CONNECT_TIMEOUT_MS = 10000;
const END_WAIT_MS = 3000; // after "end", the server converts what is left of the input, then sends its end event
const TAIL_WAIT_MS = 500; // let the last scheduled frames play before the context closes

/** Throws a SessionError unless this browser can encode and decode 48 kHz mono Opus with WebCodecs. */
export async function checkWebCodecs() {
  if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") {
    throw new SessionError("webcodecs_unsupported", "this browser has no WebCodecs audio (AudioEncoder/AudioDecoder)");
  }
  const [encoder, decoder] = await Promise.all([
    AudioEncoder.isConfigSupported(ENCODER_CONFIG),
    AudioDecoder.isConfigSupported(DECODER_CONFIG),
  ]);
  if (!encoder.supported || !decoder.supported) {
    throw new SessionError("webcodecs_unsupported", "this browser's WebCodecs cannot encode or decode Opus");
  }
}

export class WebSocketSession {
  constructor({ url, start, engine, hooks }) {
    this.url = url;
    this.start = start;
    this.engine = engine;
    this.hooks = hooks;
    this.ws = null;
    this.encoder = null;
    this.decoder = null;
    this.player = null;
    this.stopCapture = null;
    this.ready = false;
    this.ended = deferred(); // the end event arrived, or the socket closed
    this.endReceived = false;
    this.endSent = false;
    this.stopping = false;
    this.closed = false;
    this.captureStart = null; // AudioContext time of the first sample sent
    this.framesEncoded = 0;
    this.framesSent = 0;
    this.framesReceived = 0;
    this.framesDecoded = 0;
    this.pendingBlock = null; // the last block event: its audio is the next binary message
    this.inputOffsetMs = 0; // input_start_ms of this connection's first block: > 0 once resumed
    this.blockAtFrame = new Map(); // received-frame ordinal -> block event whose first frame it is
    this.connectTimer = null;
  }

  /** Runs the session in the background; every outcome ends in hooks.onClosed. */
  begin() {
    this.run().catch((error) => this.finish({ error: errorInfo(error) }));
    return this;
  }

  async run() {
    this.hooks.onState("connecting");
    await checkWebCodecs();
    this.decoder = new AudioDecoder({
      output: (data) => this.onDecoded(data),
      error: (error) => this.finish({ error: { code: "decode_failed", message: `Opus decoding failed: ${error.message}` } }),
    });
    this.decoder.configure(DECODER_CONFIG);
    this.encoder = new AudioEncoder({
      output: (chunk) => this.onEncoded(chunk),
      error: (error) => this.finish({ error: { code: "encode_failed", message: `Opus encoding failed: ${error.message}` } }),
    });
    this.encoder.configure(ENCODER_CONFIG);
    this.player = createPlayer(this.engine, { jitterMs: JITTER_MS });
    if (this.closed) return;

    this.hooks.log(`WebSocket: connecting to ${this.url}`);
    const ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.connectTimer = setTimeout(() => {
      const error = { code: "connect_timeout", message: `no connection to ${this.url} within 10 s` };
      this.finish({ error, dropped: true });
    }, CONNECT_TIMEOUT_MS);
    ws.onopen = () => {
      clearTimeout(this.connectTimer);
      this.hooks.log("WebSocket: open; start message sent");
      ws.send(JSON.stringify(this.start));
      this.hooks.onStartSent();
    };
    ws.onmessage = (message) => {
      if (typeof message.data === "string") this.onText(message.data);
      else this.onAudio(message.data);
    };
    ws.onerror = () => this.hooks.log("WebSocket: error");
    ws.onclose = (event) => this.onSocketClosed(event);
  }

  onText(text) {
    let event;
    try {
      event = parseEvent(text);
    } catch (error) {
      this.finish({ error: errorInfo(error) });
      return;
    }
    this.hooks.onEvent(event);
    switch (event.type) {
      case "ready":
        this.ready = true;
        this.inputOffsetMs = (event.resumed_at_block ?? 0) * event.block_ms;
        this.hooks.onState("connected");
        this.beginCapture().catch((error) => this.finish({ error: errorInfo(error) }));
        break;
      case "block":
        this.pendingBlock = event;
        break;
      case "end":
        this.endReceived = true;
        this.ended.resolve();
        break;
      case "error":
        if (isFatal(event, this.ready)) this.finish({ error: event });
        break;
      default:
        break;
    }
  }

  async beginCapture() {
    this.stopCapture = await startCapture(this.engine, (chunk) => this.onChunk(chunk));
    if (this.closed || this.stopping) this.stopCapture();
    this.hooks.log("capturing: 20 ms Opus packets at 48 kHz mono");
  }

  onChunk({ samples, time }) {
    if (this.closed || this.endSent || this.encoder.state !== "configured") return;
    if (this.captureStart === null) this.captureStart = time;
    const data = new AudioData({
      format: "f32-planar",
      sampleRate: SAMPLE_RATE,
      numberOfFrames: samples.length,
      numberOfChannels: 1,
      timestamp: this.framesEncoded * FRAME_US,
      data: samples,
    });
    this.framesEncoded += 1;
    this.encoder.encode(data);
    data.close();
  }

  onEncoded(chunk) {
    if (this.closed || this.endSent || this.ws.readyState !== WebSocket.OPEN) return;
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    this.ws.send(packet);
    this.framesSent += 1;
  }

  onAudio(buffer) {
    if (this.closed || this.decoder.state !== "configured") return;
    if (this.pendingBlock) {
      this.blockAtFrame.set(this.framesReceived, this.pendingBlock);
      this.pendingBlock = null;
    }
    const chunk = new EncodedAudioChunk({ type: "key", timestamp: this.framesReceived * FRAME_US, data: buffer });
    this.framesReceived += 1;
    this.decoder.decode(chunk);
  }

  onDecoded(data) {
    const ordinal = this.framesDecoded;
    this.framesDecoded += 1;
    if (this.closed) {
      data.close();
      return;
    }
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    data.close();
    const startsAt = this.player.play(samples);
    const block = this.blockAtFrame.get(ordinal);
    if (block !== undefined) {
      this.blockAtFrame.delete(ordinal);
      if (this.captureStart !== null) {
        const playedMs = (startsAt + outputLatency(this.engine) - this.captureStart) * 1000;
        this.hooks.onRoundTrip(playedMs - (block.input_start_ms - this.inputOffsetMs), block.index);
      }
    }
  }

  onSocketClosed(event) {
    clearTimeout(this.connectTimer);
    this.ended.resolve();
    if (this.closed) return;
    this.hooks.log(`WebSocket: closed (${describeClose(event)})`);
    if (this.endReceived || this.stopping) {
      this.finish({});
    } else {
      const message = this.ready
        ? `the connection closed unexpectedly (${describeClose(event)})`
        : `the server closed the connection before the stream was ready (${describeClose(event)})`;
      this.finish({ error: { code: "connection_lost", message }, dropped: true });
    }
  }

  /** Audio flows both ways: a drop from here on is worth resuming. */
  get established() {
    return this.ready;
  }

  setVoice(voiceId) {
    if (this.ready && !this.endSent && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: "set_voice", voice_id: voiceId }));
      return true;
    }
    return false;
  }

  /** Hang up: stop the mic, send end, let the server finish its output, then close. */
  async stop() {
    if (this.closed || this.stopping) return;
    this.stopping = true;
    this.hooks.onState("closing");
    if (this.stopCapture) this.stopCapture();
    if (this.ready && this.ws && this.ws.readyState === WebSocket.OPEN) {
      if (this.encoder.state === "configured") await this.encoder.flush().catch(() => {});
      this.ws.send(JSON.stringify({ type: "end" }));
      this.endSent = true;
      this.hooks.log("end sent; waiting for the server's end event");
      await Promise.race([this.ended.promise, sleep(END_WAIT_MS)]);
      await sleep(Math.min(this.player.pendingMs(), TAIL_WAIT_MS));
    }
    this.finish({});
  }

  abort(error, { dropped = false } = {}) {
    this.finish({ error, dropped });
  }

  stats() {
    return {
      packetsSent: this.framesSent,
      packetsReceived: this.framesReceived,
      underruns: this.player ? this.player.counters.underruns : 0,
      playbackDropped: this.player ? this.player.counters.dropped : 0,
      jitterBufferMs: JITTER_MS,
    };
  }

  /** Tears everything down once; the outcome goes to hooks.onClosed. */
  finish({ error = null, fallback = false, dropped = false }) {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.connectTimer);
    if (this.stopCapture) this.stopCapture();
    for (const codec of [this.encoder, this.decoder]) {
      if (codec && codec.state !== "closed") codec.close();
    }
    if (this.player) this.player.stop();
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
    this.ended.resolve();
    this.hooks.onClosed({ error, fallback, dropped });
  }
}

