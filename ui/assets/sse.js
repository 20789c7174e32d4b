// Server-Sent Events over fetch(): EventSource cannot send an Authorization header, so the
// stream is read from a ReadableStream and parsed as the HTML standard describes
// (event, data, id, retry fields; comments; blank line dispatches).

import { ApiError } from './api.js';

/** The response was not an event stream (a server without the endpoint). */
export class NotAStream extends Error {}

/**
 * Reads the stream at `url` until the server closes it; calls `onEvent({type, data, id})` for
 * each event and `onOpen()` once connected. Returns the last event id seen (for Last-Event-ID).
 */
export async function readEvents(url, { headers = {}, lastEventId = null, signal, onEvent, onOpen }) {
  const request = { ...headers, Accept: 'text/event-stream' };
  if (lastEventId) request['Last-Event-ID'] = lastEventId;
  const response = await fetch(url, { headers: request, signal, cache: 'no-store', credentials: 'omit' });
  // 204: the client has seen the job's last event; nothing more will come.
  if (response.status === 204) return lastEventId;
  if (!response.ok) {
    let problem;
    try { problem = await response.json(); } catch { problem = { detail: response.statusText }; }
    throw new ApiError(response.status, problem);
  }
  if (!(response.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
    await response.body?.cancel();
    throw new NotAStream('the server answered without an event stream');
  }
  onOpen?.();
  const parser = new EventParser(lastEventId, onEvent);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    parser.push(value);
  }
  return parser.lastEventId;
}

class EventParser {
  constructor(lastEventId, onEvent) {
    this.lastEventId = lastEventId;
    this.onEvent = onEvent;
    this.buffer = '';
    this.reset();
  }

  reset() { this.type = ''; this.data = []; }

  push(text) {
    this.buffer += text;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      // A lone CR at the end may be the first half of CRLF: wait for more.
      if (!match || (match[0] === '\r' && match.index === this.buffer.length - 1)) return;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      this.line(line);
    }
  }

  line(line) {
    if (line === '') { this.dispatch(); return; }
    if (line.startsWith(':')) return;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.type = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.lastEventId = value;
  }

  dispatch() {
    if (this.data.length > 0) {
      this.onEvent({ type: this.type || 'message', data: this.data.join('\n'), id: this.lastEventId });
    }
    this.reset();
  }
}
