'use strict';
// What the `*_rotation.js` scripts share: the command line, the verdict, the control directory
// (progress out, stop in), and the run itself. The workers, which differ only in the library's
// calls, stay in each script.
//
// Usage: node <script> HOST:PORT PROTOCOL(2|3) CONTROL_DIR   (env CLIENT_PASSWORD)
// Runs until CONTROL_DIR/stop exists; writes the number of verified operations to
// CONTROL_DIR/progress about every 200 ms (via progress.tmp + rename). Prints
// "PASS <lib> ... rotation: stats" and exits 0, or "FAIL <lib> ...: reason" and exits 1.

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

const DEADLINE_MS = 240_000;
const DRAIN_MS = 10_000;

function start(lib, version) {
  const [addr, protocolArg, controlDir] = process.argv.slice(2);
  if (!addr || !protocolArg || !controlDir) {
    console.error(`usage: node ${process.argv[1]} HOST:PORT PROTOCOL(2|3) CONTROL_DIR`);
    process.exit(2);
  }
  const colon = addr.lastIndexOf(':');
  const protocol = Number(protocolArg);
  const run = {
    host: addr.slice(0, colon).replace(/^\[|\]$/g, ''),
    port: Number(addr.slice(colon + 1)),
    protocol,
    password: process.env.CLIENT_PASSWORD || 'client-side-password',
    label: `${lib} ${version} resp${protocol}`,
    prefix: `rot:${crypto.randomBytes(6).toString('hex')}`,
    stats: { ops: 0, kv: 0, pipeline: 0, tx: 0, messages: 0, duplicates: 0, jobs: 0, connections: 0 },
    // Every client made, so that `main` can count connections and close them.
    clients: [],
    stopping: false, // the stop file was seen: workers finish their round and return
    finished: false, // a verdict was printed
    DRAIN_MS,
  };

  run.writeProgress = () => {
    const tmp = path.join(controlDir, 'progress.tmp');
    fs.writeFileSync(tmp, String(run.stats.ops));
    fs.renameSync(tmp, path.join(controlDir, 'progress'));
  };

  run.fail = (reason, err) => {
    if (run.finished) return;
    run.finished = true;
    if (err && err.stack) console.error(err.stack);
    else console.error(`failure: ${reason}`);
    try {
      run.writeProgress();
    } catch (_) {
      // best effort
    }
    console.log(`FAIL ${run.label}: ${reason}`);
    process.exit(1);
  };

  run.check = (cond, what) => {
    if (!cond) throw new Error(`check failed: ${what}`);
  };
  run.sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  run.show = (v) => JSON.stringify(v);

  // `factories`: async functions that connect their clients (and subscribe) and return the
  // worker to run. `tidy(client, keys)` deletes keys, `close(client)` closes a client.
  run.main = async (factories, { tidy, close }) => {
    fs.mkdirSync(controlDir, { recursive: true });
    const stopFile = path.join(controlDir, 'stop');
    run.writeProgress();
    const progressTimer = setInterval(run.writeProgress, 200);
    const stopTimer = setInterval(() => {
      if (!run.stopping && fs.existsSync(stopFile)) run.stopping = true;
    }, 50);

    // Connect every client and set up subscriptions before any worker runs.
    const workers = await Promise.all(factories.map((f) => f()));
    const created = run.clients.length;
    await Promise.all(workers.map((w) => w()));
    clearInterval(stopTimer);
    clearInterval(progressTimer);
    run.writeProgress();
    run.check(
      run.stats.connections === created,
      `${run.stats.connections} connections opened for ${created} clients`,
    );

    // Tidy up this run's keys, then close every connection on purpose.
    const { prefix } = run;
    const keys = [`${prefix}:counter`, `${prefix}:tx`, `${prefix}:jobs`];
    for (let i = 0; i < 100; i++) keys.push(`${prefix}:kv:${i}`);
    for (let j = 0; j < 20; j++) keys.push(`${prefix}:pl:${j}`);
    await tidy(run.clients[0], keys);
    for (const c of run.clients) c.closingOnPurpose = true;
    await Promise.all(run.clients.map(close));

    run.finished = true;
    const line = Object.entries(run.stats)
      .map(([k, v]) => `${k}=${v}`)
      .join(' ');
    console.log(`PASS ${run.label} rotation: ${line}`);
    process.exit(0);
  };

  const message = (e) => (e && e.message ? e.message : String(e));
  process.on('unhandledRejection', (e) => run.fail(`unhandled rejection: ${message(e)}`, e));
  process.on('uncaughtException', (e) => run.fail(`uncaught exception: ${message(e)}`, e));
  setTimeout(() => run.fail(`overall deadline of ${DEADLINE_MS / 1000}s passed`), DEADLINE_MS).unref();
  return run;
}

module.exports = { start };
