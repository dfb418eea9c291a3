"""redis-py against rotaproxy: the calls an application makes, with retries and reconnects off.

Usage: python3 redis_py_client.py HOST:PORT|unix:PATH PROTOCOL(2|3)
Env:   CLIENT_PASSWORD  password the client sends (the proxy authenticates it, never Redis).
Prints "PASS redis-py ..." and exits 0, or prints "FAIL redis-py ...: reason" and exits 1.
"""

import os
import signal
import sys
import threading
import time
import traceback

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

LIB = "redis-py " + redis.__version__
DEADLINE_SECONDS = 90


class OpenedOnce:
    """A connection that may open its socket once: a silent reconnect is a failure."""

    opened = 0

    def _connect(self):
        OpenedOnce.opened += 1
        if getattr(self, "_opened_once", False):
            raise RuntimeError("silent reconnect attempted on an existing connection")
        self._opened_once = True
        return super()._connect()


class StrictConnection(OpenedOnce, redis.Connection):
    pass


class StrictUnixConnection(OpenedOnce, redis.UnixDomainSocketConnection):
    pass


def client(where, protocol, password, **extra):
    """`where`: ("tcp", host, port) or ("unix", path)."""
    if where[0] == "unix":
        address = dict(connection_class=StrictUnixConnection, path=where[1])
    else:
        address = dict(connection_class=StrictConnection, host=where[1], port=where[2])
    pool = redis.ConnectionPool(
        **address,
        password=password,
        protocol=protocol,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        socket_timeout=30,
        socket_connect_timeout=10,
        health_check_interval=0,
        decode_responses=True,
        **extra,
    )
    return redis.Redis(connection_pool=pool)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def wait_for(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    pause = 0.01
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
    raise AssertionError("timed out waiting for " + what)


def run(where, protocol, password):
    r = client(where, protocol, password)

    # Connect (HELLO/AUTH, CLIENT SETINFO, maintenance notifications handshake) and basics.
    check(r.ping() is True, "PING")
    # Keys of this script only (re-runnable against the same server).
    r.delete("greeting", "counter", "jobs", *[f"k{i}" for i in range(1000)])
    check(r.set("greeting", "hello") is True, "SET")
    check(r.get("greeting") == "hello", "GET")
    info = r.info("server")
    check("redis_version" in info, "INFO server has redis_version")

    # A pipeline of 1000 commands.
    pipe = r.pipeline(transaction=False)
    for i in range(1000):
        pipe.set(f"k{i}", i)
    replies = pipe.execute()
    check(len(replies) == 1000 and all(x is True for x in replies), "1000 pipelined SETs")
    check(r.mget("k0", "k500", "k999", "nope") == ["0", "500", "999", None], "MGET after pipeline")

    # MULTI/EXEC.
    tx = r.pipeline(transaction=True)
    tx.incr("counter").incr("counter").get("counter")
    got = tx.execute()
    check(got == [1, 2, "2"], f"MULTI/EXEC replies: {got}")

    # WATCH + MULTI/EXEC with the optimistic-locking helper.
    def bump(p):
        value = int(p.get("counter"))
        p.multi()
        p.set("counter", value + 10)

    r.transaction(bump, "counter")
    check(r.get("counter") == "12", "WATCH/MULTI/EXEC transaction")

    # Pub/sub: subscribe, publish from another connection, receive.
    sub = client(where, protocol, password)
    ps = sub.pubsub(ignore_subscribe_messages=False)
    ps.subscribe("news")
    first = ps.get_message(timeout=10)
    check(first is not None and first["type"] == "subscribe", f"subscribe confirmation: {first}")
    ps.psubscribe("alerts.*")
    first = ps.get_message(timeout=10)
    check(first is not None and first["type"] == "psubscribe", f"psubscribe confirmation: {first}")
    check(r.publish("news", "n1") == 1, "PUBLISH news reaches one subscriber")
    check(r.publish("alerts.disk", "a1") == 1, "PUBLISH alerts.disk reaches one subscriber")
    got = []
    wait_for(lambda: _collect(ps, got) and len(got) >= 2, "two pub/sub messages")
    check(("message", "news", "n1") in got, f"message on news: {got}")
    check(("pmessage", "alerts.disk", "a1") in got, f"pmessage on alerts.disk: {got}")
    ps.unsubscribe()
    ps.punsubscribe()
    ps.close()

    # BLPOP blocked on one connection, released by a push from another.
    blocker = client(where, protocol, password)
    result = {}

    def blpop():
        try:
            result["value"] = blocker.blpop(["jobs"], timeout=20)
        except Exception as e:  # reported below
            result["error"] = repr(e)

    t = threading.Thread(target=blpop, daemon=True)
    t.start()
    wait_for(lambda: _someone_blocked(r), "BLPOP to be blocked (CLIENT LIST cmd=blpop)")
    check(r.rpush("jobs", "job-1") == 1, "RPUSH")
    t.join(timeout=25)
    check(not t.is_alive(), "BLPOP returned")
    check("error" not in result, f"BLPOP error: {result.get('error')}")
    check(list(result.get("value") or []) == ["jobs", "job-1"], f"BLPOP reply: {result.get('value')}")

    # SELECT 2 (the client sends it at connect), then reads see only db 2.
    db2 = client(where, protocol, password, db=2)
    db2.delete("only-in-2")
    check(db2.set("only-in-2", "x") is True, "SET in db 2")
    check(db2.get("only-in-2") == "x", "GET in db 2")
    check(r.get("only-in-2") is None, "db 0 does not see db 2's key")
    check(db2.get("greeting") is None, "db 2 does not see db 0's key")

    # Everything above used each connection without reconnecting.
    check(r.ping() and db2.ping() and blocker.ping(), "final PINGs")
    for c in (r, sub, blocker, db2):
        c.close()
    return OpenedOnce.opened


def _collect(ps, got):
    msg = ps.get_message(timeout=0.05)
    if msg is not None and msg["type"] in ("message", "pmessage"):
        got.append((msg["type"], msg["channel"], msg["data"]))
    return True


def _someone_blocked(r):
    clients = r.client_list()
    return any(c.get("cmd") == "blpop" for c in clients)


def main():
    if len(sys.argv) != 3:
        print("usage: redis_py_client.py HOST:PORT|unix:PATH PROTOCOL", file=sys.stderr)
        return 2
    if sys.argv[1].startswith("unix:"):
        where = ("unix", sys.argv[1][len("unix:"):])
    else:
        host, _, port = sys.argv[1].rpartition(":")
        where = ("tcp", host.strip("[]"), int(port))
    protocol = int(sys.argv[2])
    password = os.environ.get("CLIENT_PASSWORD", "client-side-password")

    def on_alarm(*_):
        print(f"FAIL {LIB} resp{protocol}: overall deadline of {DEADLINE_SECONDS}s passed", flush=True)
        os._exit(1)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(DEADLINE_SECONDS)
    try:
        opened = run(where, protocol, password)
    except Exception as e:
        traceback.print_exc()
        print(f"FAIL {LIB} resp{protocol}: {type(e).__name__}: {e}", flush=True)
        return 1
    print(f"PASS {LIB} resp{protocol} ({opened} connections, no reconnect)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
