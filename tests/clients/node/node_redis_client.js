'use strict';
// node-redis (package `redis`) against rotaproxy: the calls an application makes, with
// reconnects off. Usage: node node_redis_client.js HOST:PORT PROTOCOL(2|3)   (env CLIENT_PASSWORD)
// Prints "PASS node-redis ..." and exits 0, or "FAIL node-redis ...: reason" and exits 1.

const { createClient } = require('redis');
const { version } = require('redis/package.json');
const { parseArgs, check, waitFor, verdict } = require('./common');

const { host, port, protocol, password, label } = parseArgs(`node-redis ${version}`);
const problems = [];
const clients = [];

async function client(name) {
  const c = createClient({
    socket: { host, port, connectTimeout: 10_000, reconnectStrategy: false },
    password,
    RESP: protocol,
  });
  c.on('error', (e) => problems.push(`${name}: error ${e.message}`));
  c.on('reconnecting', () => problems.push(`${name}: reconnecting`));
  c.on('end', () => {
    if (!c.closingOnPurpose) problems.push(`${name}: connection ended`);
  });
  await c.connect();
  clients.push(c);
  return c;
}

verdict(label, problems, async () => {
  const r = await client('main');
  check((await r.ping()) === 'PONG', 'PING');
  await r.del(['greeting', 'counter', 'jobs']);
  check((await r.set('greeting', 'hello')) === 'OK', 'SET');
  check((await r.get('greeting')) === 'hello', 'GET');
  check(String(await r.info('server')).includes('redis_version'), 'INFO server');

  // A pipeline of 1000 commands (explicit), and 1000 concurrent commands (auto-pipelined).
  const pipe = r.multi();
  for (let i = 0; i < 1000; i++) pipe.set(`k${i}`, String(i));
  const replies = await pipe.execAsPipeline();
  check(replies.length === 1000 && replies.every((v) => v === 'OK'), '1000 pipelined SETs');
  const many = await Promise.all(Array.from({ length: 1000 }, (_, i) => r.get(`k${i}`)));
  check(many.every((v, i) => v === String(i)), '1000 auto-pipelined GETs');
  const mget = await r.mGet(['k0', 'k500', 'k999', 'nope']);
  check(JSON.stringify(mget) === JSON.stringify(['0', '500', '999', null]), `MGET: ${JSON.stringify(mget)}`);

  // MULTI/EXEC.
  const tx = await r.multi().incr('counter').incr('counter').get('counter').exec();
  check(JSON.stringify(tx) === JSON.stringify([1, 2, '2']), `MULTI/EXEC: ${JSON.stringify(tx)}`);

  // Pub/sub on a dedicated connection.
  const sub = await client('subscriber');
  const got = [];
  await sub.subscribe('news', (message, channel) => got.push(`message ${channel} ${message}`));
  await sub.pSubscribe('alerts.*', (message, channel) => got.push(`pmessage ${channel} ${message}`));
  check((await r.publish('news', 'n1')) === 1, 'PUBLISH news reaches one subscriber');
  check((await r.publish('alerts.disk', 'a1')) === 1, 'PUBLISH alerts.disk reaches one subscriber');
  await waitFor(() => got.length >= 2, 'two pub/sub messages');
  check(got.includes('message news n1') && got.includes('pmessage alerts.disk a1'), `pub/sub: ${got}`);
  await sub.unsubscribe('news');
  await sub.pUnsubscribe('alerts.*');

  // BLPOP blocked on one connection, released by a push from another.
  const blocker = await client('blocker');
  const popped = blocker.blPop('jobs', 20);
  await waitFor(async () => String(await r.sendCommand(['CLIENT', 'LIST'])).includes('cmd=blpop'), 'BLPOP to be blocked');
  check((await r.rPush('jobs', 'job-1')) === 1, 'RPUSH');
  const value = await popped;
  check(value && value.key === 'jobs' && value.element === 'job-1', `BLPOP: ${JSON.stringify(value)}`);

  // SELECT 2, then reads see only db 2.
  const db2 = await client('db2');
  await db2.select(2); // resolves to nothing; an error reply would reject
  await db2.del('only-in-2');
  check((await db2.set('only-in-2', 'x')) === 'OK', 'SET in db 2');
  check((await db2.get('only-in-2')) === 'x', 'GET in db 2');
  check((await r.get('only-in-2')) === null, "db 0 does not see db 2's key");
  check((await db2.get('greeting')) === null, "db 2 does not see db 0's key");

  check((await r.ping()) === 'PONG' && (await db2.ping()) === 'PONG', 'final PINGs');
  for (const c of clients) {
    c.closingOnPurpose = true;
    await c.close();
  }
});
