// The HTTP API (client/api.py has the Python twin): session tokens, reference voices, ICE servers, limits.
// Every failure is an ApiError whose code names it: unauthorized, too_large, http_404, network, ...

export class ApiError extends Error {
  constructor(code, message, status = null) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

async function request(method, path, { bearer, body, query } = {}) {
  let url = path;
  if (query) url += `?${new URLSearchParams(query)}`;
  const headers = { Accept: "application/json" };
  if (bearer !== undefined) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/octet-stream";
  let response;
  try {
    response = await fetch(url, { method, headers, body });
  } catch (error) {
    throw new ApiError("network", `cannot reach the server: ${error.message}`);
  }
  const text = await response.text();
  let answer = {};
  if (text) {
    try {
      answer = JSON.parse(text);
    } catch {
      if (response.ok) throw new ApiError("bad_answer", `${method} ${path} answered with something other than JSON`);
      answer = {};
    }
  }
  if (!response.ok) {
    // FastAPI's {"detail": ...}; the voices API adds a machine-readable "reason".
    const detail = typeof answer.detail === "string" ? answer.detail
      : answer.detail ? JSON.stringify(answer.detail) : response.statusText || "request failed";
    const code = answer.reason || (response.status === 401 ? "unauthorized" : `http_${response.status}`);
    throw new ApiError(code, detail, response.status);
  }
  return answer;
}

/** POST /v1/tokens with the API key: {token, expires_at (unix seconds)}. */
export async function getToken(apiKey) {
  const answer = await request("POST", "/v1/tokens", { bearer: apiKey });
  if (typeof answer.token !== "string" || !answer.token) {
    throw new ApiError("bad_answer", "the token endpoint answered without a token");
  }
  return { token: answer.token, expiresAt: typeof answer.expires_at === "number" ? answer.expires_at : null };
}

/** GET /v1/voices: [{voice_id, name, seconds}]. */
export async function listVoices(token) {
  const answer = await request("GET", "/v1/voices", { bearer: token });
  if (!Array.isArray(answer.voices)) throw new ApiError("bad_answer", "the voice list answer has no 'voices' list");
  return answer.voices;
}

/** POST /v1/voices?name=: the file as it is (the server decodes it); answers {voice_id, seconds, name}. */
export async function uploadVoice(token, file, name) {
  return request("POST", "/v1/voices", { bearer: token, body: file, query: name ? { name } : undefined });
}

/** GET /v1/limits (public): {settings, controls, start_retry}, see limits.js. */
export async function getLimits() {
  const answer = await request("GET", "/v1/limits");
  if (!answer.settings || !answer.controls || !answer.start_retry) {
    throw new ApiError("bad_answer", "the limits answer lacks settings, controls or start_retry");
  }
  return answer;
}

/** GET /v1/ice: {"iceServers": [...]}; any failure means no ICE servers (host candidates only). */
export async function getIceServers(token) {
  try {
    const answer = await request("GET", "/v1/ice", { bearer: token });
    return { iceServers: Array.isArray(answer.iceServers) ? answer.iceServers : [], error: null };
  } catch (error) {
    return { iceServers: [], error };
  }
}
