// The confirmation dialog every operator button goes through: it shows the dry run's plan
// (where the API has one) before anything changes, and runs the action only on "Confirm".

import { h, badge, json, failure, errorText } from './dom.js';

const $ = (id) => document.getElementById(id);

/**
 * Opens the dialog; resolves with `run()`'s result once confirmed and done, or null when
 * cancelled. `preview` (optional) is awaited for the node shown as the dry run.
 */
export function confirmAction({ title, text, preview, run, confirmLabel = 'Confirm' }) {
  const dialog = $('confirm');
  const ok = $('confirm-ok');
  const cancel = $('confirm-cancel');
  const previewBox = $('confirm-preview');
  const errorBox = $('confirm-error');
  $('confirm-title').textContent = title;
  $('confirm-text').textContent = text;
  ok.textContent = confirmLabel;
  ok.disabled = false;
  errorBox.hidden = true;
  previewBox.replaceChildren(preview ? h('p', { class: 'note' }, 'Asking for a dry run…') : '');
  return new Promise((resolve) => {
    let settled = false;
    const finish = (value) => {
      if (settled) return;
      settled = true;
      ok.onclick = null;
      cancel.onclick = null;
      dialog.onclose = null;
      if (dialog.open) dialog.close();
      resolve(value);
    };
    ok.onclick = async () => {
      ok.disabled = true;
      try {
        finish(await run());
      } catch (error) {
        errorBox.textContent = errorText(error);
        errorBox.hidden = false;
        ok.disabled = false;
      }
    };
    cancel.onclick = () => finish(null);
    dialog.onclose = () => finish(null);
    dialog.showModal();
    if (preview) {
      preview().then(
        (node) => { if (!settled) previewBox.replaceChildren(node); },
        (error) => { if (!settled) previewBox.replaceChildren(failure(error)); },
      );
    }
  });
}

/**
 * A plan or a verification: one entry per resource (`resource: {kind, name, action}`,
 * `settings: [{setting, expected, actual, action, reason}]`), listing what is not as expected.
 */
export function reportView(items, { emptyText = 'Everything is as the runbook wants.' } = {}) {
  if (!Array.isArray(items)) return json(items);
  const entries = items.map((item) => {
    const resource = item?.resource ?? {};
    const differing = (item?.settings ?? []).filter((s) => s.action && s.action !== 'none');
    return h('li', { 'data-resource': resource.kind ?? '' },
      h('strong', null, resource.kind ?? 'resource'), ' ', h('span', { class: 'mono' }, resource.name ?? ''), ' ',
      badge(resource.action ?? 'none', 'action'),
      differing.length === 0
        ? h('span', { class: 'note' }, ' — as expected')
        : h('ul', null, differing.map((s) => h('li', null,
          h('span', { class: 'mono' }, s.setting), ': ', s.action,
          s.reason ? h('span', { class: 'note' }, ` (${s.reason})`) : null,
          h('details', null, h('summary', null, 'expected / found'),
            json({ expected: s.expected, found: s.actual }))))));
  });
  const changes = items.some((item) => (item?.settings ?? []).some((s) => s.action && s.action !== 'none'));
  return h('div', null,
    changes ? null : h('p', { class: 'note' }, emptyText),
    h('ul', null, entries),
    h('details', null, h('summary', null, 'Full report (JSON)'), json(items)));
}

/** The answer of `?dry_run=true`. */
export function planView(answer) {
  const plan = answer?.plan ?? answer;
  const items = Array.isArray(plan) ? plan : plan?.resources;
  return h('div', { id: 'dry-run' },
    h('p', null, 'Dry run of ', h('strong', null, answer?.kind ?? 'the job'), ': nothing was changed or queued.'),
    Array.isArray(items) ? reportView(items, { emptyText: 'Nothing would change.' }) : json(plan));
}
