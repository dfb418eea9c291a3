'use strict';
// Shared helpers of the Node client scripts: argument parsing, checks, bounded waits, verdict.

function parseArgs(lib) {
  const [addr, protocolArg] = process.argv.slice(2);
  if (!addr || !protocolArg) {
    console.error(`usage: node ${process.argv[1]} HOST:PORT PROTOCOL(2|3)`);
    process.exit(2);
  }
  const i = addr.lastIndexOf(':');
  const host = addr.slice(0, i).replace(/^\[|\]$/g, '');
  const port = Number(addr.slice(i + 1));
  const protocol = Number(protocolArg);
  const password = process.env.CLIENT_PASSWORD || 'client-side-password';
  const label = `${lib} resp${protocol}`;
  // Overall deadline: never hang the test run.
  setTimeout(() => {
    console.log(`FAIL ${label}: overall deadline of 90s passed`);
    process.exit(1);
  }, 90_000).unref();
  return { host, port, protocol, password, label };
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

async function waitFor(cond, what, timeoutMs = 20_000) {
  const deadline = Date.now() + timeoutMs;
  let pause = 10;
  while (Date.now() < deadline) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, pause));
    pause = Math.min(pause * 2, 100);
  }
  throw new Error(`timed out waiting for ${what}`);
}

// Runs `body`, then exits with a PASS/FAIL line. `problems` collects error/reconnect events that
// the libraries report out of band: any of them fails the run.
async function verdict(label, problems, body) {
  try {
    await body();
    if (problems.length) throw new Error(`unexpected client events: ${problems.join('; ')}`);
    console.log(`PASS ${label}`);
    process.exit(0);
  } catch (e) {
    console.error(e && e.stack ? e.stack : e);
    const extra = problems.length ? ` (client events: ${problems.join('; ')})` : '';
    console.log(`FAIL ${label}: ${e && e.message ? e.message : e}${extra}`);
    process.exit(1);
  }
}

module.exports = { parseArgs, check, waitFor, verdict };
