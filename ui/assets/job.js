// One job: its steps as a timeline kept current by the job's event stream
// (GET /v1/jobs/{id}/events as text/event-stream, resumed with Last-Event-ID after a drop).
// Each event updates the step it names and the job's view is read again; nothing polls.

import { api, authorization, ApiError } from './api.js';
import { h, badge, ago, when, millis, facts, errorText } from './dom.js';
import { readEvents, NotAStream } from './sse.js';
import { confirmAction } from './confirm.js';

const ENDED = ['succeeded', 'failed', 'cancelled'];
const RECONNECT_MAX_MS = 10000;

export async function jobPage(view, [id], ctx) {
  const page = new JobPage(view, id, ctx);
  await page.load();
  page.follow();
}

class JobPage {
  constructor(view, id, ctx) {
    this.view = view;
    this.id = id;
    this.ctx = ctx;
    this.job = null;
    this.attempts = new Map();
    this.live = 'wait';
    this.liveText = 'connecting…';
    this.refreshing = null;
  }

  async load() {
    const [job, events] = await Promise.all([
      api(`/v1/jobs/${this.id}`, { signal: this.ctx.signal }),
      this.auditEvents(),
    ]);
    this.job = job;
    this.attempts = events;
    this.render();
  }

  /** The job's audit entries by step: one per attempt, with its outcome and time. */
  async auditEvents() {
    try {
      const page = await api(`/v1/jobs/${this.id}/events?limit=200`, { signal: this.ctx.signal });
      const byStep = new Map();
      for (const event of page.items ?? []) {
        if (!event.step) continue;
        if (!byStep.has(event.step)) byStep.set(event.step, []);
        byStep.get(event.step).push(event);
      }
      return byStep;
    } catch {
      return this.attempts;
    }
  }

  ended() { return ENDED.includes(this.job?.state); }

  async follow() {
    this.following = true;
    try {
      await this.stream();
    } finally {
      this.following = false;
    }
  }

  async stream() {
    let lastEventId = null;
    let backoff = 500;
    while (!this.ctx.signal.aborted && !this.ended()) {
      try {
        lastEventId = await readEvents(`/v1/jobs/${this.id}/events`, {
          headers: authorization(),
          lastEventId,
          signal: this.ctx.signal,
          onOpen: () => { backoff = 500; this.setLive('on', 'live'); },
          onEvent: (event) => this.apply(event),
        });
        // The server closes the stream when the job ends: read the final view.
        await this.refresh();
      } catch (error) {
        if (this.ctx.signal.aborted) return;
        if (error instanceof NotAStream) { await this.withoutStream(); return; }
        if (error instanceof ApiError && error.status < 500 && error.status !== 429) {
          this.setLive('off', `live updates stopped: ${errorText(error)}`);
          return;
        }
        this.setLive('wait', 'reconnecting…');
        await pause(backoff, this.ctx.signal);
        backoff = Math.min(backoff * 2, RECONNECT_MAX_MS);
      }
    }
    if (!this.ctx.signal.aborted) this.setLive('off', 'job ended');
  }

  /** A server without the event stream: wait for the job's end with the long poll instead. */
  async withoutStream() {
    this.setLive('wait', 'no event stream on this server: showing the job when it ends');
    while (!this.ctx.signal.aborted && !this.ended()) {
      try {
        this.job = await api(`/v1/jobs/${this.id}?wait=30s`, { signal: this.ctx.signal });
        this.render();
      } catch (error) {
        if (!this.ctx.signal.aborted) this.setLive('off', errorText(error));
        return;
      }
    }
    this.setLive('off', 'job ended');
  }

  /** One event: `step` names a step's new state, `job` the job's; then the view is read again. */
  apply(event) {
    let data = null;
    try { data = JSON.parse(event.data); } catch { data = null; }
    if (data && event.type === 'step') this.mergeStep(data);
    if (data && event.type === 'job') this.mergeJob(data);
    this.render();
    this.scheduleRefresh();
  }

  mergeStep(data) {
    const name = data.step ?? data.name;
    if (!name || !this.job) return;
    let step = this.job.steps.find((s) => s.name === name);
    if (!step) {
      step = { name, state: 'pending', attempts: 0 };
      this.job.steps.push(step);
    }
    for (const key of ['state', 'attempts', 'started_at', 'finished_at', 'last_error', 'duration_ms']) {
      if (data[key] !== undefined) step[key] = data[key];
    }
    if (step.started_at && step.finished_at && data.duration_ms === undefined) {
      step.duration_ms = new Date(step.finished_at) - new Date(step.started_at);
    }
  }

  mergeJob(data) {
    if (!this.job) return;
    for (const key of ['state', 'attempts', 'last_error', 'started_at', 'finished_at', 'cancel_requested']) {
      if (data[key] !== undefined) this.job[key] = data[key];
    }
  }

  /** Reads the job again after a burst of events (at most one read in flight). */
  scheduleRefresh() {
    if (this.refreshing) { this.again = true; return; }
    this.refreshing = (async () => {
      do {
        this.again = false;
        await this.refresh().catch(() => {});
      } while (this.again && !this.ctx.signal.aborted);
      this.refreshing = null;
    })();
  }

  /** Reads the job again; a read overtaken by a newer one (or by a button's answer) is dropped. */
  async refresh() {
    this.generation = (this.generation ?? 0) + 1;
    const generation = this.generation;
    const [job, events] = await Promise.all([
      api(`/v1/jobs/${this.id}`, { signal: this.ctx.signal }),
      this.auditEvents(),
    ]);
    if (generation !== this.generation) return;
    this.job = job;
    this.attempts = events;
    this.render();
  }

  setLive(kind, text) {
    this.live = kind;
    this.liveText = text;
    this.render();
  }

  /** The page's frame, made once: its buttons stay the same elements while the job changes. */
  frame() {
    if (this.parts) return this.parts;
    const button = (id, label, what) => h('button', {
      type: 'button', id, hidden: true, onclick: () => this.control(what),
    }, label);
    const parts = {
      card: h('div', { class: 'card', id: 'job' }),
      title: h('h1'),
      live: h('span', { id: 'live' }),
      cancel: this.ctx.operator ? button('job-cancel', 'Cancel', 'cancel') : null,
      retry: this.ctx.operator ? button('job-retry', 'Retry', 'retry') : null,
      facts: h('div'),
      steps: h('div'),
    };
    parts.card.append(
      h('div', { class: 'row spread' }, parts.title,
        h('div', { class: 'row' }, parts.live, h('div', { class: 'actions' }, parts.cancel, parts.retry))),
      parts.facts);
    this.view.replaceChildren(parts.card, h('div', { class: 'card' }, h('h2', null, 'Steps'), parts.steps));
    this.parts = parts;
    return parts;
  }

  render() {
    if (!this.job || this.ctx.signal.aborted) return;
    const job = this.job;
    const parts = this.frame();
    parts.card.dataset.jobState = job.state;
    parts.card.dataset.cancelRequested = String(job.cancel_requested);
    parts.title.replaceChildren(`${job.kind} `, badge(job.state));
    parts.live.className = `live live-${this.live}`;
    parts.live.dataset.live = this.live;
    parts.live.textContent = this.liveText;
    if (parts.cancel) parts.cancel.hidden = !(['queued', 'running'].includes(job.state) && !job.cancel_requested);
    if (parts.retry) parts.retry.hidden = !['failed', 'cancelled'].includes(job.state);
    parts.facts.replaceChildren(facts([
      ['Job', h('span', { class: 'mono' }, job.id)],
      ['Repository', job.repository ? h('a', { href: `#/repositories/${encodeURIComponent(job.repository)}` }, job.repository) : '—'],
      ['Attempts', `${job.attempts} of ${job.max_attempts}`],
      ['Created', h('span', null, when(job.created_at), ` by ${job.created_by}`)],
      ['Started', when(job.started_at)],
      ['Finished', job.finished_at ? h('span', null, when(job.finished_at), ` (${ago(job.finished_at)})`) : '—'],
      job.state === 'queued' && job.attempts > 0 ? ['Next attempt', when(job.run_at)] : null,
      job.cancel_requested ? ['Cancel', 'requested: the job stops at its next step boundary'] : null,
      job.last_error ? ['Last error', h('span', { class: 'error' }, job.last_error)] : null,
    ]));
    parts.steps.replaceChildren(this.timeline());
  }

  async control(what) {
    const done = await confirmAction({
      title: what === 'cancel' ? 'Cancel this job?' : 'Retry this job?',
      text: what === 'cancel'
        ? 'A queued job is cancelled at once, a running one at its next step boundary.'
        : 'The job is queued again; the steps that succeeded are not redone.',
      run: () => api(`/v1/jobs/${this.id}/${what}`, { method: 'POST' }),
      confirmLabel: what === 'cancel' ? 'Cancel the job' : 'Retry',
    });
    if (!done) return;
    this.generation = (this.generation ?? 0) + 1;
    this.job = done;
    this.render();
    if (what === 'retry' && !this.following) this.follow();
  }

  timeline() {
    const steps = this.job.steps ?? [];
    if (steps.length === 0) return h('p', { class: 'note' }, 'No step has started yet.');
    return h('ol', { class: 'timeline', id: 'steps' }, steps.map((step) => {
      const attempts = this.attempts.get(step.name) ?? [];
      return h('li', { class: `state-${step.state}`, 'data-step': step.name, 'data-state': step.state },
        h('span', { class: 'step-name' }, step.name), badge(step.state),
        h('span', { class: 'meta' },
          `${step.attempts} attempt${step.attempts === 1 ? '' : 's'}`,
          step.duration_ms != null ? ` · ${millis(step.duration_ms)}` : '',
          step.started_at ? ` · started ${new Date(step.started_at).toLocaleTimeString()}` : ''),
        step.last_error ? h('div', { class: 'message' }, step.last_error) : null,
        attempts.length ? h('ul', { class: 'attempts' }, attempts.map((event) => h('li', null,
          `attempt ${event.attempt ?? '?'}: `, badge(event.outcome, 'outcome'), ` ${event.action} · `,
          new Date(event.at).toLocaleTimeString(),
          event.detail?.message ? ` · ${event.detail.message}` : ''))) : null);
    }));
  }
}

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

