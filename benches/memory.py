#!/usr/bin/env python3
"""Memory a sidecar holds per client connection, next to what Redis itself holds.

A sidecar in front of an application's connection pool holds hundreds or thousands of client
connections, most of them idle most of the time, so what an idle connection costs is what the
sidecar costs. For each side (a sidecar in front of its own Redis, or Redis itself) the script
reads the process's resident memory (VmRSS) at each step of one run:

  1. idle:      N clients connected, each authenticated and answered one PING;
  2. after SET: each client then wrote one value of --value-kib KiB;
  3. after GET: each client then read its value back;
  4. closed:    every client disconnected.

and prints the growth over the start, per client. Steps 2 and 3 show whether memory a transfer
needed is kept by a connection that has gone idle again (Redis shrinks an idle client's query
buffer; a proxy may keep what its buffers grew to). Step 4 shows what comes back.

Sides are KIND or KIND:BINARY, as in side_by_side.py (`rotaproxy`, `floor`, `haproxy`), plus
`redis` (the clients connect to Redis directly; its figures are Redis's own cost per client).

  benches/memory.py                                  # rotaproxy, floor, haproxy, redis; 2000 clients
  benches/memory.py --sides rotaproxy:/tmp/old/target/release/rotaproxy,rotaproxy --clients 1000
  benches/memory.py --tls --sides rotaproxy,haproxy       # the sidecars reach Redis over TLS

Figures are the kernel's resident-set counts, so they include the allocator's free lists
(memory freed but not returned to the system), and Redis's include the values it stores
(--value-kib per client after the SET). They move by a few KiB per client from run to run
at 2000 clients (part of the growth comes in steps: the allocator's, the runtime's tables). Python 3.11 standard library only; reuses
side_by_side.py's set-up of Redis and the sidecars (the same configuration, pinned the same way).
"""

from __future__ import annotations

import argparse
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (compare.py sits next to this file)
import side_by_side as sbs  # noqa: E402
from compare import stop, stop_all, which  # noqa: E402

STEPS = ("idle", "after SET", "after GET", "closed")
# Each step waits this long for the process's memory to settle (a sidecar may still be
# relaying when the last client got its answer) before reading it.
SETTLE = 1.0
IO_TIMEOUT = 60.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def read_exactly(sock: socket.socket, expected: bytes) -> None:
    """Reads len(expected) bytes and checks they are what was expected."""
    got = b""
    while len(got) < len(expected):
        chunk = sock.recv(min(1 << 20, len(expected) - len(got)))
        if not chunk:
            raise RuntimeError(f"connection closed after {len(got)} of {len(expected)} bytes")
        got += chunk
    if got != expected:
        raise RuntimeError(f"unexpected answer {got[:80]!r}")


def run_side(tmp: Path, spec: str, clients: int, value: bytes,
             certs: dict[str, Path] | None) -> dict[str, int]:
    """Growth of resident memory over the start, in KiB, at each step."""
    kind = spec.partition(":")[0]
    redis = sbs.start_redis(tmp, kind, certs)
    started = [redis.proc]
    try:
        if kind == "redis":
            pid, port = redis.proc.pid, redis.port
        else:
            side = sbs.parse_side("A", spec)
            proc, address, _ = sbs.start_sidecar(tmp, side, redis, certs)
            started.append(proc)
            pid, port = proc.pid, int(address[address.index("-p") + 1])
        time.sleep(SETTLE)
        start = rss_kib(pid)
        growth = {}
        socks = []
        # Every side gets the same requests: AUTH as Redis's user (rotaproxy, whose client auth
        # is "none", answers it itself), then PING.
        hello = (sbs.encode_command(b"AUTH", b"bench", redis.password.encode())
                 + sbs.encode_command(b"PING"))
        for _ in range(clients):
            s = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
            s.sendall(hello)
            socks.append(s)
        for s in socks:
            read_exactly(s, b"+OK\r\n+PONG\r\n")
        time.sleep(SETTLE)
        growth["idle"] = rss_kib(pid) - start
        for i, s in enumerate(socks):
            s.sendall(sbs.encode_command(b"SET", b"memory:%d" % i, value))
        for s in socks:
            read_exactly(s, b"+OK\r\n")
        time.sleep(SETTLE)
        growth["after SET"] = rss_kib(pid) - start
        for i, s in enumerate(socks):
            s.sendall(sbs.encode_command(b"GET", b"memory:%d" % i))
        reply = b"$%d\r\n%s\r\n" % (len(value), value)
        for s in socks:
            read_exactly(s, reply)
        time.sleep(SETTLE)
        growth["after GET"] = rss_kib(pid) - start
        for s in socks:
            s.close()
        time.sleep(SETTLE)
        growth["closed"] = rss_kib(pid) - start
        return growth
    finally:
        for p in reversed(started):
            stop(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="rotaproxy,floor,haproxy,redis",
                    help="comma-separated KIND[:BINARY] (default rotaproxy,floor,haproxy,redis)")
    ap.add_argument("--clients", type=int, default=2000, help="client connections (default 2000)")
    ap.add_argument("--value-kib", type=int, default=100,
                    help="size of each client's value, KiB (default 100)")
    ap.add_argument("--tls", action="store_true",
                    help="sidecars reach Redis over TLS (clients of `redis` still use its plain port)")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, compare.on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < args.clients + 100:
        raise SystemExit(f"--clients {args.clients} needs more open files than the limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    which("redis-server")
    value = b"v" * (args.value_kib * 1024)
    results = {}
    with tempfile.TemporaryDirectory(prefix="rotaproxy-memory.") as tmp:
        certs = compare.make_certs(Path(tmp)) if args.tls else None
        for spec in args.sides.split(","):
            print(f"[memory] {spec}: {args.clients} clients", file=sys.stderr, flush=True)
            results[spec] = run_side(Path(tmp), spec, args.clients, value, certs)
    print(f"\nResident memory per client, KiB ({args.clients} clients, "
          f"{args.value_kib} KiB values{', TLS upstream' if args.tls else ''}): "
          f"growth over the start / clients")
    width = max(len(s) for s in results)
    print(f"{'side':<{width}}  " + "  ".join(f"{s:>9}" for s in STEPS))
    for spec, growth in results.items():
        print(f"{spec:<{width}}  " + "  ".join(f"{growth[s] / args.clients:9.1f}" for s in STEPS))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
