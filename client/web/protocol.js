// What both transports share of protocol v1 (app/transport/protocol.py is the spec): the start message, event
// parsing, which errors end a stream, and how errors read on the page.

export const PROTOCOL_VERSION = 1;
export const FRAME_MS = 20;

/**
 * A failure with a stable code. `fallback` marks a WebRTC failure that the WebSocket transport may get around;
 * `dropped` one of the connection rather than a refusal by the server, after which the session may be resumed.
 */
export class SessionError extends Error {
  constructor(code, message, { fallback = false, dropped = false } = {}) {
    super(message);
    this.code = code;
    this.fallback = fallback;
    this.dropped = dropped;
  }
}

/**
 * `resume` ({session_id, resume_token}) reattaches to a session whose connection dropped (protocol step 7); the
 * live `controls` live with the connection, so a resume sends them again. Only fields that are set are sent, so a
 * server that predates a field is asked for it only when the user uses it.
 */
export function startMessage({ token, voiceId, settings, controls, resume }) {
  const message = { type: "start", version: PROTOCOL_VERSION, token, voice_id: voiceId, realtime: true };
  if (settings && Object.keys(settings).length > 0) message.settings = settings;
  if (controls && Object.keys(controls).length > 0) message.controls = controls;
  if (resume) message.resume = resume;
  return message;
}

/** ws(s)://this-host/path: the page's own origin, since the ingress serves both. */
export function socketUrl(path) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${path}`;
}

export function parseEvent(text) {
  let event;
  try {
    event = JSON.parse(text);
  } catch {
    throw new SessionError("bad_event", `the server sent text that is not JSON: ${text.slice(0, 80)}`);
  }
  if (!event || typeof event.type !== "string") {
    throw new SessionError("bad_event", "the server sent a message without a type");
  }
  return event;
}

/** Every error event ends the stream, except unknown_voice answering set_voice once the stream runs (step 8). */
export function isFatal(errorEvent, ready) {
  return !(ready && errorEvent.code === "unknown_voice");
}

/** "code: message", plus the retry hint of overloaded / rate_limited. */
export function describeError(error) {
  let text = `${error.code}: ${error.message}`;
  if (typeof error.retry_after_s === "number") text += ` (retry in ${error.retry_after_s} s)`;
  return text;
}

/** {code, message} of anything thrown: our errors keep their code; a DOMException's name becomes one. */
export function errorInfo(error) {
  if (error && typeof error.code === "string") return { code: error.code, message: error.message };
  if (error && typeof error.name === "string" && error.name !== "Error") {
    const code = error.name.replace(/Error$/, "").replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase() || "client_error";
    return { code, message: error.message };
  }
  return { code: "client_error", message: String(error && error.message ? error.message : error) };
}

export function describeClose(event) {
  return `code ${event.code}${event.reason ? `, ${event.reason}` : ""}`;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The promise's outcome, or a rejection with makeError() if it takes longer than ms. */
export function withTimeout(promise, ms, makeError) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(makeError()), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** A promise with its resolve function, for "wait until the server says X". */
export function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {}); // rejections are read by whoever awaits; never "unhandled"
  return { promise, resolve, reject };
}
