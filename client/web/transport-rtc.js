// Transport 2 (the default): WebRTC audio, with signalling and the protocol's events on a WebSocket at /v1/rtc
// that stays open for the whole call.
//
//   1. create the peer connection, add the mic track, create an offer, wait for ICE gathering to
//      complete (non-trickle: every candidate goes in the one offer);
//   2. open the signalling socket, send the start message (as on /v1/stream), then {"type":"offer","sdp"};
//   3. the server sends ready (for the start message) and {"type":"answer","sdp"} (for the offer), in either
//      order, then the WebSocket protocol's events: block, late, voice_set, warning, error, end;
//   4. the remote track plays through a muted <audio> element (without one, Chromium's WebAudio hears silence) and
//      WebAudio (output meter and device);
//   5. hang up: {"type":"end"}, wait briefly for the end event, then stop transceivers, tracks, the peer
//      connection and the socket.
//
// Failures of WebRTC itself (no answer in 8 s, signalling refused, ICE or the connection failed, the server's
// bad_offer / connection_failed errors) end the session with fallback: true, so that the page can retry over the
// WebSocket transport. Other server errors (unauthorized, unknown_voice, overloaded, ...) do not.
// ICE gets ICE_DEADLINE_MS from the answer: with no candidate pair that works (UDP blocked, no TURN) Chromium never
// says "failed" (it stays "checking", or "new" with no pairs at all), so this deadline is what detects it. When the
// page will fall back (`endsOnFallback`), a failed session that had started sends `end` before it closes: the server
// then frees it at once, instead of holding it on a converter for a resume that will never come.
//
// Resume: failures of the connection rather than refusals by the server end the session with dropped: true, among
// them the server's connection_failed once the media had connected (it then keeps the session). When the call was
// established, the page resumes it (app.js) with a new session: a new signalling socket whose start message carries
// `resume`, and a new peer connection whose offer re-negotiates the media exactly as a first call does. The old
// peer connection is closed with its session, so the microphone is not sent anywhere, nor queued, in between.
//
// Round trip (an estimate: RTP audio cannot be tied to a block exactly): the server's input starts with the first
// RTP packet, sent when the peer connection becomes connected; block i's audio leaves the server with its block
// event and plays after the receive jitter buffer (getStats) and the output latency:
//   (block event arrival + jitter buffer + output latency) - (connected time + input_start_ms),
// less the input_start_ms of block resumed_at_block for a resumed session, whose input starts again there.

import { connectRemoteStream, outputLatency } from "./audio.js";
import { deferred, describeClose, errorInfo, SessionError, withTimeout } from "./protocol.js";
import { ControlSession } from "./transport-session.js";

const GATHER_TIMEOUT_MS = 5000; // then send the candidates found so far
const OPEN_TIMEOUT_MS = 8000;
const ANSWER_TIMEOUT_MS = 8000;
// Answer applied -> peer connection connected. ICE and DTLS take tens of milliseconds on a LAN and one to two seconds
// through a distant TURN relay (the relay is allocated while gathering, before the offer); 4 s leaves room for that
// and keeps the fallback to the WebSocket transport quick.
const ICE_DEADLINE_MS = 4000;
const DISCONNECTED_MS = 5000; // "disconnected" this long counts as failed (Chromium takes ~15 s to say "failed")
// Server error codes that mean WebRTC itself failed (app/transport/webrtc.py): the WebSocket transport may work.
const WEBRTC_ERRORS = new Set(["bad_offer", "connection_failed"]);
const STATS_INTERVAL_MS = 1000;

/** A peer connection whose every state change goes to onStateChange(name, value). */
export function createPeerConnection(iceServers, onStateChange) {
  const pc = new RTCPeerConnection({ iceServers });
  pc.addEventListener("icegatheringstatechange", () => onStateChange("iceGathering", pc.iceGatheringState));
  pc.addEventListener("iceconnectionstatechange", () => onStateChange("ice", pc.iceConnectionState));
  pc.addEventListener("signalingstatechange", () => onStateChange("signaling", pc.signalingState));
  pc.addEventListener("connectionstatechange", () => onStateChange("peer", pc.connectionState));
  return pc;
}

/** Resolves when ICE gathering is complete, or after timeoutMs (the offer then holds what was gathered). */
export function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      pc.removeEventListener("icegatheringstatechange", check);
      resolve(false);
    }, timeoutMs);
    function check() {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve(true);
      }
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

/** Opens a WebSocket; rejects (fallback) if it closes or does not open within timeoutMs. */
function openSocket(url, timeoutMs) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const timer = setTimeout(() => {
      ws.close();
      reject(new SessionError("signalling_timeout", `no signalling connection to ${url} within ${timeoutMs / 1000} s`,
        { fallback: true, dropped: true }));
    }, timeoutMs);
    ws.onopen = () => {
      clearTimeout(timer);
      ws.onclose = null;
      resolve(ws);
    };
    ws.onclose = (event) => {
      clearTimeout(timer);
      reject(new SessionError("signalling_refused", `the signalling socket ${url} closed (${describeClose(event)})`,
        { fallback: true, dropped: true }));
    };
  });
}

/** Sends the start message and the offer; resolves with the server's answer, or rejects (fallback) after timeoutMs. */
export async function negotiate(session) {
  const { pc, ws, hooks } = session;
  ws.send(JSON.stringify(session.start));
  hooks.onStartSent();
  ws.send(JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }));
  hooks.log("signalling: start and offer sent; waiting for the answer");
  const answer = await withTimeout(session.answer.promise, ANSWER_TIMEOUT_MS,
    () => new SessionError("no_answer", `no WebRTC answer within ${ANSWER_TIMEOUT_MS / 1000} s`,
      { fallback: true, dropped: true }));
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  hooks.log("signalling: answer applied");
}

export class RtcSession extends ControlSession {
  constructor({ url, start, iceServers, engine, remoteAudio, hooks, endsOnFallback = false }) {
    super({ url, start, engine, hooks });
    this.endsOnFallback = endsOnFallback; // the page starts a new session over WebSocket if WebRTC fails
    this.socketName = "signalling";
    this.iceServers = iceServers;
    this.remoteAudio = remoteAudio;
    this.pc = null;
    this.onMicTrack = null; // in engine.micListeners while this session sends the microphone
    this.remoteSource = null;
    this.answer = deferred();
    this.answered = false;
    this.peerConnected = false;
    this.connectedAt = null; // performance.now() when media started to flow
    this.timers = [];
    this.disconnectTimer = null;
    this.statsTimer = null;
    this.lastStats = { packetsSent: 0, packetsReceived: 0, packetsLost: 0, jitterBufferMs: null, rttMs: null };
    this.jitterTotals = null;
  }

  failureOutcome(error) {
    if (error instanceof SessionError) return super.failureOutcome(error);
    // Anything else is the browser refusing WebRTC (no codec, bad SDP): the WebSocket transport may still work.
    return { error: { code: "webrtc_failed", message: errorInfo(error).message }, fallback: true };
  }

  async run() {
    this.hooks.onState("connecting");
    if (typeof RTCPeerConnection === "undefined") {
      throw new SessionError("webrtc_unsupported", "this browser has no RTCPeerConnection", { fallback: true });
    }
    this.pc = createPeerConnection(this.iceServers, (name, value) => this.onPeerState(name, value));
    this.pc.addEventListener("track", (event) => this.onTrack(event));
    // The engine's own track, not a clone: a clone would keep the microphone open with its old processing when the
    // engine re-opens it (setServerNoiseSuppression), which then replaces the track being sent. The engine stops it
    // (the call may go on over WebSocket after this session); closing the peer connection leaves it live.
    const [track] = this.engine.micStream.getAudioTracks();
    const sender = this.pc.addTrack(track, new MediaStream([track]));
    this.onMicTrack = (replacement) => sender.replaceTrack(replacement).catch((error) => {
      this.hooks.log(`cannot send the re-opened microphone: ${errorInfo(error).message}`);
    });
    this.engine.micListeners.add(this.onMicTrack);
    await this.pc.setLocalDescription(await this.pc.createOffer());
    this.hooks.log("offer created; gathering ICE candidates");
    const complete = await waitForIceGathering(this.pc, GATHER_TIMEOUT_MS);
    if (!complete) this.hooks.log(`ICE gathering not complete after ${GATHER_TIMEOUT_MS / 1000} s; sending what was found`);
    if (this.closed) return;

    this.hooks.log(`signalling: connecting to ${this.url}`);
    this.ws = await openSocket(this.url, OPEN_TIMEOUT_MS);
    if (this.closed) {
      this.ws.close(1000);
      return;
    }
    // Audio travels over RTP; nothing binary is expected here.
    this.ws.onmessage = (message) => typeof message.data === "string" && this.onText(message.data);
    this.ws.onclose = (event) => this.onSocketClosed(event);
    await negotiate(this);
    if (this.closed) return;
    this.answered = true;
    this.timers.push(setTimeout(() => {
      if (!this.peerConnected) {
        this.fail({
          error: { code: "ice_timeout", message: `the WebRTC connection did not connect within ${ICE_DEADLINE_MS / 1000} s` },
          fallback: true,
          dropped: true,
        });
      }
    }, ICE_DEADLINE_MS));
    this.statsTimer = setInterval(() => this.pollStats(), STATS_INTERVAL_MS);
  }

  onPeerState(name, value) {
    this.hooks.onRtcState(name, value);
    if (this.closed) return;
    if (name === "peer" && value === "connected" && !this.peerConnected) {
      this.peerConnected = true;
      this.connectedAt = performance.now();
      this.maybeConnected();
    }
    if (name === "peer") {
      clearTimeout(this.disconnectTimer);
      if (value === "disconnected" && !this.stopping) {
        this.disconnectTimer = setTimeout(() => this.fail({
          error: { code: "webrtc_failed", message: `the WebRTC connection was interrupted for ${DISCONNECTED_MS / 1000} s` },
          fallback: true,
          dropped: true,
        }), DISCONNECTED_MS);
      }
    }
    if ((name === "peer" || name === "ice") && value === "failed" && !this.stopping) {
      const what = name === "ice" ? "ICE connectivity" : "the WebRTC connection";
      this.fail({ error: { code: "webrtc_failed", message: `${what} failed` }, fallback: true, dropped: true });
    }
  }

  /**
   * WebRTC failed: `failedAt` says when (the page times its fallback from it). A session the page will not resume
   * (it never carried audio, and the page falls back) is ended on the server first.
   */
  fail(outcome) {
    const failed = { ...outcome, failedAt: performance.now() };
    if (failed.fallback && this.endsOnFallback && !this.established) this.giveUp(failed);
    else this.finish(failed);
  }

  maybeConnected() {
    if (this.ready && this.peerConnected && !this.stopping) this.hooks.onState("connected");
  }

  onTrack(event) {
    const stream = event.streams[0] || new MediaStream([event.track]);
    this.hooks.log(`remote ${event.track.kind} track received`);
    // Chromium delivers remote WebRTC audio to WebAudio only while an element plays the stream too; muted, so
    // that the user hears WebAudio's copy (which honours the chosen output device) only.
    this.remoteAudio.muted = true;
    this.remoteAudio.srcObject = stream;
    this.remoteAudio.play().catch(() => {});
    if (this.remoteSource) this.remoteSource.disconnect();
    this.remoteSource = connectRemoteStream(this.engine, stream);
  }

  handleTransportEvent(event) {
    if (event.type !== "answer") return false;
    this.answer.resolve(event);
    return true;
  }

  onReady() {
    this.maybeConnected();
  }

  onFatalError(event) {
    // The media path of a call that worked died: the server keeps the session for a resume.
    const dropped = event.code === "connection_failed" && this.peerConnected;
    this.finish({ error: event, fallback: WEBRTC_ERRORS.has(event.code), dropped });
  }

  onBlock(event) {
    if (this.connectedAt === null) return;
    const jitterMs = this.lastStats.jitterBufferMs || 0;
    const playsAt = performance.now() + jitterMs + outputLatency(this.engine) * 1000;
    this.hooks.onRoundTrip(playsAt - (this.connectedAt + event.input_start_ms - this.inputOffsetMs), event.index);
  }

  /** Audio flows both ways: a drop from here on is worth resuming. */
  get established() {
    return this.ready && this.peerConnected;
  }

  async pollStats() {
    if (this.closed || !this.pc) return;
    let report;
    try {
      report = await this.pc.getStats();
    } catch {
      return;
    }
    const stats = { ...this.lastStats };
    report.forEach((entry) => {
      if (entry.type === "outbound-rtp" && entry.kind === "audio") stats.packetsSent = entry.packetsSent || 0;
      if (entry.type === "inbound-rtp" && entry.kind === "audio") {
        stats.packetsReceived = entry.packetsReceived || 0;
        stats.packetsLost = entry.packetsLost || 0;
        // The jitter buffer's delay over the last interval: totals are cumulative.
        const totals = { delay: entry.jitterBufferDelay || 0, count: entry.jitterBufferEmittedCount || 0 };
        const previous = this.jitterTotals || { delay: 0, count: 0 };
        if (totals.count > previous.count) {
          stats.jitterBufferMs = ((totals.delay - previous.delay) / (totals.count - previous.count)) * 1000;
        }
        this.jitterTotals = totals;
      }
      if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded"
        && typeof entry.currentRoundTripTime === "number") {
        stats.rttMs = entry.currentRoundTripTime * 1000;
      }
    });
    this.lastStats = stats;
  }

  closedUnexpectedly(event) {
    if (!this.answered) {
      return {
        error: { code: "signalling_closed", message: `the signalling socket closed before an answer (${describeClose(event)})` },
        fallback: true,
        dropped: true,
      };
    }
    return { error: { code: "connection_lost", message: `the signalling socket closed (${describeClose(event)})` }, dropped: true };
  }

  stats() {
    return { ...this.lastStats };
  }

  /** Transceivers, then tracks, then the peer connection (ControlSession.finish closes the socket). */
  release() {
    for (const timer of this.timers) clearTimeout(timer);
    clearTimeout(this.disconnectTimer);
    clearInterval(this.statsTimer);
    this.answer.reject(new SessionError("closed", "the session closed"));
    if (this.pc) {
      for (const transceiver of this.pc.getTransceivers()) {
        try {
          transceiver.stop();
        } catch {
          // already stopped, or the connection is closed
        }
      }
    }
    if (this.onMicTrack) this.engine.micListeners.delete(this.onMicTrack);
    if (this.pc) this.pc.close();
    if (this.remoteSource) this.remoteSource.disconnect();
    this.remoteAudio.pause();
    this.remoteAudio.srcObject = null;
    if (this.pc) {
      // close() fires no state events: report the final states here.
      this.hooks.onRtcState("ice", this.pc.iceConnectionState);
      this.hooks.onRtcState("signaling", this.pc.signalingState);
      this.hooks.onRtcState("peer", this.pc.connectionState);
    }
  }
}
