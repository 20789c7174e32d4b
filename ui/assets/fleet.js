// Fleet: every repository at a glance, counts per state, filters by state and namespace; a
// failed or drifting row says why in one line.

import { api, all } from './api.js';
import { h, badge, ago } from './dom.js';

const STATES = ['ready', 'provisioning', 'pending', 'failed', 'cancelled', 'deprovisioning', 'deleted'];
const DRIFTING = 'drifting';

export async function fleetPage(view, [query], ctx) {
  const filter = new URLSearchParams(query ?? '');
  const [repositories, jobs] = await Promise.all([
    all('/v1/backup-repositories?limit=200', { signal: ctx.signal }),
    // The newest jobs give the last job's age (a repository's view names its last job only).
    api('/v1/jobs?limit=200', { signal: ctx.signal }).then((page) => page.items, () => []),
  ]);
  const jobsById = new Map(jobs.map((job) => [job.id, job]));
  const state = filter.get('state') ?? '';
  const namespace = filter.get('namespace') ?? '';
  const inNamespace = repositories.filter((r) => !namespace || r.namespace === namespace);
  const shown = inNamespace.filter((r) => matches(r, state));
  const choose = (changes) => {
    const next = new URLSearchParams({ state, namespace, ...changes });
    for (const [key, value] of [...next]) if (!value) next.delete(key);
    ctx.navigate(`#/fleet${next.size ? `?${next}` : ''}`);
  };
  view.append(
    h('div', { class: 'row spread' }, h('h1', null, 'Fleet'),
      h('span', { class: 'note' }, `${repositories.length} repositories`)),
    counts(inNamespace, state, choose),
    filters(repositories, state, namespace, choose),
    table(shown, jobsById),
  );
  // The listing carries no backup freshness (GET of one repository does): fill those cells in.
  if (!repositories.some((r) => 'freshness' in r)) fillFreshness(view, shown, ctx.signal);
}

const FRESHNESS_READS_AT_ONCE = 4;

async function fillFreshness(view, repositories, signal) {
  const queue = repositories.filter((r) => r.state === 'ready').slice(0, 200);
  const worker = async () => {
    for (let next = queue.shift(); next && !signal.aborted; next = queue.shift()) {
      const one = await api(`/v1/backup-repositories/${encodeURIComponent(next.name)}`, { signal }).catch(() => null);
      const freshness = one?.freshness;
      if (!freshness) continue;
      for (const field of ['newest_backup_at', 'newest_wal_at']) {
        const cell = [...view.querySelectorAll('td[data-freshness]')]
          .find((td) => td.dataset.freshness === field && td.dataset.for === next.name);
        if (!cell) continue;
        cell.textContent = ago(freshness[field]);
        if (freshness.error) cell.title = `last check failed: ${freshness.error}`;
      }
    }
  };
  await Promise.all(Array.from({ length: FRESHNESS_READS_AT_ONCE }, worker));
}

function matches(repository, state) {
  if (state === DRIFTING) return repository.drift_count > 0;
  if (state) return repository.state === state;
  return repository.state !== 'deleted';
}

function counts(repositories, selected, choose) {
  const tally = new Map(STATES.map((s) => [s, 0]));
  for (const r of repositories) tally.set(r.state, (tally.get(r.state) ?? 0) + 1);
  tally.set(DRIFTING, repositories.filter((r) => r.drift_count > 0).length);
  const shown = [...tally].filter(([s, n]) => n > 0 || ['ready', 'failed', DRIFTING].includes(s));
  return h('div', { class: 'counts', id: 'fleet-counts' }, shown.map(([s, n]) => h('button', {
    type: 'button',
    class: `count${selected === s ? ' selected' : ''}`,
    'data-count': s,
    onclick: () => choose({ state: selected === s ? '' : s }),
  }, h('span', { class: 'number' }, n), badge(s))));
}

function filters(repositories, state, namespace, choose) {
  const namespaces = [...new Set(repositories.map((r) => r.namespace))].sort();
  const select = (id, label, value, options, key) => h('label', { for: id }, label,
    h('select', { id, onchange: (e) => choose({ [key]: e.target.value }) },
      options.map(([v, text]) => h('option', { value: v, selected: v === value }, text))));
  return h('div', { class: 'filters' },
    select('filter-state', 'State', state,
      [['', 'all but deleted'], ...[...STATES, DRIFTING].map((s) => [s, s])], 'state'),
    select('filter-namespace', 'Namespace', namespace,
      [['', 'all'], ...namespaces.map((n) => [n, n])], 'namespace'));
}

function table(repositories, jobsById) {
  if (repositories.length === 0) return h('p', { class: 'note', id: 'fleet-empty' }, 'No repository matches.');
  return h('table', { id: 'fleet-table' },
    h('thead', null, h('tr', null, ['Name', 'Namespace', 'Bucket', 'Region', 'State', 'Last job',
      'Verified', 'Drift', 'Newest backup', 'Newest WAL'].map((t) => h('th', null, t)))),
    h('tbody', null, repositories.map((r) => rows(r, jobsById))));
}

function rows(repository, jobsById) {
  const why = reason(repository);
  const freshness = repository.freshness ?? {};
  const row = h('tr', {
    class: why ? 'has-why' : null,
    'data-repository': repository.name,
    'data-state': repository.state,
  },
  h('td', null, h('a', { href: `#/repositories/${encodeURIComponent(repository.name)}` }, repository.name)),
  h('td', null, repository.namespace),
  h('td', { class: 'mono' }, repository.bucket),
  h('td', null, repository.region),
  h('td', null, badge(repository.state)),
  h('td', null, lastJob(repository.last_job, jobsById)),
  h('td', null, ago(repository.verified_at)),
  h('td', null, repository.drift_count == null ? '—'
    : h('span', { class: `badge ${repository.drift_count > 0 ? 'drift-some' : 'state-ready'}` }, repository.drift_count)),
  h('td', { 'data-freshness': 'newest_backup_at', 'data-for': repository.name }, ago(freshness.newest_backup_at)),
  h('td', { 'data-freshness': 'newest_wal_at', 'data-for': repository.name }, ago(freshness.newest_wal_at)));
  if (!why) return row;
  return [row, h('tr', { class: `why ${why.kind}`, 'data-why-for': repository.name },
    h('td', { colspan: 10 }, why.text))];
}

function lastJob(summary, jobsById) {
  if (!summary) return '—';
  const job = jobsById.get(summary.id);
  const at = job && (job.finished_at ?? job.started_at ?? job.created_at);
  return h('span', null, h('a', { href: `#/jobs/${summary.id}` }, summary.kind), ' ',
    badge(summary.state), at ? h('span', { class: 'note' }, ` ${ago(at)}`) : null);
}

/** One line saying why a row needs attention, or null. */
function reason(repository) {
  if (repository.state === 'failed') {
    const text = repository.last_error ?? repository.last_job?.last_error ?? 'the last job failed';
    return { kind: 'failed', text: `Failed: ${firstLine(text)}` };
  }
  if (repository.drift_count > 0) {
    const settings = (repository.verification?.resources ?? []).flatMap((resource) =>
      (resource.settings ?? []).filter((s) => s.action !== 'none')
        .map((s) => `${resource.resource?.kind ?? ''} ${s.setting}`.trim()));
    const named = settings.length ? `: ${settings.slice(0, 4).join(', ')}${settings.length > 4 ? ', …' : ''}` : '';
    return { kind: 'drifting', text: `Drifting: ${repository.drift_count} setting(s) differ from the runbook${named}` };
  }
  if (repository.freshness?.error) {
    return { kind: 'drifting', text: `Backup freshness unknown: ${firstLine(repository.freshness.error)}` };
  }
  return null;
}

function firstLine(text) {
  const line = String(text).split('\n')[0];
  return line.length > 200 ? `${line.slice(0, 200)}…` : line;
}
