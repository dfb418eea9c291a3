#!/usr/bin/env python3
"""The training run of a profile-guided build (scripts/build-pgo): drives instrumented binaries
with the traffic they are built for, so the compiler learns which paths are hot.

  scripts/pgo-train.py --profiles DIR --rotaproxy BIN [--floor BIN] [--requests N]

One local redis-server (a plain and a TLS port, certificates made for the run) serves every
binary given. Each one runs twice, in front of the plain port and in front of the TLS port, and
redis-benchmark sends it a mix of everyday commands with 50 clients at pipeline depths 1 and 16,
and one client at depth 1. Every binary then gets SIGTERM and must exit with status 0: an
instrumented binary writes its profile at exit (`DIR/<name>-<plain|tls>-<pid>.profraw`), and a binary killed
any other way writes nothing. The run fails when a binary left no profile.

Reuses benches/compare.py's process bookkeeping, certificates and Redis set-up (every process is
ended by PID when the run ends, however it ends). Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import compare  # noqa: E402  (benches/compare.py)

# Strings, lists, sets, hashes, sorted sets and multi-key writes: the shapes of request and reply
# (small bulk strings, integers, arrays) that applications send most.
TESTS = "set,get,incr,lpush,rpush,lpop,rpop,sadd,hset,spop,zadd,zpopmin,lrange_100,mset"
# (clients, pipeline depth)
LOADS = [(50, 1), (50, 16), (1, 1)]


def log(msg: str) -> None:
    print(f"[pgo-train] {msg}", file=sys.stderr, flush=True)


def train(ctx: compare.Ctx, name: str, start, tls: bool, requests: int, profiles: Path) -> None:
    kind = "tls" if tls else "plain"
    # Each process writes its own file; the build script merges them.
    os.environ["LLVM_PROFILE_FILE"] = str(profiles / f"{name}-{kind}-%p.profraw")
    try:
        proc, port = start(ctx, tls)
    finally:
        del os.environ["LLVM_PROFILE_FILE"]
    # The floor passes the client's AUTH through; rotaproxy answers it itself (client auth
    # `none`). Both then reach Redis as the `bench` user.
    auth = ["--user", "bench", "-a", ctx.redis.password] if name == "floor" else []
    for clients, depth in LOADS:
        log(f"{name} ({kind} upstream): {TESTS} with -c {clients} -P {depth}")
        n = requests if clients > 1 else max(requests // 10, 1000)
        try:
            compare.run([compare.which("redis-benchmark"), "-h", "127.0.0.1", "-p", str(port),
                         *auth, "-c", str(clients), "-P", str(depth), "-n", str(n), "-t", TESTS,
                         "-q"], timeout=600, stdout=subprocess.DEVNULL)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            # Not `e` itself: its text repeats the command line, password included.
            what = "timed out" if isinstance(e, subprocess.TimeoutExpired) else f"exited {e.returncode}"
            raise SystemExit(f"redis-benchmark {what} against {name} ({kind}) at -c {clients} "
                             f"-P {depth}") from None
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=30)
    finally:
        compare.stop(proc)
    if status != 0:
        raise SystemExit(f"{name} ({kind}) exited with {status} after SIGTERM: it wrote no "
                         f"profile; log tail:\n{compare.tail(compare.LOGS[proc.pid])}")
    if not list(profiles.glob(f"{name}-{kind}-{proc.pid}.profraw")):
        raise SystemExit(f"{name} ({kind}) exited cleanly but left no profile in {profiles} "
                         "(is it an instrumented build?)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", type=Path, required=True, help="where the profiles go")
    ap.add_argument("--rotaproxy", type=Path, required=True, help="instrumented rotaproxy")
    ap.add_argument("--floor", type=Path, help="instrumented examples/floor_forwarder")
    ap.add_argument("--requests", type=int, default=100_000,
                    help="requests per test and load with 50 clients (default 100000)")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, compare.on_signal)
    # compare.py pins Redis and the sidecar to CPUs 0 and 1 to measure; training only needs the
    # traffic, on whatever CPUs this process may use (a container may have just one).
    compare.REDIS_CPU = compare.SIDECAR_CPU = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    args.profiles.mkdir(parents=True, exist_ok=True)
    profiles = args.profiles.resolve()
    binaries = [("rotaproxy", compare.start_rotaproxy)]
    if args.floor:
        binaries.append(("floor", compare.start_floor))
    with tempfile.TemporaryDirectory(prefix="rotaproxy-pgo.") as tmp:
        tmp = Path(tmp)
        certs = compare.make_certs(tmp)
        redis = compare.start_redis(tmp, certs)
        ctx = compare.Ctx(tmp, certs, redis, args.floor and args.floor.resolve(),
                          args.rotaproxy.resolve())
        for name, start in binaries:
            for tls in (False, True):
                train(ctx, name, start, tls, args.requests, profiles)
    log(f"profiles written to {profiles}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        compare.stop_all()
