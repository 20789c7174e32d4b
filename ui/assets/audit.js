// The audit log: filters by repository, actor and time; cursor paging (oldest first, as the
// API pages it), with the cursors of earlier pages kept for "Previous".

import { api } from './api.js';
import { h, badge, when, json } from './dom.js';

const PAGE = 50;

export async function auditPage(view, [query], ctx) {
  const filter = new URLSearchParams(query ?? '');
  const cursors = (filter.get('trail') ?? '').split(',').filter(Boolean);
  const cursor = cursors.at(-1);
  const request = new URLSearchParams({ limit: String(PAGE) });
  for (const key of ['repository', 'actor', 'since']) if (filter.get(key)) request.set(key, filter.get(key));
  if (cursor) request.set('cursor', cursor);
  const page = await api(`/v1/audit?${request}`, { signal: ctx.signal });
  const go = (changes) => {
    const next = new URLSearchParams(filter);
    for (const [key, value] of Object.entries(changes)) {
      if (value) next.set(key, value); else next.delete(key);
    }
    ctx.navigate(`#/audit${next.size ? `?${next}` : ''}`);
  };
  view.append(
    h('h1', null, 'Audit log'),
    filters(filter, go),
    table(page.items),
    h('div', { class: 'pager' },
      h('button', { type: 'button', id: 'audit-previous', disabled: cursors.length === 0,
        onclick: () => go({ trail: cursors.slice(0, -1).join(',') }) }, '← Previous'),
      h('span', { class: 'note' }, `page ${cursors.length + 1}`),
      h('button', { type: 'button', id: 'audit-next', disabled: !page.next_cursor,
        onclick: () => go({ trail: [...cursors, page.next_cursor].join(',') }) }, 'Next →')),
  );
}

function filters(filter, go) {
  const since = filter.get('since');
  const local = since ? toLocalInput(since) : '';
  const form = h('form', { class: 'filters', id: 'audit-filters' },
    h('label', { for: 'audit-repository' }, 'Repository',
      h('input', { id: 'audit-repository', name: 'repository', value: filter.get('repository') ?? '' })),
    h('label', { for: 'audit-actor' }, 'Actor',
      h('input', { id: 'audit-actor', name: 'actor', value: filter.get('actor') ?? '' })),
    h('label', { for: 'audit-since' }, 'Since (local time)',
      h('input', { id: 'audit-since', name: 'since', type: 'datetime-local', step: 1, value: local })),
    h('button', { type: 'submit', class: 'primary' }, 'Filter'),
    h('button', { type: 'button', onclick: () => go({ repository: '', actor: '', since: '', trail: '' }) }, 'Clear'));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const sinceValue = data.get('since');
    go({
      repository: data.get('repository').trim(),
      actor: data.get('actor').trim(),
      since: sinceValue ? new Date(sinceValue).toISOString() : '',
      trail: '',
    });
  });
  return form;
}

function toLocalInput(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return '';
  const shifted = new Date(date.getTime() - date.getTimezoneOffset() * 60000);
  return shifted.toISOString().slice(0, 19);
}

function table(items) {
  if (items.length === 0) return h('p', { class: 'note', id: 'audit-empty' }, 'No audit entries match.');
  return h('table', { id: 'audit-table' },
    h('thead', null, h('tr', null, ['#', 'At', 'Actor', 'Action', 'Outcome', 'Repository', 'Job', 'Step', 'Detail'].map((t) => h('th', null, t)))),
    h('tbody', null, items.map((event) => h('tr', { 'data-audit': event.id },
      h('td', { class: 'mono' }, event.id),
      h('td', null, when(event.at)),
      h('td', null, event.actor),
      h('td', { class: 'mono' }, event.action),
      h('td', null, badge(event.outcome, 'outcome')),
      h('td', null, event.repository ? h('a', { href: `#/repositories/${encodeURIComponent(event.repository)}` }, event.repository) : '—'),
      h('td', { class: 'mono' }, event.job_id ? h('a', { href: `#/jobs/${event.job_id}` }, event.job_id.slice(0, 8)) : '—'),
      h('td', null, event.step ? `${event.step}${event.attempt ? ` #${event.attempt}` : ''}` : '—'),
      h('td', null, detail(event.detail))))));
}

function detail(value) {
  if (!value || (typeof value === 'object' && Object.keys(value).length === 0)) return '—';
  return h('details', null, h('summary', null, 'detail'), json(value));
}
