// Building DOM nodes from data: text goes in as text nodes (never parsed as HTML), classes
// instead of style attributes (the Content-Security-Policy forbids inline style).

/** h('a', {href: '#/x', class: 'y'}, 'text', child…): an element. */
export function h(tag, props, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(props ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') element.className = value;
    else if (key.startsWith('on')) element.addEventListener(key.slice(2), value);
    else if (key === 'style') throw new Error('no inline style: use a class');
    else element.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** A CSS class fragment made only of safe characters. */
export function token(value) {
  return String(value ?? 'unknown').toLowerCase().replace(/[^a-z0-9-]/g, '-');
}

export function badge(state, prefix = 'state') {
  return h('span', { class: `badge ${prefix}-${token(state)}`, 'data-state': state }, state ?? '—');
}

/** "3 min ago" from an RFC 3339 time (or seconds when `seconds` is given). */
export function ago(time) {
  if (!time) return '—';
  const seconds = Math.max(0, (Date.now() - new Date(time).getTime()) / 1000);
  return `${span(seconds)} ago`;
}

/** A duration in seconds, short: "45 s", "12 min", "3 h", "2 d". */
export function span(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return '—';
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)} min`;
  if (seconds < 36 * 3600) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

export function millis(ms) {
  if (ms === null || ms === undefined) return '';
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

export function when(time) {
  if (!time) return '—';
  const date = new Date(time);
  return h('time', { datetime: time, title: date.toISOString() }, date.toLocaleString());
}

export function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(Boolean).map(([term, value]) => [
    h('dt', null, term), h('dd', null, value ?? '—'),
  ]));
}

export function json(value) {
  return h('pre', null, JSON.stringify(value, null, 2));
}

export function errorText(error) {
  if (error?.problem) {
    const fields = (error.problem.errors ?? []).map((e) => `${e.field ?? e.name ?? ''}: ${e.message ?? e.detail ?? ''}`);
    return [`${error.status} ${error.problem.title ?? ''}: ${error.problem.detail ?? ''}`, ...fields].join('\n');
  }
  return String(error?.message ?? error);
}

export function failure(error) {
  return h('p', { class: 'error', role: 'alert' }, errorText(error));
}
