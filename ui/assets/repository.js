// One repository: what provisioning made, the drift report, the manifests, its jobs, and the
// operator buttons (reconcile, verify, rotate key), each behind a dry run and a confirmation.

import { api, enc } from './api.js';
import { h, badge, ago, when, facts, json } from './dom.js';
import { confirmAction, planView, reportView } from './confirm.js';

const ACTIONS = [
  { id: 'reconcile', label: 'Reconcile', path: 'reconcile',
    text: 'Run provisioning again: it converges every resource to the runbook and changes nothing that did not drift.' },
  { id: 'verify', label: 'Verify', path: 'verify',
    text: 'Check every setting against the runbook, read-only, and store the report.' },
  { id: 'rotate-key', label: 'Rotate key', path: 'rotate-key',
    text: 'Make a new access key, prove it, put it in the Secret; the old key is retired after its grace period.' },
];

export async function repositoryPage(view, [name], ctx) {
  const base = `/v1/backup-repositories/${enc(name)}`;
  const [repository, jobs, manifests] = await Promise.all([
    api(base, { signal: ctx.signal }),
    api(`/v1/jobs?repository=${enc(name)}&limit=20`, { signal: ctx.signal }).then((p) => p.items, () => []),
    api(`${base}/manifests`, { signal: ctx.signal, accept: 'application/yaml' }).catch(() => null),
  ]);
  view.append(
    header(repository, base, ctx),
    h('div', { class: 'card' }, h('h2', null, 'Resources'), resources(repository)),
    h('div', { class: 'card' }, h('h2', null, 'Backups'), backups(repository)),
    h('div', { class: 'card', id: 'drift' }, h('h2', null, 'Drift'), drift(repository)),
    h('div', { class: 'card', id: 'manifests' }, h('h2', null, 'Manifests'), manifestsView(repository, manifests)),
    h('div', { class: 'card' }, h('h2', null, 'Jobs'), jobsTable(jobs)),
  );
}

function header(repository, base, ctx) {
  const buttons = ctx.operator && repository.state !== 'deleted'
    ? ACTIONS.map((action) => h('button', {
      type: 'button', id: `action-${action.id}`, onclick: () => act(action, repository, base, ctx),
    }, action.label))
    : [];
  return h('div', { class: 'card' },
    h('div', { class: 'row spread' },
      h('h1', null, repository.name, ' ', badge(repository.state)),
      h('div', { class: 'actions', id: 'repository-actions' }, buttons)),
    facts([
      ['Namespace', repository.namespace],
      ['Bucket', h('span', { class: 'mono' }, repository.bucket)],
      ['Region', repository.region],
      ['Last job', repository.last_job ? h('span', null,
        h('a', { href: `#/jobs/${repository.last_job.id}` }, repository.last_job.kind), ' ', badge(repository.last_job.state)) : '—'],
      ['Created', h('span', null, when(repository.created_at), ` by ${repository.created_by}`)],
      ['Updated', when(repository.updated_at)],
      repository.last_error ? ['Last error', h('span', { class: 'error' }, repository.last_error)] : null,
    ]));
}

async function act(action, repository, base, ctx) {
  const url = `${base}/${action.path}`;
  const created = await confirmAction({
    title: `${action.label} ${repository.name}?`,
    text: action.text,
    preview: async () => planView(await api(`${url}?dry_run=true`, { method: 'POST', body: {} })),
    run: () => api(url, { method: 'POST', body: {} }),
    confirmLabel: action.label,
  });
  if (created?.job?.id) ctx.navigate(`#/jobs/${created.job.id}`);
}

function resources(repository) {
  const r = repository.resources ?? {};
  return facts([
    ['Bucket ARN', h('span', { class: 'mono' }, r.bucket_arn ?? '—')],
    ['Policy ARN', h('span', { class: 'mono' }, r.policy_arn ?? '—')],
    ['IAM group', h('span', { class: 'mono' }, r.group ?? '—')],
    ['IAM user', h('span', { class: 'mono' }, r.user ?? '—')],
    ['Access key id', h('span', { class: 'mono', id: 'access-key-id' }, r.access_key_id ?? '—')],
    ['Secret', r.secret ? h('span', { class: 'mono' }, `${r.secret.namespace}/${r.secret.name}`) : '—'],
  ]);
}

function backups(repository) {
  const f = repository.freshness;
  if (!f) return h('p', { class: 'note' }, 'No backup freshness check has looked at this repository yet.');
  return facts([
    ['Newest backup', h('span', null, ago(f.newest_backup_at), ' ', when(f.newest_backup_at))],
    ['Newest full backup', h('span', null, ago(f.newest_full_backup_at), ' ', when(f.newest_full_backup_at))],
    ['Newest WAL', h('span', null, ago(f.newest_wal_at), ' ', when(f.newest_wal_at))],
    ['Checked', when(f.checked_at)],
    f.error ? ['Last check failed', h('span', { class: 'error' }, f.error)] : null,
  ]);
}

function drift(repository) {
  if (!repository.verified_at) return h('p', { class: 'note' }, 'Not verified yet.');
  const v = repository.verification ?? {};
  return h('div', null,
    facts([
      ['Verified', h('span', null, ago(repository.verified_at), ' (', v.mode ?? 'plan', ')')],
      ['Settings differing', h('span', { class: `badge ${repository.drift_count > 0 ? 'drift-some' : 'state-ready'}` }, repository.drift_count ?? 0)],
    ]),
    reportView(v.resources ?? []));
}

function manifestsView(repository, manifests) {
  if (typeof manifests === 'string' && manifests.trim()) {
    return h('div', null, h('p', { class: 'note' }, 'The PostgresCluster fragment and the ExternalSecret, ready to apply:'),
      h('pre', { id: 'manifests-yaml' }, manifests));
  }
  if (manifests && typeof manifests === 'object') return json(manifests);
  if (!repository.pgbackrest && !repository.external_secret) {
    return h('p', { class: 'note' }, 'Available once the repository is ready.');
  }
  return h('div', null,
    repository.pgbackrest ? [h('h3', null, 'spec.backups.pgbackrest'), json(repository.pgbackrest)] : null,
    repository.external_secret ? [h('h3', null, 'ExternalSecret'), json(repository.external_secret)] : null);
}

function jobsTable(jobs) {
  if (jobs.length === 0) return h('p', { class: 'note' }, 'No jobs.');
  return h('table', { id: 'repository-jobs' },
    h('thead', null, h('tr', null, ['Job', 'Kind', 'State', 'Attempts', 'Created', 'Finished', 'By'].map((t) => h('th', null, t)))),
    h('tbody', null, jobs.map((job) => h('tr', { 'data-job': job.id },
      h('td', { class: 'mono' }, h('a', { href: `#/jobs/${job.id}` }, job.id.slice(0, 8))),
      h('td', null, job.kind),
      h('td', null, badge(job.state)),
      h('td', null, `${job.attempts}/${job.max_attempts}`),
      h('td', null, ago(job.created_at)),
      h('td', null, ago(job.finished_at)),
      h('td', null, job.created_by)))));
}
