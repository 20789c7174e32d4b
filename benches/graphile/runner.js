'use strict';
// graphile-worker measured the way benches/load.rs measures our queue, on the database it is
// given (a scratch database the bench drops afterwards). Started by the bench with
// NODE_PATH pointing at the modules benches/graphile/install.sh installed; prints one JSON
// line on stdout.
//
//   BENCH_MODE=throughput: JOBS no-op jobs added in one transaction into an idle pool of
//     CONCURRENCY; time from COMMIT until every handler ran and every job row is gone
//     (graphile-worker deletes a job when it completes).
//   BENCH_MODE=pickup: SAMPLES times, one job into an idle pool; time from COMMIT of the
//     adding transaction until its handler starts.
//
// Settings as in the bench's own worker: POLL_INTERVAL_MS (long, so only LISTEN/NOTIFY wakes
// an idle worker), MAX_POOL_SIZE (the size of our pool for the same concurrency); everything
// else is graphile-worker's default (no local queue, no batched completion).

const { run, Logger } = require('graphile-worker');
const { Client } = require('pg');
const version = require('graphile-worker/package.json').version;

const setting = (name, fallback) => process.env[name] ?? fallback;
const databaseUrl = setting('DATABASE_URL');
const mode = setting('BENCH_MODE', 'throughput');
const concurrency = Number(setting('CONCURRENCY', '4'));
const jobs = Number(setting('JOBS', '1000'));
const samples = Number(setting('SAMPLES', '100'));
const pollInterval = Number(setting('POLL_INTERVAL_MS', '30000'));
const maxPoolSize = Number(setting('MAX_POOL_SIZE', '20'));
const deadlineMs = 120000;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => process.hrtime.bigint();
const millis = (from, to) => Number(to - from) / 1e6;
// The bench's own worker logs nothing either: formatting and writing a line per job would be
// measured otherwise.
const silent = new Logger(() => () => {});

async function startPool(onJob) {
  const runner = await run({
    connectionString: databaseUrl,
    concurrency,
    maxPoolSize,
    pollInterval,
    noHandleSignals: true,
    logger: silent,
    taskList: { noop: async () => onJob(now()) },
  });
  // As the bench does for ours: let the listener connect and the workers go idle.
  await sleep(300);
  return runner;
}

async function remainingJobs(client) {
  const { rows } = await client.query('SELECT count(*)::int AS n FROM graphile_worker.jobs');
  return rows[0].n;
}

async function waitUntil(what, check) {
  const started = Date.now();
  while (!(await check())) {
    if (Date.now() - started > deadlineMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

async function addJobs(client, count) {
  for (let i = 0; i < count; i++) {
    await client.query("SELECT graphile_worker.add_job('noop', '{}'::json, max_attempts => 1)");
  }
}

async function throughput(client) {
  let ran = 0;
  const runner = await startPool(() => {
    ran += 1;
  });
  const began = now();
  await client.query('BEGIN');
  await addJobs(client, jobs);
  const committing = now();
  await client.query('COMMIT');
  await waitUntil('every handler', async () => ran >= jobs);
  await waitUntil('every job row to go', async () => (await remainingJobs(client)) === 0);
  const done = now();
  await runner.stop();
  return { enqueue_ms: millis(began, committing), drain_ms: millis(committing, done) };
}

async function pickup(client) {
  let started = null;
  const runner = await startPool((at) => {
    started = at;
  });
  const pickupMs = [];
  for (let i = 0; i < samples; i++) {
    started = null;
    await client.query('BEGIN');
    await addJobs(client, 1);
    const committing = now();
    await client.query('COMMIT');
    await waitUntil('the handler', async () => started !== null);
    pickupMs.push(millis(committing, started));
    await waitUntil('the job row to go', async () => (await remainingJobs(client)) === 0);
    // Let the worker go back to waiting.
    await sleep(20);
  }
  await runner.stop();
  return { pickup_ms: pickupMs };
}

async function main() {
  const client = new Client({ connectionString: databaseUrl });
  await client.connect();
  try {
    const result = mode === 'pickup' ? await pickup(client) : await throughput(client);
    console.log(JSON.stringify({ version, mode, concurrency, jobs, ...result }));
  } finally {
    await client.end();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
