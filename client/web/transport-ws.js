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
// The session interface and what both transports share: transport-session.js.

import { createPlayer, outputLatency, SAMPLE_RATE, FRAME_SAMPLES, startCapture } from "./audio.js";
import { describeClose, errorInfo, SessionError, sleep } from "./protocol.js";
import { ControlSession } from "./transport-session.js";

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

export class WebSocketSession extends ControlSession {
  constructor({ url, start, engine, hooks }) {
    super({ url, start, engine, hooks });
    this.encoder = null;
    this.decoder = null;
    this.player = null;
    this.stopCapture = null;
    this.captureStart = null; // AudioContext time of the first sample sent
    this.framesEncoded = 0;
    this.framesSent = 0;
    this.framesReceived = 0;
    this.framesDecoded = 0;
    this.pendingBlock = null; // the last block event: its audio is the next binary message
    this.blockAtFrame = new Map(); // received-frame ordinal -> block event whose first frame it is
    this.connectTimer = null;
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
    ws.onclose = (event) => {
      clearTimeout(this.connectTimer);
      this.onSocketClosed(event);
    };
  }

  onReady() {
    this.hooks.onState("connected");
    this.beginCapture().catch((error) => this.finish({ error: errorInfo(error) }));
  }

  onBlock(event) {
    this.pendingBlock = event;
  }

  onFatalError(event) {
    this.finish({ error: event });
  }

  closedUnexpectedly(event) {
    const message = this.ready
      ? `the connection closed unexpectedly (${describeClose(event)})`
      : `the server closed the connection before the stream was ready (${describeClose(event)})`;
    return { error: { code: "connection_lost", message }, dropped: true };
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

  /** Audio flows both ways: a drop from here on is worth resuming. */
  get established() {
    return this.ready;
  }

  /** Stop the mic and send what the encoder still holds before the end message. */
  async beforeEnd() {
    if (this.stopCapture) this.stopCapture();
    if (this.encoder && this.encoder.state === "configured") await this.encoder.flush().catch(() => {});
  }

  /** Let the last scheduled frames play. */
  async afterEnd() {
    await sleep(Math.min(this.player.pendingMs(), TAIL_WAIT_MS));
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

  release() {
    clearTimeout(this.connectTimer);
    if (this.stopCapture) this.stopCapture();
    for (const codec of [this.encoder, this.decoder]) {
      if (codec && codec.state !== "closed") codec.close();
    }
    if (this.player) this.player.stop();
  }
}
