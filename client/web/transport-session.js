// What both transports (transport-ws.js, transport-rtc.js) do the same way with a session on their control socket:
// the protocol's events (ready, block, end, error), set_voice, hanging up with end, and tearing down once.
//
// Session interface (what app.js uses): begin(), stop() ends gracefully (end message, wait for the end event),
// abort(error, {dropped}) tears down at once, setVoice(id), setControls(changes), stats(), and `established` (audio
// flows both ways).
// Hooks: log, onState, onStartSent, onEvent, onRoundTrip, onRtcState (WebRTC only), onClosed({error, fallback,
// dropped, failedAt}) — called exactly once; `dropped` says the connection failed without the server's end or error
// event, so the server may still hold the session for a resume; `failedAt` (performance.now()) when WebRTC failed.
//
// A transport extends ControlSession and supplies: run() (connects; every failure it throws goes to fail()),
// onReady(event), onBlock(event), onFatalError(event), closedUnexpectedly(closeEvent) (the outcome of a socket that
// closed before the end event), release() (its own resources), and optionally beforeEnd() / afterEnd() around the
// end message and handleTransportEvent(event) for events of its own (true when handled).

import { deferred, describeClose, errorInfo, isFatal, parseEvent, SessionError, sleep } from "./protocol.js";

const END_WAIT_MS = 3000; // after "end", the server converts what is left of the input, then sends its end event
// A session given up before it carried audio has nothing left to convert: the server's end event (the session freed)
// comes within tens of milliseconds on a healthy connection.
const GIVE_UP_END_WAIT_MS = 1000;

export class ControlSession {
  constructor({ url, start, engine, hooks }) {
    this.url = url;
    this.start = start;
    this.engine = engine;
    this.hooks = hooks;
    this.ws = null; // the control socket
    this.socketName = "WebSocket"; // how the log names the control socket
    this.ready = false;
    this.ended = deferred(); // the end event arrived, or the socket closed
    this.endReceived = false;
    this.endSent = false;
    this.stopping = false;
    this.givingUp = null; // the outcome of a session being ended on failure (giveUp), while its end event is awaited
    this.closed = false;
    this.inputOffsetMs = 0; // input_start_ms of this connection's first block: > 0 once resumed
  }

  /** Runs the session in the background; every outcome ends in hooks.onClosed. */
  begin() {
    this.run().catch((error) => this.fail(this.failureOutcome(error)));
    return this;
  }

  /** The session failed with this outcome; a transport may first tell the server (RtcSession). */
  fail(outcome) {
    this.finish(outcome);
  }

  /** The outcome of an error thrown by run(). */
  failureOutcome(error) {
    if (error instanceof SessionError) {
      return { error: errorInfo(error), fallback: error.fallback, dropped: error.dropped };
    }
    return { error: errorInfo(error) };
  }

  /** A text message on the control socket. */
  onText(text) {
    if (this.closed) return;
    let event;
    try {
      event = parseEvent(text);
    } catch (error) {
      this.finish({ error: errorInfo(error) });
      return;
    }
    if (this.givingUp) {
      // The session is over for the page: only the server's end event (the session freed) still matters.
      if (event.type === "end") {
        this.endReceived = true;
        this.ended.resolve();
      }
      return;
    }
    if (this.handleTransportEvent(event)) return;
    this.hooks.onEvent(event);
    switch (event.type) {
      case "ready":
        this.ready = true;
        this.inputOffsetMs = (event.resumed_at_block ?? 0) * event.block_ms;
        this.onReady(event);
        break;
      case "block":
        this.onBlock(event);
        break;
      case "end":
        this.endReceived = true;
        this.ended.resolve();
        break;
      case "error":
        if (isFatal(event, this.ready)) this.onFatalError(event);
        break;
      default:
        break;
    }
  }

  handleTransportEvent() {
    return false;
  }

  onSocketClosed(event) {
    this.ended.resolve();
    if (this.closed) return;
    this.hooks.log(`${this.socketName}: closed (${describeClose(event)})`);
    if (this.givingUp) this.finish(this.givingUp);
    else if (this.endReceived || this.stopping) this.finish({});
    else this.finish(this.closedUnexpectedly(event));
  }

  get socketOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  setVoice(voiceId) {
    if (this.ready && !this.stopping && this.socketOpen) {
      this.ws.send(JSON.stringify({ type: "set_voice", voice_id: voiceId }));
      return true;
    }
    return false;
  }

  /** Sends set_controls with these fields only ({input_gain_db: 6}); the server answers controls_set. */
  setControls(changes) {
    if (this.ready && !this.stopping && !this.givingUp && this.socketOpen) {
      this.ws.send(JSON.stringify({ type: "set_controls", ...changes }));
      return true;
    }
    return false;
  }

  /** Hang up: end message, wait (briefly) for the server to finish its output and send its end event, then close. */
  async stop() {
    if (this.closed || this.stopping) return;
    this.stopping = true;
    this.hooks.onState("closing");
    await this.beforeEnd();
    if (this.socketOpen) {
      this.ws.send(JSON.stringify({ type: "end" }));
      this.endSent = true;
      this.hooks.log("end sent; waiting for the server's end event");
      if (this.ready) {
        await Promise.race([this.ended.promise, sleep(END_WAIT_MS)]);
        await this.afterEnd();
      }
    }
    this.finish({});
  }

  async beforeEnd() {}

  async afterEnd() {}

  abort(error, { dropped = false } = {}) {
    this.finish({ error, dropped });
  }

  /**
   * Ends a failed session that nobody will resume, then finishes with `outcome`. A socket closed without `end` leaves
   * the session on its converter for a resume (30 s), holding a slot; after `end` the server frees it at once. Waits
   * briefly for the server's end event, so that a session started next does not find this one still held.
   */
  async giveUp(outcome) {
    if (this.closed || this.givingUp) return;
    this.givingUp = outcome;
    if (this.ready && this.socketOpen && !this.endSent) {
      this.ws.send(JSON.stringify({ type: "end" }));
      this.endSent = true;
      this.hooks.log("end sent: the server frees the session instead of holding it for a resume");
      await Promise.race([this.ended.promise, sleep(GIVE_UP_END_WAIT_MS)]);
      this.hooks.log(this.endReceived ? "the server ended the session"
        : `no end event within ${GIVE_UP_END_WAIT_MS / 1000} s; the server ends the session when it reads "end"`);
    }
    this.finish(outcome);
  }

  /** Tears everything down once; the outcome goes to hooks.onClosed. */
  finish({ error = null, fallback = false, dropped = false, failedAt = null }) {
    if (this.closed) return;
    this.closed = true;
    this.ended.resolve();
    this.release();
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000);
    this.hooks.onClosed({ error, fallback, dropped, failedAt });
  }
}
