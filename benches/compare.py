#!/usr/bin/env python3
"""Compare CPU cost and latency of Redis sidecars in front of the same Redis.

Driven by benches/compare.sh (which bounds the whole run with `timeout`); see benches/README.md.
Python 3.11 standard library only.

Layout on a 2-core box:
  CPU 0: redis-server (one instance: plain port + TLS port)
  CPU 1: the sidecar under test AND redis-benchmark (they share the core, as an application and
         its sidecar share a pod's CPU)

For each repetition, case (SET/GET x c50 P1 / c50 P16 / c1 P1) and target (direct Redis, plain or
TLS, or a sidecar: floor_forwarder, rotaproxy, HAProxy, stunnel, nutcracker) it runs
redis-benchmark once, reads rps/p50/p99 from its CSV output, and reads the sidecar's and Redis's
CPU time (/proc/PID/stat, refined by /proc/PID/task/*/schedstat) before and after, giving CPU µs
per request. Runs disturbed by other work on the machine are detected from /proc/stat, redone
within a budget, and left out of the medians when clean runs exist.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SIDECAR_CPU = "1"
REDIS_CPU = "0"

# Debian packages and a binary that shows each is installed.
PACKAGES = {
    "redis-server": "redis-server",
    "redis-tools": "redis-benchmark",
    "haproxy": "haproxy",
    "stunnel4": "stunnel4",
    "nutcracker": "nutcracker",
    "openssl": "openssl",
}


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Process bookkeeping: every child is recorded by PID and ended by PID at exit.
# ---------------------------------------------------------------------------------------------

CHILDREN: list[subprocess.Popen] = []
LOGS: dict[int, Path] = {}  # pid -> its log file


def spawn(argv: list[str], logfile: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(logfile, "ab")
    p = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # a Ctrl-C reaches only us; we end the children by PID
    )
    out.close()
    CHILDREN.append(p)
    LOGS[p.pid] = logfile
    return p


def stop(p: subprocess.Popen, grace: float = 3.0) -> None:
    if p.poll() is None:
        try:
            p.terminate()
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=grace)
        except ProcessLookupError:
            pass
    if p in CHILDREN:
        CHILDREN.remove(p)


def stop_all() -> None:
    for p in list(reversed(CHILDREN)):
        try:
            stop(p)
        except Exception as e:  # keep going: end every other child
            log(f"could not stop pid {p.pid}: {e}")


def on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def run(argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, timeout=timeout, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, logfile: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with {proc.returncode} before listening; "
                f"log tail:\n{tail(logfile)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} not accepting after {timeout}s; log tail:\n{tail(logfile)}")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def cpu_ticks(pid: int) -> int:
    """utime+stime of the whole process (all threads, live and exited), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # Field 2 (comm) may contain spaces: split after its closing parenthesis.
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15.
    return int(rest[11]) + int(rest[12])


def thread_ns(pid: int) -> dict[int, int]:
    """Run time in ns (sum_exec_runtime, user+system) of each live thread, from schedstat."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # thread gone between listdir and open
    return out


@dataclass
class CpuSample:
    ticks: int
    threads: dict[int, int]


def cpu_sample(pid: int) -> CpuSample:
    return CpuSample(cpu_ticks(pid), thread_ns(pid))


def cpu_us(before: CpuSample, after: CpuSample) -> tuple[float, str]:
    """CPU µs between two samples.

    /proc/PID/stat counts every thread, live or exited, but only in whole ticks. schedstat is
    exact but per live thread: it misses threads that came and went between the samples (stunnel
    runs one per connection). So the ns figure is used only when the same threads were alive at
    both samples and it agrees with the tick figure within rounding; otherwise the ticks."""
    by_ticks = (after.ticks - before.ticks) * 1e6 / CLK_TCK
    if before.threads and before.threads.keys() == after.threads.keys():
        by_ns = (sum(after.threads.values()) - sum(before.threads.values())) / 1000
        if abs(by_ns - by_ticks) <= 2.5 * 1e6 / CLK_TCK + 0.02 * by_ticks:
            return by_ns, "ns"
    return by_ticks, "tick"


def ensure_packages(allow_install: bool) -> None:
    missing = [pkg for pkg, binary in PACKAGES.items() if shutil.which(binary) is None
               and not Path("/usr/sbin", binary).exists()]
    if not missing:
        return
    if not allow_install:
        raise SystemExit(f"missing Debian packages: {' '.join(missing)} (run without --no-install)")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], timeout=300, env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout=600, env=env)


def which(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path("/usr/sbin", binary).exists() else None)
    if path is None:
        raise SystemExit(f"{binary} not found")
    return path


# ---------------------------------------------------------------------------------------------
# TLS material and Redis
# ---------------------------------------------------------------------------------------------


def make_certs(d: Path) -> dict[str, Path]:
    ca_key, ca, key, csr, crt, ext = (d / n for n in
                                      ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "server.ext"))
    ossl = which("openssl")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run([ossl, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key)], **quiet)
    run([ossl, "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "2",
         "-subj", "/CN=rotaproxy bench CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-out", str(ca)], **quiet)
    run([ossl, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], **quiet)
    run([ossl, "req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr)], **quiet)
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    run([ossl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(crt)], **quiet)
    # Redis, HAProxy and stunnel run as root here, but keep the key private anyway.
    os.chmod(key, 0o600)
    return {"ca": ca, "cert": crt, "key": key}


@dataclass
class Redis:
    port: int
    tls_port: int
    proc: subprocess.Popen
    password: str  # ACL user `bench`
    default_password: str  # the `default` user (only nutcracker uses it)


def start_redis(d: Path, certs: dict[str, Path]) -> Redis:
    port, tls_port = free_port(), free_port()
    pw, default_pw = secrets.token_hex(16), secrets.token_hex(16)
    conf = d / "redis.conf"
    conf.write_text(
        f"bind 127.0.0.1\n"
        f"port {port}\n"
        f"tls-port {tls_port}\n"
        f"tls-cert-file {certs['cert']}\n"
        f"tls-key-file {certs['key']}\n"
        f"tls-ca-cert-file {certs['ca']}\n"
        f"tls-auth-clients no\n"
        f'save ""\n'
        f"appendonly no\n"
        f"daemonize no\n"
        f"dir {d}\n"
        f'logfile ""\n'
        f"maxclients 10000\n"
        # `default` has a password too: nutcracker's redis_auth sends the one-argument
        # `AUTH <password>`, which authenticates `default`. Everything else uses `bench`.
        f"user default on >{default_pw} ~* &* +@all\n"
        f"user bench on >{pw} ~* &* +@all\n"
    )
    os.chmod(conf, 0o600)
    logf = d / "redis.log"
    proc = spawn(on_cpu(REDIS_CPU, which("redis-server"), conf), logf)
    wait_port(port, proc, logf)
    wait_port(tls_port, proc, logf)
    return Redis(port, tls_port, proc, pw, default_pw)


# ---------------------------------------------------------------------------------------------
# Targets: direct Redis and the sidecars
# ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    kind: str  # "plain" or "tls": how the hop to Redis is made
    # Builds config, starts the sidecar; returns (proc or None for direct, port).
    start: callable
    # Extra redis-benchmark arguments (auth, TLS) for this target.
    bench_args: callable
    note: str = ""
    proc: subprocess.Popen | None = None
    port: int = 0
    error: str = ""


@dataclass
class Ctx:
    tmp: Path
    certs: dict[str, Path]
    redis: Redis
    floor_bin: Path | None
    rotaproxy_bin: Path | None


NICE = {"n": 0}  # --nice: scheduling priority of every process the benchmark measures


def on_cpu(cpu: str, *argv) -> list[str]:
    prio = ["nice", "-n", str(NICE["n"])] if NICE["n"] else []
    return [*prio, "taskset", "-c", cpu, *map(str, argv)]


def pinned(*argv) -> list[str]:
    return on_cpu(SIDECAR_CPU, *argv)


def wait_ready(name: str, proc: subprocess.Popen, port: int, logf: Path) -> tuple[subprocess.Popen, int]:
    wait_port(port, proc, logf)
    return proc, port


def start_floor(ctx: Ctx, tls: bool):
    port = free_port()
    logf = ctx.tmp / f"floor-{'tls' if tls else 'plain'}.log"
    if tls:
        argv = pinned(ctx.floor_bin, f"127.0.0.1:{port}", f"127.0.0.1:{ctx.redis.tls_port}",
                      "--tls", ctx.certs["ca"], "localhost")
    else:
        argv = pinned(ctx.floor_bin, f"127.0.0.1:{port}", f"127.0.0.1:{ctx.redis.port}")
    return wait_ready("floor", spawn(argv, logf), port, logf)


def start_rotaproxy(ctx: Ctx, tls: bool):
    port = free_port()
    kind = "tls" if tls else "plain"
    conf = ctx.tmp / f"rotaproxy-{kind}.toml"
    upstream = (
        f'url = "rediss://127.0.0.1:{ctx.redis.tls_port}"\n'
        f'ca_file = "{ctx.certs["ca"]}"\n'
        f'server_name = "localhost"\n'
        if tls else f'url = "redis://127.0.0.1:{ctx.redis.port}"\n'
    )
    conf.write_text(
        f'[listener]\nbind = "127.0.0.1:{port}"\n\n'
        f"[upstream]\n{upstream}\n"
        f'[credentials]\nusername = "bench"\npassword = "env:BENCH_REDIS_PASSWORD"\n\n'
        f"[pool]\nwarm = 60\n\n"
        f'[admin]\nbind = "127.0.0.1:0"\n\n'
        f"[runtime]\nworker_threads = 1\n\n"
        f'[log]\nlevel = "warn"\n'
    )
    logf = ctx.tmp / f"rotaproxy-{kind}.log"
    env = dict(os.environ, BENCH_REDIS_PASSWORD=ctx.redis.password)
    env.pop("RUST_LOG", None)
    proc = spawn(pinned(ctx.rotaproxy_bin, "run", "--config", conf), logf, env=env)
    return wait_ready("rotaproxy", proc, port, logf)


def start_haproxy(ctx: Ctx, tls: bool):
    port = free_port()
    kind = "tls" if tls else "plain"
    server = (
        f"server s 127.0.0.1:{ctx.redis.tls_port} ssl verify required ca-file {ctx.certs['ca']} "
        f"sni str(localhost) verifyhost localhost"
        if tls else f"server s 127.0.0.1:{ctx.redis.port}"
    )
    conf = ctx.tmp / f"haproxy-{kind}.cfg"
    conf.write_text(
        "global\n"
        "    nbthread 1\n"
        "    maxconn 4000\n"  # fits the 20000 FD hard limit here

        "\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 5s\n"
        "    timeout client 5m\n"
        "    timeout server 5m\n"
        "\n"
        "frontend fe\n"
        f"    bind 127.0.0.1:{port}\n"
        "    default_backend be\n"
        "\n"
        "backend be\n"
        f"    {server}\n"
    )
    logf = ctx.tmp / f"haproxy-{kind}.log"
    # -db: foreground, no master process, so the PID we hold is the one doing the work.
    proc = spawn(pinned(which("haproxy"), "-db", "-f", conf), logf)
    return wait_ready("haproxy", proc, port, logf)


def start_stunnel(ctx: Ctx, tls: bool):
    assert tls
    port = free_port()
    conf = ctx.tmp / "stunnel.conf"
    conf.write_text(
        "foreground = yes\n"
        "pid =\n"
        "syslog = no\n"
        "debug = 4\n"
        "\n"
        "[redis]\n"
        "client = yes\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{ctx.redis.tls_port}\n"
        f"CAfile = {ctx.certs['ca']}\n"
        "verifyChain = yes\n"
        "checkHost = localhost\n"
        "sni = localhost\n"
        "socket = l:TCP_NODELAY=1\n"
        "socket = r:TCP_NODELAY=1\n"
    )
    logf = ctx.tmp / "stunnel.log"
    proc = spawn(pinned(which("stunnel4"), conf), logf)
    return wait_ready("stunnel", proc, port, logf)


def start_nutcracker(ctx: Ctx, tls: bool):
    assert not tls
    port, stats_port = free_port(), free_port()
    conf = ctx.tmp / "nutcracker.yml"
    conf.write_text(
        "bench:\n"
        f"  listen: 127.0.0.1:{port}\n"
        "  redis: true\n"
        f"  redis_auth: {ctx.redis.default_password}\n"
        "  hash: fnv1a_64\n"
        "  distribution: ketama\n"
        "  auto_eject_hosts: false\n"
        "  preconnect: true\n"
        "  server_connections: 1\n"
        "  timeout: 5000\n"
        "  servers:\n"
        f"   - 127.0.0.1:{ctx.redis.port}:1\n"
    )
    os.chmod(conf, 0o600)
    logf = ctx.tmp / "nutcracker.log"
    proc = spawn(pinned(which("nutcracker"), "-c", conf, "-o", logf, "-v", "4",
                        "-s", stats_port, "-a", "127.0.0.1",
                        "-p", ctx.tmp / "nutcracker.pid"), logf)
    return wait_ready("nutcracker", proc, port, logf)


def direct_start(tls: bool):
    def start(ctx: Ctx):
        return None, (ctx.redis.tls_port if tls else ctx.redis.port)
    return start


def acl_auth(ctx: Ctx) -> list[str]:
    return ["--user", "bench", "-a", ctx.redis.password]


def targets() -> list[Target]:
    return [
        Target("direct", "plain", direct_start(False), acl_auth,
               note="redis-benchmark straight to Redis (plain), AUTH bench"),
        Target("direct-tls", "tls", direct_start(True),
               lambda c: [*acl_auth(c), "--tls", "--cacert", str(c.certs["ca"]), "--sni", "localhost"],
               note="redis-benchmark straight to Redis over TLS (client pays TLS on CPU 1)"),
        Target("floor", "plain", lambda c: start_floor(c, False), acl_auth,
               note="examples/floor_forwarder, client AUTH passes through"),
        Target("floor-tls", "tls", lambda c: start_floor(c, True), acl_auth,
               note="examples/floor_forwarder --tls, client AUTH passes through"),
        Target("rotaproxy", "plain", lambda c: start_rotaproxy(c, False), lambda c: [],
               note="authenticates upstream as bench; clients send no AUTH"),
        Target("rotaproxy-tls", "tls", lambda c: start_rotaproxy(c, True), lambda c: [],
               note="authenticates upstream as bench; clients send no AUTH"),
        Target("haproxy", "plain", lambda c: start_haproxy(c, False), acl_auth,
               note="HAProxy TCP mode, nbthread 1, client AUTH passes through"),
        Target("haproxy-tls", "tls", lambda c: start_haproxy(c, True), acl_auth,
               note="HAProxy TCP mode + ssl verify required, nbthread 1, client AUTH passes through"),
        Target("stunnel-tls", "tls", lambda c: start_stunnel(c, True), acl_auth,
               note="stunnel client=yes, verifyChain+checkHost, client AUTH passes through"),
        Target("nutcracker", "plain", lambda c: start_nutcracker(c, False),
               lambda c: ["-a", c.redis.default_password],
               note="twemproxy 0.5.0: redis_auth sends one-argument AUTH, so it authenticates as "
                    "`default` (requirepass-style), not the ACL user bench; clients AUTH to "
                    "nutcracker with that password; multiplexes onto 1 server connection"),
    ]


# ---------------------------------------------------------------------------------------------
# Benchmark runs
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    test: str  # set | get
    clients: int
    pipeline: int
    requests: int

    @property
    def label(self) -> str:
        return f"{self.test.upper()} c{self.clients} P{self.pipeline}"


@dataclass
class Result:
    case: str
    target: str
    kind: str
    requests: int
    rps: float | None = None
    avg_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    sidecar_us_per_req: float | None = None
    redis_us_per_req: float | None = None
    other_cpu: float | None = None  # share of CPU 0+1 used by anything else during the run
    error: str = ""
    extra: dict = field(default_factory=dict)


def parse_csv(out: str) -> dict:
    rows = list(csv.DictReader(io.StringIO(out)))
    if not rows:
        raise ValueError(f"no CSV rows in redis-benchmark output: {out[:300]!r}")
    row = rows[0]
    return {
        "rps": float(row["rps"]),
        "avg_ms": float(row["avg_latency_ms"]),
        "p50_ms": float(row["p50_latency_ms"]),
        "p99_ms": float(row["p99_latency_ms"]),
    }


def cpu_busy_ticks() -> dict[str, int]:
    """Busy clock ticks (user+nice+system+irq+softirq+steal) of CPU 0 and CPU 1 from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for ln in f:
            parts = ln.split()
            if parts[0] in (f"cpu{REDIS_CPU}", f"cpu{SIDECAR_CPU}"):
                v = list(map(int, parts[1:9]))
                out[parts[0]] = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return out


def children_ticks() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * CLK_TCK


QUIET_BUDGET = {"left": 120.0}  # seconds, over the whole run


def wait_quiet(threshold: float = 0.10, max_wait: float = 20.0) -> float:
    """Waits (bounded) until CPU 0 and 1 are nearly idle, i.e. nothing else on the machine is
    competing; returns the busy share seen last. Our idle sidecars and Redis cost ~0."""
    deadline = time.monotonic() + min(max_wait, QUIET_BUDGET["left"])
    t_start = time.monotonic()
    while True:
        b0, w0 = cpu_busy_ticks(), time.monotonic()
        time.sleep(0.3)
        b1, w1 = cpu_busy_ticks(), time.monotonic()
        share = sum(b1[k] - b0[k] for k in b1) / (CLK_TCK * (w1 - w0) * len(b1))
        if share <= threshold or time.monotonic() >= deadline:
            QUIET_BUDGET["left"] = max(0.0, QUIET_BUDGET["left"] - (time.monotonic() - t_start))
            return share


def bench(ctx: Ctx, t: Target, case: Case, timeout: float) -> Result:
    argv = pinned(which("redis-benchmark"), "-h", "127.0.0.1", "-p", t.port,
                  "-t", case.test, "-n", case.requests, "-c", case.clients, "-P", case.pipeline,
                  "--csv", *t.bench_args(ctx))
    r = Result(case.label, t.name, t.kind, case.requests)
    pids = {"redis": ctx.redis.proc.pid}
    if t.proc is not None:
        pids["sidecar"] = t.proc.pid
    r.extra["busy_before"] = wait_quiet()
    before = {k: cpu_sample(v) for k, v in pids.items()}
    busy0, kids0, wall0 = cpu_busy_ticks(), children_ticks(), time.monotonic()
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        r.error = f"redis-benchmark timed out after {timeout:.0f}s"
        return r
    after = {k: cpu_sample(v) for k, v in pids.items()}
    busy1, kids1, wall1 = cpu_busy_ticks(), children_ticks(), time.monotonic()
    if cp.returncode != 0:
        r.error = f"redis-benchmark exit {cp.returncode}: {cp.stderr.strip()[-300:]}"
        return r
    try:
        m = parse_csv(cp.stdout)
    except Exception as e:
        r.error = f"{e}; stderr: {cp.stderr.strip()[-300:]}"
        return r
    r.rps, r.avg_ms, r.p50_ms, r.p99_ms = m["rps"], m["avg_ms"], m["p50_ms"], m["p99_ms"]
    d = {}
    for k in pids:
        d[k], r.extra[f"{k}_cpu_method"] = cpu_us(before[k], after[k])
    r.redis_us_per_req = d["redis"] / case.requests
    if "sidecar" in pids:
        r.sidecar_us_per_req = d["sidecar"] / case.requests
    # Share of CPU 0+1 capacity used by anything but Redis, the sidecar and redis-benchmark
    # during the run (other processes, hypervisor steal, unattributed softirq): the noise.
    ours = sum(d.values()) * CLK_TCK / 1e6 + (kids1 - kids0)
    total = sum(busy1[k] - busy0[k] for k in busy1)
    cap = CLK_TCK * (wall1 - wall0) * len(busy1)
    r.other_cpu = max(0.0, (total - ours) / cap) if cap > 0 else None
    errs = [ln for ln in cp.stderr.splitlines() if "error" in ln.lower()]
    if errs:
        r.extra["stderr"] = errs[:3]
    return r


def check_target(ctx: Ctx, t: Target) -> None:
    """A short run that must succeed (catches AUTH/TLS mistakes before the timed runs), and warms
    the path (page faults, allocator, pools)."""
    argv = pinned(which("redis-benchmark"), "-h", "127.0.0.1", "-p", t.port, "-t", "set,get",
                  "-n", 2000, "-c", 50, "-P", 1, "--csv", *t.bench_args(ctx))
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if cp.returncode != 0 or not cp.stdout.strip():
        raise RuntimeError(f"warm-up failed (exit {cp.returncode}): {cp.stderr.strip()[-400:]}")
    # redis-benchmark keeps going after error replies; make sure the commands were served.
    probe = subprocess.run(
        [which("redis-cli"), "-h", "127.0.0.1", "-p", str(t.port), "--no-auth-warning",
         *t.bench_args(ctx), "SET", "bench:probe", "ok"],
        capture_output=True, text=True, timeout=10)
    if probe.stdout.strip() != "OK":
        raise RuntimeError(f"probe SET through {t.name} answered {probe.stdout.strip()!r} "
                           f"{probe.stderr.strip()!r}")


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def cargo_build(args: list[str], what: str, timeout: float) -> bool:
    log(f"building {what}: cargo {' '.join(args)}")
    try:
        cp = subprocess.run(["cargo", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"building {what} timed out after {timeout:.0f}s")
        return False
    if cp.returncode != 0:
        log(f"building {what} failed:\n" + "\n".join(cp.stderr.splitlines()[-15:]))
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def summarize(results: list[Result], max_other: float) -> dict[tuple[str, str], dict]:
    """Per (case, target): the median of each metric over its clean runs (other CPU at most
    max_other), or over all its runs, flagged, when none was clean."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.case, r.target), []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.error]
        errs = [r.error for r in rs if r.error]
        if not ok:
            out[key] = {"error": errs[0], "kind": rs[0].kind}
            continue
        clean = [r for r in ok if r.other_cpu is not None and r.other_cpu <= max_other]
        use = clean or ok
        rps = [r.rps for r in use]
        med = median(rps)
        out[key] = {
            "kind": rs[0].kind,
            "runs": len(ok),
            "clean_runs": len(clean),
            "failed_runs": len(errs),
            "rps": med,
            "rps_spread": (max(rps) - min(rps)) / med if len(rps) > 1 and med else None,
            "avg_us": median([r.avg_ms * 1000 for r in use]),
            "p50_us": median([r.p50_ms * 1000 for r in use]),
            "p99_us": median([r.p99_ms * 1000 for r in use]),
            "sidecar_us_per_req": median([r.sidecar_us_per_req for r in use]),
            "redis_us_per_req": median([r.redis_us_per_req for r in use]),
            "other_cpu": median([r.other_cpu for r in use]),
            "sidecar_cpu_by_ticks": sum(r.extra.get("sidecar_cpu_method") == "tick" for r in use),
        }
    return out


FLOOR_OF = {"plain": "floor", "tls": "floor-tls"}


def paired_floor_ratios(results: list[Result],
                        max_other: float) -> dict[tuple[str, str], list[float]]:
    """(sidecar CPU / floor CPU) from the same repetition, for every repetition where both runs
    were clean: the two ran back to back, so slow drift of the machine cancels out."""
    by_pass: dict[tuple[str, str, str], Result] = {}
    for r in results:
        tag = r.extra.get("pass", "")
        if (not r.error and r.sidecar_us_per_req and r.other_cpu is not None
                and r.other_cpu <= max_other and not tag.startswith("retry")):
            by_pass[(r.case, r.target, tag)] = r
    ratios: dict[tuple[str, str], list[float]] = {}
    for (case, target, tag), r in by_pass.items():
        f = by_pass.get((case, FLOOR_OF.get(r.kind, ""), tag))
        if f is not None and target != f.target:
            ratios.setdefault((case, target), []).append(
                r.sidecar_us_per_req / f.sidecar_us_per_req)
    return {k: v for k, v in ratios.items() if v}


def bootstrap_interval(ratios: list[float], rounds: int = 2000) -> tuple[float, float] | None:
    """95% interval of the median paired ratio, by resampling the repetitions (percentile
    bootstrap, fixed seed so a table reads the same twice). None below five repetitions."""
    if len(ratios) < 5:
        return None
    rng = random.Random(0)
    medians = sorted(median(rng.choices(ratios, k=len(ratios))) for _ in range(rounds))
    return medians[int(rounds * 0.025)], medians[int(rounds * 0.975) - 1]


def print_table(summary: dict, cases: list[Case], target_order: list[str],
                paired: dict[tuple[str, str], list[float]]) -> None:
    direct_of = {"plain": "direct", "tls": "direct-tls"}
    head = ("case", "sidecar", "kind", "rps", "±rps", "x direct", "avg µs", "p50 µs", "p99 µs",
            "sidecar CPU µs/req", "x floor", "paired", "paired 95%", "redis CPU µs/req", "clean",
            "other CPU")
    widths = (12, 14, 5, 8, 5, 8, 6, 6, 6, 18, 7, 6, 10, 16, 5, 9)
    line = lambda cols: "  ".join(
        (c.ljust(w) if i < 3 else c.rjust(w)) for i, (c, w) in enumerate(zip(cols, widths))).rstrip()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for case in cases:
        for name in target_order:
            r = summary.get((case.label, name))
            if r is None:
                continue
            if "error" in r:
                print(line((case.label, name, r["kind"], "FAILED")) + "  " + r["error"][:100])
                continue
            d = summary.get((case.label, direct_of[r["kind"]]), {})
            ratio = r["rps"] / d["rps"] if d.get("rps") else None
            f = summary.get((case.label, FLOOR_OF[r["kind"]]), {})
            fl = (r["sidecar_us_per_req"] / f["sidecar_us_per_req"]
                  if f.get("sidecar_us_per_req") and r["sidecar_us_per_req"] is not None else None)
            spread = r["rps_spread"]
            pairs = paired.get((case.label, name), [])
            interval = bootstrap_interval(pairs)
            print(line((
                case.label, name, r["kind"],
                fmt(r["rps"], ".0f"), "-" if spread is None else f"{spread * 100:.0f}%",
                fmt(ratio, ".2f"), fmt(r["avg_us"], ".1f"), fmt(r["p50_us"], ".0f"),
                fmt(r["p99_us"], ".0f"),
                fmt(r["sidecar_us_per_req"], ".2f") + ("~" if r["sidecar_cpu_by_ticks"] else ""),
                fmt(fl, ".2f"), fmt(median(pairs) if pairs else None, ".2f"),
                "-" if interval is None else f"{interval[0]:.2f}-{interval[1]:.2f}",
                fmt(r["redis_us_per_req"], ".2f"),
                f"{r['clean_runs']}/{r['runs']}",
                ("-" if r["other_cpu"] is None else f"{r['other_cpu'] * 100:.0f}%")
                + ("" if r["clean_runs"] else " !"),
            )) + (f"  ({r['failed_runs']} run(s) failed)" if r["failed_runs"] else ""))
        print()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small request counts, one repetition: a smoke run (~1-2 min)")
    ap.add_argument("--repeat", type=int, help="repetitions of every run; the table shows medians "
                    "(default 3, 1 with --quick)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every request count by this")
    ap.add_argument("--only", default="", help="comma-separated targets to run (direct and floor "
                    "targets are always added for the ratios), e.g. rotaproxy,rotaproxy-tls")
    ap.add_argument("--skip", default="", help="comma-separated targets to leave out")
    ap.add_argument("--cases", default="", help="comma-separated cases to run, written like "
                    "their labels without spaces, any case (e.g. getc50p16,setc50p16); default all")
    ap.add_argument("--no-install", action="store_true", help="never run apt-get")
    ap.add_argument("--no-build", action="store_true", help="use existing target/release binaries")
    ap.add_argument("--json", type=Path, help="also write every run's result as JSON to this file")
    ap.add_argument("--wait-quiet", type=float, default=120.0, metavar="SECONDS",
                    help="total time to spend waiting for an idle machine before runs (default 120; "
                    "at most 20 s before any one run)")
    ap.add_argument("--max-other", type=float, default=0.10, metavar="SHARE",
                    help="a run is clean when other work used at most this share of CPUs 0+1 "
                    "(default 0.10); the table uses clean runs when there are any")
    ap.add_argument("--retries", type=int, default=2,
                    help="extra passes redoing (case, target) pairs without a clean run (default 2)")
    ap.add_argument("--retry-budget", type=float, default=120.0, metavar="SECONDS",
                    help="time allowed for those passes (default 120)")
    ap.add_argument("--nice", type=int, default=0, metavar="N",
                    help="run Redis, the sidecars and redis-benchmark under `nice -n N` (e.g. -10, as "
                    "root) so that other work on a shared machine disturbs the runs less")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args()

    QUIET_BUDGET["left"] = max(0.0, args.wait_quiet)
    NICE["n"] = args.nice
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs at least 2 CPUs (Redis on CPU 0, sidecar + client on CPU 1)")

    # Requests per redis-benchmark run. SET and GET are separate invocations so that CPU time is
    # attributed to one test.
    if args.quick:
        counts, repeat = {(50, 1): 20_000, (50, 16): 100_000, (1, 1): 10_000}, 1
    else:
        counts, repeat = {(50, 1): 40_000, (50, 16): 200_000, (1, 1): 10_000}, 3
    repeat = args.repeat or repeat
    if repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    cases = [Case(test, c, p, max(1000, int(n * args.scale)))
             for (c, p), n in counts.items() for test in ("set", "get")]
    wanted = {s.strip().lower() for s in args.cases.split(",") if s.strip()}
    if wanted:
        known = {c.label.replace(" ", "").lower() for c in cases}
        if wanted - known:
            raise SystemExit(f"unknown case(s) {sorted(wanted - known)}; known: {sorted(known)}")
        cases = [c for c in cases if c.label.replace(" ", "").lower() in wanted]

    ensure_packages(not args.no_install)

    all_targets = targets()
    names = [t.name for t in all_targets]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    for s in only | skip:
        if s not in names:
            raise SystemExit(f"unknown target {s!r}; known: {', '.join(names)}")
    if only:
        only |= {"direct", "direct-tls", "floor", "floor-tls"}
    chosen = [t for t in all_targets if (not only or t.name in only) and t.name not in skip]

    floor_bin = REPO / "target/release/examples/floor_forwarder"
    rota_bin = REPO / "target/release/rotaproxy"
    notes: list[str] = []
    if any(t.name.startswith("floor") for t in chosen):
        built = args.no_build or cargo_build(
            ["build", "--release", "--example", "floor_forwarder"], "floor_forwarder", 900)
        if not floor_bin.exists():
            raise SystemExit(f"cannot build examples/floor_forwarder and {floor_bin} is missing")
        if not built:
            # The example links the crate's library, which may be mid-edit; the forwarder itself
            # does not depend on it, so an earlier build measures the same thing.
            notes.append(f"floor_forwarder did not rebuild; used the existing {floor_bin}")
    if any(t.name.startswith("rotaproxy") for t in chosen):
        ok = args.no_build or cargo_build(["build", "--release"], "rotaproxy", 900)
        if not ok or not rota_bin.exists():
            notes.append("rotaproxy skipped: `cargo build --release` failed or the binary is missing")
            chosen = [t for t in chosen if not t.name.startswith("rotaproxy")]

    tmp = Path(tempfile.mkdtemp(prefix="rotaproxy-bench-"))
    log(f"work dir {tmp}")
    results: list[Result] = []
    try:
        certs = make_certs(tmp)
        redis = start_redis(tmp, certs)
        log(f"redis-server pid {redis.proc.pid} on CPU {REDIS_CPU}: plain :{redis.port}, TLS :{redis.tls_port}")
        ctx = Ctx(tmp, certs, redis, floor_bin, rota_bin)

        # Start every sidecar (idle ones cost nothing measurable), check that commands really go
        # through each, then interleave: repetition > case > target, so that drift of this
        # machine's speed over the run hits every target alike.
        for t in chosen:
            try:
                t.proc, t.port = t.start(ctx)
                check_target(ctx, t)
            except Exception as e:
                t.error = str(e)
                log(f"{t.name}: FAILED to start or warm up: {e}")
                if t.proc is not None:
                    stop(t.proc)
                continue
            where = f"pid {t.proc.pid} on CPU {SIDECAR_CPU}" if t.proc else "no sidecar"
            log(f"{t.name}: ready on :{t.port} ({where})")
        live = [t for t in chosen if not t.error]
        for t in chosen:
            if t.error:
                results += [Result(c.label, t.name, t.kind, c.requests, error="start failed")
                            for c in cases]

        def one(t: Target, case: Case, tag: str) -> None:
            # Generous bound: even 1k rps finishes in time.
            r = bench(ctx, t, case, timeout=30 + case.requests / 1000)
            r.extra["pass"] = tag
            results.append(r)
            if r.error:
                log(f"[{tag}] {case.label} {t.name}: FAILED {r.error}")
            else:
                sc = (f", sidecar {r.sidecar_us_per_req:.2f} µs/req"
                      if r.sidecar_us_per_req is not None else "")
                log(f"[{tag}] {case.label} {t.name}: {r.rps:.0f} rps, "
                    f"p50 {r.p50_ms * 1000:.0f} µs, p99 {r.p99_ms * 1000:.0f} µs{sc}"
                    f", other CPU {(r.other_cpu or 0) * 100:.0f}%")
                for ln in r.extra.get("stderr", []):
                    log(f"    redis-benchmark: {ln[:200]}")
            if t.proc is not None and t.proc.poll() is not None:
                t.error = f"died (exit {t.proc.returncode})"
                log(f"{t.name} {t.error}; log tail:\n{tail(LOGS[t.proc.pid])}")

        started = time.monotonic()
        for rep in range(1, repeat + 1):
            for case in cases:
                # Every other repetition runs the targets in reverse order, so that drift of the
                # machine within a case favours no target (see the paired ratio in the table).
                for t in (live if rep % 2 else live[::-1]):
                    if not t.error:
                        one(t, case, f"{rep}/{repeat}")
            log(f"repetition {rep}/{repeat} done at {time.monotonic() - started:.0f}s")

        # Runs disturbed by other work on the machine (other CPU above --max-other) are redone,
        # within a time budget, for every (case, target) that has no clean run yet.
        retry_deadline = time.monotonic() + args.retry_budget
        for attempt in range(1, args.retries + 1):
            summary = summarize(results, args.max_other)
            todo = [(c, t) for c in cases for t in live
                    if not t.error and summary.get((c.label, t.name), {}).get("clean_runs", 1) == 0]
            if not todo or time.monotonic() >= retry_deadline:
                break
            log(f"retry pass {attempt}: {len(todo)} (case, target) pairs had no clean run")
            for c, t in todo:
                if time.monotonic() >= retry_deadline:
                    log("retry budget spent")
                    break
                if not t.error:
                    one(t, c, f"retry {attempt}")
    finally:
        stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(results, args.max_other)
    print()
    print(f"# redis-server pinned to CPU {REDIS_CPU}; each sidecar AND redis-benchmark pinned to CPU {SIDECAR_CPU}.")
    print("# rps, avg, p50, p99 from redis-benchmark --csv; CPU = the process's run time over the run / requests:")
    print("#   from /proc/PID/task/*/schedstat (ns) when its threads were the same before and after, else")
    print(f"#   utime+stime from /proc/PID/stat (CLK_TCK={CLK_TCK}), marked ~ (±1 tick per run).")
    print(f"# Each figure is the median over the clean runs (other CPU <= {args.max_other:.0%}) of "
          f"{repeat} repetition(s) plus retries; ±rps = (max-min)/median of rps."
          + (f" Measured processes ran at nice {NICE['n']}." if NICE["n"] else ""))
    print("# x direct: rps / rps of direct Redis of the same kind (plain: direct, tls: direct-tls).")
    print("# x floor: sidecar CPU µs/req / floor_forwarder's of the same kind (floor, floor-tls).")
    print("# paired: median over repetitions of that ratio taken within one repetition (the two runs")
    print("#   back to back, both clean; target order alternates): steadier than x floor on a noisy machine.")
    print("# paired 95%: bootstrap interval of that median (from 5 repetitions on): a target such as")
    print("#   `within 1.1x of the floor` is met when the whole interval is below it.")
    print("# other CPU: share of CPUs 0+1 used during the run by anything but Redis, the sidecar and")
    print("#   redis-benchmark (other processes, steal, unattributed softirq), median of the runs used.")
    print("# clean: clean runs / runs. `!`: no clean run, the figures come from disturbed runs: do not trust them.")
    print("# requests per run: " + ", ".join(f"{c.label}={c.requests}" for c in cases))
    print()
    paired = paired_floor_ratios(results, args.max_other)
    print_table(summary, cases, [t.name for t in chosen], paired)
    for t in chosen:
        print(f"  {t.name:14} {t.note}" + (f"  [FAILED: {t.error.splitlines()[0]}]" if t.error else ""))
    for n in notes:
        print(f"  note: {n}")
    if args.json:
        args.json.write_text(json.dumps({
            "repeat": repeat,
            "cases": [c.__dict__ for c in cases],
            "runs": [r.__dict__ for r in results],
            "summary": [{"case": k[0], "target": k[1], **v} for k, v in summary.items()],
        }, indent=2))
    return 1 if any(t.error for t in chosen) or any(r.error for r in results) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        stop_all()
