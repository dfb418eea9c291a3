#!/usr/bin/env python3
"""Throughput and p99 through rotaproxy while it rotates its credential every few seconds,
against the same run without rotations, and the number of client errors (must be 0).

    benches/rotation.py                 # default: 3 strategies, ~2 minutes
    benches/rotation.py --quick         # smoke run
    benches/rotation.py --every 1       # rotate every second

Redis runs on CPU 0, the proxy and redis-benchmark share CPU 1 (as in benches/compare.py).
Everything is on loopback; every process started here is stopped by its PID.
"""

import argparse
import csv
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = secrets.token_hex(16)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def http(port, path, method="GET", token=None, timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(port, name):
    _, body = http(port, "/metrics")
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Procs:
    """Processes started here, stopped by PID."""

    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def bench(port, requests, clients, pipeline):
    out = subprocess.run(
        ["taskset", "-c", "1", "redis-benchmark", "-h", "127.0.0.1", "-p", str(port),
         "-t", "set,get", "-n", str(requests), "-c", str(clients), "-P", str(pipeline),
         "-r", "100000", "--csv"],
        capture_output=True, text=True, timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"redis-benchmark failed: {out.stderr[-500:]}")
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    rps = sum(float(r["rps"]) for r in rows) / len(rows)
    p99 = max(float(r["p99_latency_ms"]) for r in rows)
    return rps, p99, out.stderr


def run_case(strategy, args, procs, tmp):
    redis_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    users = {"app": secrets.token_hex(16), "app-b": secrets.token_hex(16)}
    acl = os.path.join(tmp, f"{strategy}.acl")
    admin_pw = secrets.token_hex(16)
    with open(acl, "w") as f:
        f.write(f"user default on >{admin_pw} ~* &* +@all\n")
        for u, pw in users.items():
            f.write(f"user {u} on >{pw} ~* &* +@all\n")
    redis = procs.start(
        ["taskset", "-c", "0", "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--aclfile", acl, "--dir", tmp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(redis_port)
    pw_file = os.path.join(tmp, f"{strategy}.pw")
    with open(pw_file, "w") as f:
        f.write(users["app"])
    os.chmod(pw_file, 0o600)
    extra = 'users = ["app", "app-b"]\n' if strategy == "alternating-users" else ""
    config = os.path.join(tmp, f"{strategy}.toml")
    with open(config, "w") as f:
        f.write(f"""
[listener]
bind = "127.0.0.1:{proxy_port}"
[upstream]
url = "redis://127.0.0.1:{redis_port}"
[credentials]
username = "app"
password = "file:{pw_file}"
[pool]
warm = 60
[admin]
bind = "127.0.0.1:{admin_port}"
token = "env:BENCH_ADMIN_TOKEN"
[rotation]
strategy = "{strategy}"
state_dir = "{tmp}/state-{strategy}"
drain_deadline = "5s"
{extra}
[log]
level = "warn"
""")
    env = dict(os.environ, BENCH_ADMIN_TOKEN=TOKEN)
    log = open(os.path.join(tmp, f"{strategy}.log"), "w")
    proxy = procs.start(["taskset", "-c", "1", os.path.join(ROOT, "target/release/rotaproxy"),
                         "run", "--config", config], env=env, stdout=log, stderr=log)
    wait_port(proxy_port)
    bench(proxy_port, 20000, args.clients, 1)  # warm-up

    results = {}
    for mode in ("steady", "rotating"):
        errors_before = metric(admin_port, "rotaproxy_client_errors_total")
        gen_before = json.loads(http(admin_port, "/v1/status")[1])["generation"]
        stop = threading.Event()
        failures = []

        def rotate_loop():
            while not stop.wait(args.every):
                code, body = http(admin_port, "/v1/rotate?wait=true", "POST", TOKEN)
                if code != 200:
                    failures.append(body)

        rotator = threading.Thread(target=rotate_loop, daemon=True)
        if mode == "rotating":
            rotator.start()
        rps, p99, _ = bench(proxy_port, args.requests, args.clients, args.pipeline)
        stop.set()
        if mode == "rotating":
            rotator.join(timeout=60)
        gen_after = json.loads(http(admin_port, "/v1/status")[1])["generation"]
        errors = metric(admin_port, "rotaproxy_client_errors_total") - errors_before
        results[mode] = dict(rps=rps, p99=p99, rotations=gen_after - gen_before,
                             client_errors=int(errors), failed_rotations=len(failures))
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(timeout=20)
    redis.send_signal(signal.SIGTERM)
    redis.wait(timeout=20)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between rotations")
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--strategies", default="acl-multi-password,alternating-users")
    args = ap.parse_args()
    if args.quick:
        args.requests = 200_000
    for tool in ("redis-server", "redis-benchmark", "taskset", "cargo"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is required (scripts/test installs redis)")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    procs = Procs()
    tmp = tempfile.mkdtemp(prefix="rotaproxy-rotbench-")
    try:
        print(f"redis-benchmark -t set,get -n {args.requests} -c {args.clients} "
              f"-P {args.pipeline}; rotation every {args.every}s while 'rotating'")
        print(f"{'strategy':22} {'mode':9} {'rps':>10} {'p99 ms':>8} {'rotations':>9} "
              f"{'client errors':>13}")
        for strategy in args.strategies.split(","):
            res = run_case(strategy, args, procs, tmp)
            for mode, r in res.items():
                print(f"{strategy:22} {mode:9} {r['rps']:10.0f} {r['p99']:8.3f} "
                      f"{r['rotations']:9d} {r['client_errors']:13d}")
            ratio = res["rotating"]["rps"] / res["steady"]["rps"]
            print(f"{'':22} rotating/steady throughput: {ratio:.3f}")
            if res["rotating"]["client_errors"] or res["rotating"]["failed_rotations"]:
                print("  CLIENT ERRORS OR FAILED ROTATIONS — see the logs in", tmp)
                sys.exit(1)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
