// The server's HTTP API as the page uses it: JSON calls, the completion stream (server-sent events), the
// trace's float32 payload, and every failure turned into words a person can act on.

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

function headers(token, json) {
  const h = {};
  if (json) h['Content-Type'] = 'application/json';
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

// What the server said (OpenAI's error shape), and what it means for the person at the page.
function explain(status, said) {
  const detail = said ? `: ${said}` : '';
  switch (status) {
    case 401: return `The server needs a token (401 Unauthorized). Enter it in the Token field above${detail}`;
    case 429: return `The server is busy (429 Too Many Requests: it is at its limit of calls at once). Try again in a moment${detail}`;
    case 400: return `The server refused the request (400)${detail}`;
    case 404: return `Not found (404)${detail}`;
    case 413: return `The request is too large (413)${detail}`;
    case 503: return `The server is unavailable (503): it may be shutting down or restarting${detail}`;
    default: return `The server answered ${status}${detail}`;
  }
}

async function failure(response) {
  let said = '';
  try {
    const body = await response.json();
    said = body?.error?.message ?? '';
  } catch {
    said = response.statusText;
  }
  return new ApiError(explain(response.status, said), response.status);
}

async function send(path, init) {
  try {
    return await fetch(path, init);
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(`Cannot reach the server at ${location.origin}: is it running? (${error.message})`);
  }
}

export async function getJson(path, token) {
  const response = await send(path, { headers: headers(token, false) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function postJson(path, body, token, signal) {
  const response = await send(path, { method: 'POST', headers: headers(token, true), body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST /v1/completions with stream: true; yields each chunk object until [DONE]. An error event (the
// server failed mid-stream) throws ApiError; abort() on the signal ends the request (AbortError).
export async function* completionStream(body, token, signal) {
  const response = await send('/v1/completions', {
    method: 'POST', headers: headers(token, true), body: JSON.stringify({ ...body, stream: true }), signal,
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError('The server closed the stream before it ended ([DONE] never came).');
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (data === '[DONE]') return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(`The server ended the stream with an error: ${chunk.error.message}`);
        yield chunk;
      }
    }
  }
}

// The trace's `hidden`: base64 of little-endian float32 values, C order, with their shape.
export function decodeFloats(encoded) {
  const bytes = Uint8Array.from(atob(encoded.data), (c) => c.charCodeAt(0));
  const view = new DataView(bytes.buffer);
  const values = new Float32Array(bytes.length / 4);
  for (let i = 0; i < values.length; i += 1) values[i] = view.getFloat32(i * 4, true);
  return { shape: encoded.shape, values };
}

export function describe(error) {
  if (error instanceof ApiError) return error.message;
  return `Something went wrong in the page: ${error.message}`;
}
