#!/usr/bin/env python3
"""CPU per request of two sidecars measured at the same time, side by side.

benches/compare.py runs one sidecar after another. On a shared VM the host's noise (steal, other
guests' cache traffic) changes from one run to the next by more than the few per cent a change to
the proxy makes, so a sequence of runs cannot see a 3% change even with 60 pairs (see
benches/README.md). Here both sidecars run at once, each in front of its own Redis, each driven by
its own redis-benchmark, pinned like compare.py pins them:

  CPU 0: two redis-server processes (A's and B's)
  CPU 1: both sidecars, and both redis-benchmark clients (--bench-cpu 0 moves the clients to CPU 0)

Whatever the host does at a moment, it does to both. Every `--window` seconds the script reads
each sidecar's CPU time (schedstat of every thread) and the number of commands its Redis served
(INFO stats), and compares CPU per request, B over A. Each round starts everything afresh; odd
rounds swap which Redis and which start order each side gets. A round's ratio is its total B CPU
per request over its total A CPU per request; the summary is the median of the rounds with a 95%
bootstrap interval, and the per-window spread.

Sides are written KIND or KIND:BINARY with KIND `floor` (the tokio copy_bidirectional forwarder,
examples/floor_forwarder.rs), `rotaproxy`, `rotaproxy-unix` (its clients connect over
`listener.unix_socket`) or `haproxy` (TCP mode, one thread, configured as compare.py
configures it); BINARY defaults to this checkout's release build (HAProxy: always
the one on PATH).
Comparing a build with itself (`--a rotaproxy --b rotaproxy`) shows the method's own bias and
spread; comparing two builds of rotaproxy shows what a change is worth.

  benches/side_by_side.py                                   # floor vs rotaproxy, SET+GET, P16+P1
  benches/side_by_side.py --a rotaproxy:/tmp/old/rotaproxy --b rotaproxy --tests set -P 16
  benches/side_by_side.py --syscalls -P 16 --rounds 2          # also system calls per command
  benches/side_by_side.py --a rotaproxy --b rotaproxy-unix     # what the Unix socket saves

`--syscalls` attaches `perf stat` (syscall tracepoints: root, or kernel.perf_event_paranoid=-1)
to each sidecar over the measured windows and reports its system calls (and context switches)
per 1000 commands: a change that adds reads, writes or wake-ups shows there even when CPU time
is too noisy to tell.

Python 3.11 standard library only; reuses compare.py's process bookkeeping and build helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (compare.py sits next to this file)
from compare import REPO, spawn, stop, stop_all, which  # noqa: E402

FLOOR_BIN = REPO / "target/release/examples/floor_forwarder"
ROTAPROXY_BIN = REPO / "target/release/rotaproxy"
REDIS_CPU = "0"
SIDECAR_CPU = "1"


@dataclass
class Side:
    label: str  # "A" or "B"
    kind: str  # "floor", "rotaproxy", "rotaproxy-unix" or "haproxy"
    binary: Path

    @property
    def name(self) -> str:
        return f"{self.label}={self.kind}:{self.binary}"


def log(msg: str) -> None:
    print(f"[side_by_side {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_side(label: str, spec: str) -> Side:
    kind, _, binary = spec.partition(":")
    defaults = {"floor": FLOOR_BIN, "rotaproxy": ROTAPROXY_BIN, "rotaproxy-unix": ROTAPROXY_BIN,
                "haproxy": None}
    if kind not in defaults:
        raise SystemExit(f"--{label.lower()}: kind must be one of {', '.join(defaults)}, "
                         f"not {kind!r}")
    if kind == "haproxy" and binary:
        raise SystemExit(f"--{label.lower()}: HAProxy is the one on PATH (compare.py starts it)")
    path = Path(binary) if binary else defaults[kind] or Path(which(kind))
    if not path.is_file():
        raise SystemExit(f"--{label.lower()}: no binary at {path}")
    return Side(label, kind, path)


# ---------------------------------------------------------------------------------------------
# One Redis, one sidecar, one client
# ---------------------------------------------------------------------------------------------


def encode_command(*args: bytes) -> bytes:
    """A command as a RESP array of bulk strings, as clients send it."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RedisStats:
    """A raw RESP connection to one Redis, authenticated as `bench`, reading INFO stats."""

    def __init__(self, port: int, password: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        reply = self.command(b"AUTH", b"bench", password.encode())
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"AUTH to Redis on port {port} answered {reply[:60]!r}")

    def command(self, *args: bytes) -> bytes:
        self.sock.sendall(encode_command(*args))
        data = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("Redis closed the stats connection")
            data += chunk
            if data[:1] == b"$":
                head = data.index(b"\r\n") if b"\r\n" in data else -1
                if head > 0 and len(data) >= head + 2 + int(data[1:head]) + 2:
                    return data
            elif data.endswith(b"\r\n"):
                return data

    def counters(self) -> tuple[int, int]:
        """(total_commands_processed, total_error_replies)."""
        info = self.command(b"INFO", b"stats").decode(errors="replace")
        values = dict(ln.split(":", 1) for ln in info.split("\r\n") if ":" in ln)
        return int(values["total_commands_processed"]), int(values.get("total_error_replies", 0))

    def close(self) -> None:
        self.sock.close()


@dataclass
class Redis:
    proc: object
    port: int  # plain: the stats connection always uses it
    tls_port: int | None  # with --tls: the port the sidecar uses
    password: str  # ACL user `bench`


def start_redis(tmp: Path, name: str, certs: dict[str, Path] | None) -> Redis:
    port, password = compare.free_port(), secrets.token_hex(16)
    tls_port = compare.free_port() if certs else None
    tls = (f"tls-port {tls_port}\ntls-cert-file {certs['cert']}\ntls-key-file {certs['key']}\n"
           f"tls-ca-cert-file {certs['ca']}\ntls-auth-clients no\n") if certs else ""
    conf = tmp / f"redis-{name}.conf"
    conf.write_text(
        f"bind 127.0.0.1\nport {port}\n{tls}save \"\"\nappendonly no\ndaemonize no\n"
        f"dir {tmp}\nlogfile \"\"\nmaxclients 10000\nuser default off\n"
        f"user bench on >{password} ~* &* +@all\n")
    os.chmod(conf, 0o600)
    logf = tmp / f"redis-{name}.log"
    proc = spawn(["taskset", "-c", REDIS_CPU, which("redis-server"), str(conf)], logf)
    compare.wait_port(port, proc, logf)
    if tls_port:
        compare.wait_port(tls_port, proc, logf)
    return Redis(proc, port, tls_port, password)


def start_sidecar(tmp: Path, side: Side, redis: Redis, certs: dict[str, Path] | None):
    """Starts the side's sidecar in front of Redis (over TLS when `certs`); returns (proc,
    redis-benchmark's address arguments, redis-benchmark auth)."""
    if side.kind == "haproxy":
        own = tmp / f"side-{side.label}"
        own.mkdir(exist_ok=True)
        as_compare = compare.Redis(redis.port, redis.tls_port or 0, redis.proc, redis.password, "")
        ctx = compare.Ctx(own, certs or {}, as_compare, None, None)
        proc, port = compare.start_haproxy(ctx, tls=certs is not None)
        return proc, ["-h", "127.0.0.1", "-p", str(port)], compare.acl_auth(ctx)
    port = compare.free_port()
    logf = tmp / f"sidecar-{side.label}.log"
    if side.kind == "floor":
        argv = [side.binary, f"127.0.0.1:{port}"]
        if certs:
            argv += [f"127.0.0.1:{redis.tls_port}", "--tls", certs["ca"], "localhost"]
        else:
            argv += [f"127.0.0.1:{redis.port}"]
        env, auth = None, ["--user", "bench", "-a", redis.password]
    else:
        conf = tmp / f"rotaproxy-{side.label}.toml"
        upstream = (f'url = "rediss://127.0.0.1:{redis.tls_port}"\nca_file = "{certs["ca"]}"\n'
                    f'server_name = "localhost"\n' if certs
                    else f'url = "redis://127.0.0.1:{redis.port}"\n')
        # The configuration compare.py gives rotaproxy; rotaproxy-unix also listens on a Unix
        # socket, which its client uses.
        unix_socket = tmp / f"rotaproxy-{side.label}.sock"
        unix = f'unix_socket = "{unix_socket}"\n' if side.kind == "rotaproxy-unix" else ""
        conf.write_text(
            f'[listener]\nbind = "127.0.0.1:{port}"\n{unix}\n'
            f'[upstream]\n{upstream}\n'
            f'[credentials]\nusername = "bench"\npassword = "env:BENCH_REDIS_PASSWORD"\n\n'
            f"[pool]\nwarm = 60\n\n"
            f'[admin]\nbind = "127.0.0.1:0"\n\n'
            f"[runtime]\nworker_threads = 1\n\n"
            f'[log]\nlevel = "warn"\n')
        argv = [side.binary, "run", "--config", conf]
        env = dict(os.environ, BENCH_REDIS_PASSWORD=redis.password)
        env.pop("RUST_LOG", None)
        auth = []
    proc = spawn(["taskset", "-c", SIDECAR_CPU, *map(str, argv)], logf, env=env)
    compare.wait_port(port, proc, logf)
    if side.kind == "rotaproxy-unix":
        return proc, ["-s", str(unix_socket)], auth
    return proc, ["-h", "127.0.0.1", "-p", str(port)], auth


def cpu_ns(pid: int) -> int:
    return sum(compare.thread_ns(pid).values())


def user_system_ticks(pid: int) -> tuple[int, int]:
    """User and system CPU time of the whole process, in clock ticks (/proc/PID/stat): coarser
    than schedstat, but it tells the proxy's own code from the kernel work it asks for."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


# The system calls `--syscalls` counts, as perf names them, and as the report names them; and
# the context switches, which cost kernel time without a system call of their own.
SYSCALL_EVENTS = {
    "raw_syscalls:sys_enter": "all",
    "syscalls:sys_enter_recvfrom": "recvfrom",
    "syscalls:sys_enter_sendto": "sendto",
    "syscalls:sys_enter_read": "read",
    "syscalls:sys_enter_write": "write",
    "syscalls:sys_enter_epoll_wait": "epoll_wait",
    "context-switches": "context switches",
}


class SyscallCount:
    """`perf stat` attached to one process, counting SYSCALL_EVENTS until `finish`."""

    def __init__(self, tmp: Path, label: str, pid: int):
        self.out = tmp / f"syscalls-{label}.csv"
        self.out.unlink(missing_ok=True)
        events = [arg for event in SYSCALL_EVENTS for arg in ("-e", event)]
        self.log = tmp / f"perf-{label}.log"
        self.proc = spawn(["perf", "stat", "-x,", "-o", str(self.out), *events, "-p", str(pid)],
                          self.log)

    def finish(self) -> dict[str, int]:
        # perf stat writes its counts when interrupted (SIGTERM would end it without them).
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=10)
        stop(self.proc)
        counts = {}
        text = self.out.read_text() if self.out.exists() else ""
        for line in text.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit() and fields[2] in SYSCALL_EVENTS:
                counts[SYSCALL_EVENTS[fields[2]]] = int(fields[0])
        if not counts:
            raise RuntimeError(f"perf stat counted no system calls: {compare.tail(self.log, 3)}"
                               f" {text.strip()[-200:]}")
        return counts


# ---------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    test: str
    pipeline: int
    clients: int
    tls: bool

    @property
    def label(self) -> str:
        return f"{self.test.upper()} c{self.clients} P{self.pipeline}{' TLS' if self.tls else ''}"


@dataclass
class Round:
    case: str
    index: int
    swapped: bool
    # Per side label: CPU ns and commands over the measured windows.
    cpu_ns: dict[str, int] = field(default_factory=dict)
    # Per side label: (user, system) clock ticks over the measured windows.
    user_system: dict[str, tuple[int, int]] = field(default_factory=dict)
    commands: dict[str, int] = field(default_factory=dict)
    window_ratios: list[float] = field(default_factory=list)
    # Per side label: system calls by name over the measured windows (`--syscalls`).
    syscalls: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str = ""

    def ns_per_request(self, label: str) -> float:
        return self.cpu_ns[label] / self.commands[label]

    @property
    def ratio(self) -> float:
        return self.ns_per_request("B") / self.ns_per_request("A")


def run_round(tmp: Path, sides: list[Side], case: Case, index: int, args,
              certs: dict[str, Path] | None) -> Round:
    swapped = index % 2 == 1
    r = Round(case.label, index, swapped)
    order = list(reversed(sides)) if swapped else sides
    started = []
    stats: dict[str, RedisStats] = {}
    try:
        setup = {}
        for slot, side in enumerate(order):
            redis = start_redis(tmp, f"{slot}", certs)
            started.append(redis.proc)
            sidecar, address, auth = start_sidecar(tmp, side, redis, certs)
            started.append(sidecar)
            stats[side.label] = RedisStats(redis.port, redis.password)
            setup[side.label] = (sidecar, address, auth)
        clients = {}
        for side in order:
            sidecar, address, auth = setup[side.label]
            argv = ["taskset", "-c", args.bench_cpu, which("redis-benchmark"), *address, *auth, "-c", str(case.clients), "-P", str(case.pipeline),
                    "-t", case.test, "-n", "2000000000", "-q"]
            clients[side.label] = spawn(argv, tmp / f"bench-{side.label}.log")
            started.append(clients[side.label])
        # Until both clients are connected and the pools are warm: not measured.
        time.sleep(args.warmup)

        def sample():
            return {s.label: (cpu_ns(setup[s.label][0].pid), *stats[s.label].counters())
                    for s in sides}

        first = prev = sample()
        ticks_first = {s.label: user_system_ticks(setup[s.label][0].pid) for s in sides}
        counters = {s.label: SyscallCount(tmp, s.label, setup[s.label][0].pid)
                    for s in sides} if args.syscalls else {}
        for _ in range(args.windows):
            time.sleep(args.window)
            now = sample()
            per = {}
            for label in ("A", "B"):
                served = now[label][1] - prev[label][1]
                if served <= 0:
                    raise RuntimeError(f"side {label} served nothing in a window")
                per[label] = (now[label][0] - prev[label][0]) / served
            r.window_ratios.append(per["B"] / per["A"])
            prev = now
        for label, counter in counters.items():
            r.syscalls[label] = counter.finish()
        for label, (user0, system0) in ticks_first.items():
            user1, system1 = user_system_ticks(setup[label][0].pid)
            r.user_system[label] = (user1 - user0, system1 - system0)
        for label in ("A", "B"):
            r.cpu_ns[label] = prev[label][0] - first[label][0]
            r.commands[label] = prev[label][1] - first[label][1]
            errors = prev[label][2] - first[label][2]
            if errors:
                raise RuntimeError(f"side {label}: Redis answered {errors} errors during the round")
            if clients[label].poll() is not None:
                raise RuntimeError(f"side {label}: redis-benchmark exited early "
                                   f"({compare.tail(tmp / f'bench-{label}.log', 3)})")
    except Exception as e:  # keep going with the other rounds; the report says what failed
        r.error = str(e)
    finally:
        for s in stats.values():
            s.close()
        for p in reversed(started):
            stop(p)
    return r


def bootstrap(values: list[float], rounds: int = 4000) -> tuple[float, float] | None:
    if len(values) < 3:
        return None
    rng = random.Random(7)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(rounds))
    return meds[int(0.025 * rounds)], meds[int(0.975 * rounds) - 1]


def report(case: Case, rounds: list[Round], sides: list[Side]) -> dict:
    ok = [r for r in rounds if not r.error]
    out = {"case": case.label, "rounds": len(rounds), "clean_rounds": len(ok),
           "errors": [r.error for r in rounds if r.error]}
    print(f"\n{case.label}: {len(ok)} of {len(rounds)} rounds measured")
    for e in out["errors"]:
        print(f"  failed round: {e}")
    if not ok:
        return out
    ratios = [r.ratio for r in ok]
    windows = sorted(w for r in ok for w in r.window_ratios)
    for side in sides:
        ns = statistics.median(r.ns_per_request(side.label) for r in ok)
        print(f"  {side.name}: {ns / 1000:.3f} µs CPU per request (median of rounds)")
        out[f"{side.label}_us_per_request"] = ns / 1000
    interval = bootstrap(ratios)
    iv = f" (95% {interval[0]:.3f}-{interval[1]:.3f})" if interval else ""
    print(f"  B/A CPU per request: {statistics.median(ratios):.3f}{iv}; rounds "
          + " ".join(f"{x:.3f}" for x in ratios))
    print(f"  per window: n={len(windows)} p10 {windows[len(windows) // 10]:.3f} "
          f"median {statistics.median(windows):.3f} p90 {windows[9 * len(windows) // 10]:.3f}")
    out.update(ratio=statistics.median(ratios), interval=interval, round_ratios=ratios,
               window_ratios=windows)
    # User and system time, summed over the rounds (ticks are coarse: 10 ms each).
    split = {}
    for side in sides:
        commands = sum(r.commands[side.label] for r in ok)
        user, system = (sum(r.user_system[side.label][i] for r in ok) / compare.CLK_TCK * 1e6
                        / commands for i in (0, 1))
        split[side.label] = (user, system)
        out[f"{side.label}_user_system_us_per_request"] = [user, system]
    (ua, sa), (ub, sb) = split["A"], split["B"]
    if ua > 0 and sa > 0:
        print(f"  user µs per request A {ua:.3f} B {ub:.3f} (B/A {ub / ua:.3f}); "
              f"system A {sa:.3f} B {sb:.3f} (B/A {sb / sa:.3f})")
    if all(r.syscalls for r in ok):
        for side in sides:
            per_1000 = {name: statistics.median(r.syscalls[side.label].get(name, 0) * 1000
                                                / r.commands[side.label] for r in ok)
                        for name in SYSCALL_EVENTS.values()}
            print(f"  {side.label} system calls per 1000 commands: "
                  + "  ".join(f"{name} {n:.1f}" for name, n in per_1000.items()))
            out[f"{side.label}_syscalls_per_1000"] = per_1000
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", default="floor", help="side A: KIND[:BINARY] (default floor)")
    ap.add_argument("--b", default="rotaproxy", help="side B: KIND[:BINARY] (default rotaproxy)")
    ap.add_argument("--tests", default="set,get", help="redis-benchmark tests (default set,get)")
    ap.add_argument("-P", "--pipelines", default="16,1", help="pipeline depths (default 16,1)")
    ap.add_argument("-c", "--clients", type=int, default=50, help="clients per side (default 50)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per case (default 6)")
    ap.add_argument("--windows", type=int, default=8, help="measured windows per round (default 8)")
    ap.add_argument("--window", type=float, default=1.0, help="window length, s (default 1)")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured start, s (default 1.5)")
    ap.add_argument("--bench-cpu", default=SIDECAR_CPU,
                    help="CPU of the redis-benchmark clients (default 1, with the sidecars)")
    ap.add_argument("--tls", action="store_true", help="both sidecars reach Redis over TLS")
    ap.add_argument("--syscalls", action="store_true",
                    help="also count each sidecar's system calls per command (perf stat)")
    ap.add_argument("--no-build", action="store_true", help="use existing release binaries")
    ap.add_argument("--json", type=Path, help="also write the summary as JSON to this file")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, compare.on_signal)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs at least 2 CPUs (Redis on CPU 0, the sidecars on CPU 1)")
    needed = ["redis-server", "redis-benchmark", "taskset"] + (["perf"] if args.syscalls else [])
    for binary in needed:
        which(binary)  # exits with "... not found" (benches/compare.sh installs Redis)
    if not args.no_build:
        if not compare.cargo_build(["build", "--release", "--bin", "rotaproxy",
                                    "--example", "floor_forwarder"], "rotaproxy and the floor",
                                   timeout=1800):
            return 1
    sides = [parse_side("A", args.a), parse_side("B", args.b)]
    cases = [Case(t, int(p), args.clients, args.tls) for p in args.pipelines.split(",")
             for t in args.tests.split(",")]
    summary = []
    with tempfile.TemporaryDirectory(prefix="rotaproxy-sbs.") as tmp:
        certs = compare.make_certs(Path(tmp)) if args.tls else None
        for case in cases:
            log(f"{case.label}: {args.rounds} rounds of {args.windows} x {args.window}s")
            rounds = [run_round(Path(tmp), sides, case, i, args, certs)
                      for i in range(args.rounds)]
            summary.append(report(case, rounds, sides))
    if args.json:
        args.json.write_text(json.dumps({"sides": [s.name for s in sides], "tls": args.tls,
                                         "cases": summary}, indent=1))
    return 0 if all(c.get("clean_rounds") for c in summary) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
