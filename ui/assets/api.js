// The API client. The bearer token lives in this module's memory only: never in web storage
// or a cookie, so a reload (or a new tab) asks for it again.

let bearer = null;
const listeners = new Set();

export function setToken(token) { bearer = token; }
export function clearToken() { bearer = null; }
export function hasToken() { return bearer !== null; }
/** Called with the error when the API answers 401 (the token expired or was revoked). */
export function onUnauthorized(listener) { listeners.add(listener); }

export class ApiError extends Error {
  constructor(status, problem) {
    super(`${status} ${problem?.detail ?? problem?.title ?? ''}`);
    this.status = status;
    this.problem = problem;
  }
}

export function authorization() {
  return { Authorization: `Bearer ${bearer}` };
}

/** fetch() of the API with the token; problem+json answers become an ApiError. */
export async function api(path, { method = 'GET', body, accept = 'application/json', signal } = {}) {
  const headers = { ...authorization(), Accept: accept };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method, headers, signal, cache: 'no-store', credentials: 'omit',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let problem;
    try { problem = await response.json(); } catch { problem = { detail: response.statusText }; }
    const error = new ApiError(response.status, problem);
    if (response.status === 401) listeners.forEach((listener) => listener(error));
    throw error;
  }
  const type = response.headers.get('content-type') ?? '';
  return type.includes('json') ? response.json() : response.text();
}

/** Every page of a cursor-paged listing (at most `pages` pages). */
export async function all(path, { signal, pages = 20 } = {}) {
  const items = [];
  let cursor = null;
  for (let page = 0; page < pages; page += 1) {
    const separator = path.includes('?') ? '&' : '?';
    const url = cursor ? `${path}${separator}cursor=${encodeURIComponent(cursor)}` : path;
    const answer = await api(url, { signal });
    items.push(...answer.items);
    cursor = answer.next_cursor;
    if (!cursor) break;
  }
  return items;
}

export const enc = encodeURIComponent;
