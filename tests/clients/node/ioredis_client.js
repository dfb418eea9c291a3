'use strict';
// ioredis against rotaproxy: the calls an application makes, with retries and reconnects off.
// Usage: node ioredis_client.js HOST:PORT PROTOCOL(2|3)   (env CLIENT_PASSWORD)
// Prints "PASS ioredis ..." and exits 0, or "FAIL ioredis ...: reason" and exits 1.

const Redis = require('ioredis');
const { version } = require('ioredis/package.json');
const { parseArgs, check, waitFor, verdict } = require('./common');

const { host, port, protocol, password, label } = parseArgs(`ioredis ${version}`);
const problems = [];

function client(name, extra = {}) {
  const c = new Redis({
    host,
    port,
    password,
    protocol,
    connectTimeout: 10_000,
    commandTimeout: 30_000,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    reconnectOnError: () => false,
    autoResendUnfulfilledCommands: false,
    autoResubscribe: false,
    ...extra,
  });
  c.on('error', (e) => problems.push(`${name}: error ${e.message}`));
  c.on('reconnecting', () => problems.push(`${name}: reconnecting`));
  c.on('end', () => {
    if (!c.closingOnPurpose) problems.push(`${name}: connection ended`);
  });
  return c;
}

async function close(...clients) {
  for (const c of clients) {
    c.closingOnPurpose = true;
    await c.quit();
  }
}

verdict(label, problems, async () => {
  const r = client('main');
  check((await r.ping()) === 'PONG', 'PING');
  await r.del('greeting', 'counter', 'jobs');
  check((await r.set('greeting', 'hello')) === 'OK', 'SET');
  check((await r.get('greeting')) === 'hello', 'GET');
  check((await r.info('server')).includes('redis_version'), 'INFO server');

  // A pipeline of 1000 commands.
  const pipe = r.pipeline();
  for (let i = 0; i < 1000; i++) pipe.set(`k${i}`, String(i));
  const replies = await pipe.exec();
  check(replies.length === 1000 && replies.every(([e, v]) => e === null && v === 'OK'), '1000 pipelined SETs');
  const mget = await r.mget('k0', 'k500', 'k999', 'nope');
  check(JSON.stringify(mget) === JSON.stringify(['0', '500', '999', null]), `MGET: ${JSON.stringify(mget)}`);

  // MULTI/EXEC.
  const tx = await r.multi().incr('counter').incr('counter').get('counter').exec();
  check(JSON.stringify(tx) === JSON.stringify([[null, 1], [null, 2], [null, '2']]), `MULTI/EXEC: ${JSON.stringify(tx)}`);

  // Pub/sub on a dedicated connection.
  const sub = client('subscriber');
  const got = [];
  sub.on('message', (channel, message) => got.push(`message ${channel} ${message}`));
  sub.on('pmessage', (pattern, channel, message) => got.push(`pmessage ${channel} ${message}`));
  check((await sub.subscribe('news')) === 1, 'SUBSCRIBE news');
  check((await sub.psubscribe('alerts.*')) === 2, 'PSUBSCRIBE alerts.*');
  check((await r.publish('news', 'n1')) === 1, 'PUBLISH news reaches one subscriber');
  check((await r.publish('alerts.disk', 'a1')) === 1, 'PUBLISH alerts.disk reaches one subscriber');
  await waitFor(() => got.length >= 2, 'two pub/sub messages');
  check(got.includes('message news n1') && got.includes('pmessage alerts.disk a1'), `pub/sub: ${got}`);
  await sub.unsubscribe('news');
  await sub.punsubscribe('alerts.*');

  // BLPOP blocked on one connection, released by a push from another.
  const blocker = client('blocker');
  check((await blocker.ping()) === 'PONG', 'blocker PING');
  const popped = blocker.blpop('jobs', 20);
  await waitFor(async () => (await r.client('LIST')).includes('cmd=blpop'), 'BLPOP to be blocked');
  check((await r.rpush('jobs', 'job-1')) === 1, 'RPUSH');
  const value = await popped;
  check(JSON.stringify(value) === JSON.stringify(['jobs', 'job-1']), `BLPOP: ${JSON.stringify(value)}`);

  // SELECT 2 (sent at connect by the db option), then reads see only db 2.
  const db2 = client('db2', { db: 2 });
  await db2.del('only-in-2');
  check((await db2.set('only-in-2', 'x')) === 'OK', 'SET in db 2');
  check((await db2.get('only-in-2')) === 'x', 'GET in db 2');
  check((await r.get('only-in-2')) === null, "db 0 does not see db 2's key");
  check((await db2.get('greeting')) === null, "db 2 does not see db 0's key");

  check((await r.ping()) === 'PONG' && (await db2.ping()) === 'PONG', 'final PINGs');
  await close(r, sub, blocker, db2);
});
