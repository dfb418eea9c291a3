'use strict';
// node-redis (package `redis`) under credential rotation: a concurrent workload (kv, pipeline,
// WATCH/MULTI/EXEC, pub/sub, BLPOP) runs while the proxy rotates its upstream credential and
// moves sessions to new upstream connections. Any error, disconnect, reconnect, lost, repeated or
// reordered data fails.
// Reconnects are off (reconnectStrategy: false), so a disconnect cannot be hidden.
//
// Usage: node node_redis_rotation.js HOST:PORT PROTOCOL(2|3) CONTROL_DIR   (env CLIENT_PASSWORD)
// Runs until CONTROL_DIR/stop exists; writes the number of verified operations to
// CONTROL_DIR/progress about every 200 ms (via progress.tmp + rename).
// Prints "PASS node-redis ... rotation: stats" and exits 0, or "FAIL node-redis ...: reason" and exits 1.

const { createClient } = require('redis');
const { version } = require('redis/package.json');
const common = require('./rotation_common');

const run = common.start('node-redis', version);
const { host, port, protocol, password, prefix, stats, clients, fail, check, sleep, show, DRAIN_MS } = run;

// ---------------------------------------------------------------------------------------------
// Clients: one connection each, never reconnecting, never queueing while offline.

async function client(name) {
  const c = createClient({
    socket: { host, port, connectTimeout: 10_000, reconnectStrategy: false },
    password,
    RESP: protocol,
  });
  c.connects = 0;
  c.on('connect', () => {
    stats.connections += 1;
    c.connects += 1;
    if (c.connects > 1) fail(`${name}: connected ${c.connects} times (a reconnect)`);
  });
  c.on('error', (e) => fail(`${name}: error event: ${e && e.message ? e.message : e}`, e));
  c.on('reconnecting', () => fail(`${name}: reconnecting event`));
  c.on('terminated', (e) => fail(`${name}: terminated event: ${e && e.message ? e.message : e}`, e));
  c.on('end', () => {
    if (!c.closingOnPurpose) fail(`${name}: 'end' event (connection lost)`);
  });
  clients.push(c);
  await c.connect();
  check(c.isReady, `${name}: not ready after connect`);
  return c;
}

function op(worker, n = 1) {
  stats.ops += n;
  if (worker) stats[worker] += n;
}

// ---------------------------------------------------------------------------------------------
// Workers.

async function kvWorker() {
  const c = await client('kv');
  const counter = `${prefix}:counter`;
  let expected = 0;
  return async () => {
    for (let i = 0; !run.stopping; i++) {
      const key = `${prefix}:kv:${i % 100}`;
      const set = await c.set(key, String(i));
      check(set === 'OK', `kv: SET ${key} answered ${show(set)}`);
      const got = await c.get(key);
      check(got === String(i), `kv: GET ${key} answered ${show(got)}, expected ${show(String(i))}`);
      const n = await c.incr(counter);
      check(n === expected + 1, `kv: INCR ${counter} answered ${show(n)}, expected ${expected + 1}`);
      expected = n;
      op('kv');
      await sleep(1);
    }
  };
}

async function pipelineWorker() {
  const c = await client('pipeline');
  const keys = Array.from({ length: 20 }, (_, j) => `${prefix}:pl:${j}`);
  return async () => {
    for (let round = 1; !run.stopping; round++) {
      const value = String(round);
      const pipe = c.multi(); // executed as a plain pipeline, no MULTI/EXEC
      for (const k of keys) pipe.set(k, value);
      const replies = await pipe.execAsPipeline();
      check(
        Array.isArray(replies) && replies.length === 20 && replies.every((v) => v === 'OK'),
        `pipeline: round ${round}: 20 SETs answered ${show(replies)}`,
      );
      const values = await c.mGet(keys);
      check(
        Array.isArray(values) && values.length === 20 && values.every((v) => v === value),
        `pipeline: round ${round}: MGET answered ${show(values)}, expected 20 x ${show(value)}`,
      );
      op('pipeline');
      await sleep(1);
    }
  };
}

async function txWorker() {
  const c = await client('tx');
  const key = `${prefix}:tx`;
  let previous = 0;
  return async () => {
    while (!run.stopping) {
      const watched = await c.watch(key);
      check(watched === 'OK', `tx: WATCH answered ${show(watched)}`);
      // An aborted EXEC (nil reply) rejects with a WatchError.
      const reply = await c.multi().incr(key).get(key).exec();
      const n = previous + 1;
      check(show(reply) === show([n, String(n)]), `tx: EXEC answered ${show(reply)}, expected [${n}, "${n}"]`);
      previous = n;
      op('tx');
      await sleep(1);
    }
  };
}

// Pub/sub: per-channel sequence numbers 1, 2, 3, ...; the publisher alternates between a plain
// channel (received as 'message') and a channel matched by a pattern (received as 'pmessage').
async function pubsubWorker() {
  const channel = `${prefix}:ch`;
  const pattern = `${prefix}:pat:*`;
  const patChannel = `${prefix}:pat:x`;
  const received = { [channel]: 0, [patChannel]: 0 };
  const published = { [channel]: 0, [patChannel]: 0 };

  const sub = await client('subscriber');
  const pub = await client('publisher');

  function onMessage(kind, ch, message) {
    if (run.finished) return;
    if (!(ch in received)) return fail(`pubsub: ${kind} on unexpected channel ${show(ch)}: ${show(message)}`);
    const n = Number(message);
    const last = received[ch];
    if (!Number.isInteger(n) || String(n) !== message) {
      return fail(`pubsub: ${kind} on ${ch}: not a sequence number: ${show(message)}`);
    }
    if (n === last + 1) {
      received[ch] = n;
      stats.messages += 1;
      op(null);
    } else if (n === last) {
      stats.duplicates += 1;
    } else {
      fail(`pubsub: ${kind} on ${ch}: got ${n} after ${last} (${n > last ? 'gap' : 'out of order'})`);
    }
  }
  // The listeners are per channel / per pattern: the library routes each message to them.
  await sub.subscribe(channel, (message, ch) => onMessage('message', ch, message));
  await sub.pSubscribe(pattern, (message, ch) => onMessage('pmessage', ch, message));
  check(sub.isPubSubActive, 'pubsub: subscriber not in pub/sub mode after SUBSCRIBE/PSUBSCRIBE');

  return async () => {
    for (let i = 0; !run.stopping; i++) {
      const ch = i % 2 === 0 ? channel : patChannel;
      const n = published[ch] + 1;
      const receivers = await pub.publish(ch, String(n));
      check(
        receivers === 1 || receivers === 2,
        `pubsub: PUBLISH ${ch} ${n} reached ${show(receivers)} subscribers`,
      );
      published[ch] = n;
      await sleep(5);
    }
    // Stopped: everything published must arrive.
    const deadline = Date.now() + DRAIN_MS;
    while (received[channel] !== published[channel] || received[patChannel] !== published[patChannel]) {
      check(
        Date.now() < deadline,
        `pubsub: ${DRAIN_MS / 1000}s after stop, received ${show(received)} of published ${show(published)}`,
      );
      await sleep(10);
    }
  };
}

// Jobs: a producer pushes 1, 2, 3, ...; a consumer pops them with BLPOP (2 s timeout).
async function blockingWorker() {
  const key = `${prefix}:jobs`;
  const consumer = await client('consumer');
  const producer = await client('producer');
  let pushed = 0;
  let producing = true;
  let received = 0;

  async function consume() {
    while (producing || received !== pushed) {
      const reply = await consumer.blPop(key, 2);
      if (reply === null) continue; // timed out, nothing to pop
      check(
        reply && reply.key === key && typeof reply.element === 'string',
        `blocking: BLPOP answered ${show(reply)}`,
      );
      const job = reply.element;
      const n = Number(job);
      check(
        n === received + 1,
        `blocking: got job ${show(job)} after job ${received} (${n <= received ? 'duplicate or out of order' : 'gap'})`,
      );
      received = n;
      stats.jobs += 1;
      op(null);
    }
  }

  return async () => {
    const consuming = consume();
    consuming.catch((e) => fail(e && e.message ? e.message : String(e), e)); // fail at once
    try {
      while (!run.stopping) {
        const n = pushed + 1;
        const len = await producer.rPush(key, String(n));
        check(Number.isInteger(len) && len >= 1, `blocking: RPUSH ${n} answered ${show(len)}`);
        pushed = n;
        await sleep(10);
      }
    } finally {
      producing = false;
    }
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`blocking: ${DRAIN_MS / 1000}s after stop, consumer had job ${received} of ${pushed}`)),
        // The consumer may sit in one more BLPOP (2 s) after its last job.
        DRAIN_MS + 2_500,
      );
    });
    try {
      await Promise.race([consuming, timeout]);
    } finally {
      clearTimeout(timer);
    }
    check(received === pushed, `blocking: consumer stopped at job ${received} of ${pushed}`);
  };
}

// ---------------------------------------------------------------------------------------------
// Main.

run
  .main([kvWorker, pipelineWorker, txWorker, pubsubWorker, blockingWorker], {
    tidy: (c, keys) => c.del(keys),
    close: (c) => c.close(),
  })
  .catch((e) => fail(e && e.message ? e.message : String(e), e));
