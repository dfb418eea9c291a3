"""redis-py through rotaproxy while it rotates its upstream credential.

Usage: python3 redis_py_rotation.py HOST:PORT PROTOCOL(2|3) CONTROL_DIR
Env:   CLIENT_PASSWORD  password the client sends (the proxy authenticates it, never Redis).

Runs five workers at once, each on connections of its own, until CONTROL_DIR/stop exists:
  kv        SET/GET round trips and an INCR counter only it touches;
  pipeline  20 pipelined SETs, then an MGET that must read them all back;
  tx        WATCH + MULTI/INCR/GET/EXEC, which must never be aborted (nobody else writes);
  pubsub    a publisher numbering messages on a channel and a pattern, a subscriber that
            must see every number in order (a repeat of the last one is allowed: the proxy
            promises at-least-once delivery across a move);
  blocking  a producer numbering jobs, a BLPOP consumer that must get each exactly once.
Every ~200 ms it writes the count of verified operations to CONTROL_DIR/progress. Retries and
reconnects are off, and a connection opened twice is a failure, so a disconnect cannot hide.
Prints "PASS redis-py ... rotation: ..." and exits 0, or "FAIL redis-py ...: reason" and exits 1.
"""

import os
import signal
import sys
import threading
import time
import traceback
import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

LIB = "redis-py " + redis.__version__
DEADLINE_SECONDS = 240
DRAIN_SECONDS = 10.0


class StrictConnection(redis.Connection):
    """A connection that may open its socket once: a silent reconnect is a failure."""

    opened = 0
    lock = threading.Lock()

    def _connect(self):
        with StrictConnection.lock:
            StrictConnection.opened += 1
        if getattr(self, "_opened_once", False):
            raise RuntimeError("silent reconnect attempted on an existing connection")
        self._opened_once = True
        return super()._connect()


def client(host, port, protocol, password):
    pool = redis.ConnectionPool(
        connection_class=StrictConnection,
        host=host,
        port=port,
        password=password,
        protocol=protocol,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        socket_timeout=30,
        socket_connect_timeout=10,
        health_check_interval=0,
        decode_responses=True,
        # One connection per client: each worker's traffic stays on the session it started on.
        max_connections=1,
    )
    return redis.Redis(connection_pool=pool)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


class Run:
    """What the workers share: the stop signal, the first failure, and the counts."""

    def __init__(self, control_dir):
        self.control_dir = control_dir
        self.stopping = threading.Event()
        self.failure = None
        self.lock = threading.Lock()
        self.ops = 0
        self.messages = 0
        self.duplicates = 0
        self.jobs = 0

    def count(self, what="ops", n=1):
        with self.lock:
            self.ops += n
            if what != "ops":
                setattr(self, what, getattr(self, what) + n)

    def fail(self, worker, error):
        with self.lock:
            if self.failure is None:
                self.failure = f"{worker}: {type(error).__name__}: {error}"
                traceback.print_exception(error)
        self.stopping.set()

    def write_progress(self):
        tmp = os.path.join(self.control_dir, "progress.tmp")
        with open(tmp, "w") as f:
            f.write(str(self.ops))
        os.replace(tmp, os.path.join(self.control_dir, "progress"))

    def stop_requested(self):
        return os.path.exists(os.path.join(self.control_dir, "stop"))


def worker(run, name, body):
    def target():
        try:
            body()
        except Exception as e:  # reported as the run's failure
            run.fail(name, e)

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    return t


def kv(run, r, prefix):
    last = 0
    i = 0
    while not run.stopping.is_set():
        key = f"{prefix}:kv:{i % 100}"
        check(r.set(key, i) is True, f"SET {key}")
        got = r.get(key)
        check(got == str(i), f"GET {key}: {got!r}, wanted {i}")
        n = r.incr(f"{prefix}:counter")
        check(n == last + 1, f"INCR counter: {n}, wanted {last + 1}")
        last = n
        i += 1
        run.count()
        time.sleep(0.001)


def pipeline(run, r, prefix):
    keys = [f"{prefix}:pl:{j}" for j in range(20)]
    round_ = 0
    while not run.stopping.is_set():
        round_ += 1
        pipe = r.pipeline(transaction=False)
        for key in keys:
            pipe.set(key, round_)
        replies = pipe.execute()
        check(all(x is True for x in replies), f"pipelined SETs: {replies}")
        got = r.mget(keys)
        check(got == [str(round_)] * len(keys), f"MGET after round {round_}: {got}")
        run.count()
        time.sleep(0.002)


def transactions(run, r, prefix):
    key = f"{prefix}:tx"
    last = 0
    while not run.stopping.is_set():
        with r.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            pipe.multi()
            pipe.incr(key)
            pipe.get(key)
            try:
                got = pipe.execute()
            except redis.WatchError:
                raise AssertionError("EXEC aborted although nobody else writes the watched key")
        check(got == [last + 1, str(last + 1)], f"MULTI/EXEC: {got}, wanted {last + 1}")
        last += 1
        run.count()
        time.sleep(0.002)


class Published:
    """The last number the publisher sent on each channel."""

    def __init__(self):
        self.lock = threading.Lock()
        self.last = {}

    def set(self, channel, n):
        with self.lock:
            self.last[channel] = n

    def get(self):
        with self.lock:
            return dict(self.last)


def publisher(run, r, channels, published):
    n = 0
    while not run.stopping.is_set():
        n += 1
        channel = channels[n % 2]
        receivers = r.publish(channel, n)
        # During a move the proxy may briefly hold the subscription on two connections.
        check(receivers in (1, 2), f"PUBLISH {channel} {n} reached {receivers} subscribers")
        published.set(channel, n)
        time.sleep(0.005)


def subscriber(run, ps, channels, published, done):
    seen = {}

    def take(msg):
        if msg is None or msg["type"] not in ("message", "pmessage"):
            return
        channel = msg["channel"]
        check(channel in channels, f"message on an unexpected channel: {msg}")
        n = int(msg["data"])
        last = seen.get(channel)
        if last is not None and n <= last:
            # Delivered again by the subscription made on the new connection.
            run.count("duplicates")
            return
        # The publisher alternates channels: each channel's numbers step by 2.
        check(last is None or n == last + 2, f"{channel}: got {n} after {last}")
        seen[channel] = n
        run.count("messages")

    while not run.stopping.is_set():
        take(ps.get_message(timeout=0.1))
    # The publisher has stopped: everything it sent must arrive.
    deadline = time.monotonic() + DRAIN_SECONDS
    while True:
        want = published.get()
        if all(seen.get(c) == n for c, n in want.items()):
            break
        check(time.monotonic() < deadline, f"messages missing at the end: seen {seen}, sent {want}")
        take(ps.get_message(timeout=0.1))
    done.set()


def producer(run, r, key, produced):
    n = 0
    while not run.stopping.is_set():
        n += 1
        r.rpush(key, n)
        produced[0] = n
        time.sleep(0.01)


def consumer(run, r, key, produced, done):
    last = 0

    def take(reply):
        nonlocal last
        if reply is None:
            return
        n = int(reply[1])
        check(n == last + 1, f"BLPOP: job {n} after {last}")
        last = n
        run.count("jobs")

    while not run.stopping.is_set():
        take(r.blpop([key], timeout=2))
    deadline = time.monotonic() + DRAIN_SECONDS
    while last < produced[0]:
        check(time.monotonic() < deadline, f"jobs missing at the end: got {last}, pushed {produced[0]}")
        take(r.blpop([key], timeout=1))
    done.set()


def run_all(host, port, protocol, password, control_dir):
    run = Run(control_dir)
    prefix = f"rot:{uuid.uuid4().hex[:8]}"
    connect = lambda: client(host, port, protocol, password)  # noqa: E731
    clients = {name: connect() for name in ("kv", "pipeline", "tx", "pub", "sub", "push", "pop")}
    for c in clients.values():
        check(c.ping() is True, "PING")

    channels = [f"{prefix}:ch", f"{prefix}:pat:x"]
    ps = clients["sub"].pubsub(ignore_subscribe_messages=True)
    ps.subscribe(channels[0])
    ps.psubscribe(f"{prefix}:pat:*")
    # Both subscriptions are in place before the first PUBLISH.
    deadline = time.monotonic() + 10
    while clients["pub"].pubsub_numsub(channels[0])[0][1] < 1 or clients["pub"].pubsub_numpat() < 1:
        check(time.monotonic() < deadline, "subscriptions in place")
        ps.get_message(timeout=0.05)

    published = Published()
    produced = [0]
    sub_done = threading.Event()
    pop_done = threading.Event()
    jobs_key = f"{prefix}:jobs"
    threads = [
        worker(run, "kv", lambda: kv(run, clients["kv"], prefix)),
        worker(run, "pipeline", lambda: pipeline(run, clients["pipeline"], prefix)),
        worker(run, "tx", lambda: transactions(run, clients["tx"], prefix)),
        worker(run, "publisher", lambda: publisher(run, clients["pub"], channels, published)),
        worker(run, "subscriber", lambda: subscriber(run, ps, channels, published, sub_done)),
        worker(run, "producer", lambda: producer(run, clients["push"], jobs_key, produced)),
        worker(run, "consumer", lambda: consumer(run, clients["pop"], jobs_key, produced, pop_done)),
    ]
    while not run.stopping.is_set():
        run.write_progress()
        if run.stop_requested():
            run.stopping.set()
        time.sleep(0.1)
    for t in threads:
        t.join(timeout=DRAIN_SECONDS + 15)
        check(not t.is_alive(), f"worker {t.name} did not finish")
    if run.failure:
        raise AssertionError(run.failure)
    check(sub_done.is_set() and pop_done.is_set(), "drain at the end")
    run.write_progress()
    ps.close()
    for c in clients.values():
        c.close()
    return run


def main():
    if len(sys.argv) != 4:
        print("usage: redis_py_rotation.py HOST:PORT PROTOCOL CONTROL_DIR", file=sys.stderr)
        return 2
    host, _, port = sys.argv[1].rpartition(":")
    protocol = int(sys.argv[2])
    control_dir = sys.argv[3]
    password = os.environ.get("CLIENT_PASSWORD", "client-side-password")
    label = f"{LIB} resp{protocol}"

    def on_alarm(*_):
        print(f"FAIL {label}: overall deadline of {DEADLINE_SECONDS}s passed", flush=True)
        os._exit(1)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(DEADLINE_SECONDS)
    try:
        run = run_all(host.strip("[]"), int(port), protocol, password, control_dir)
    except Exception as e:
        traceback.print_exc()
        print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
        return 1
    print(
        f"PASS {label} rotation: ops={run.ops} messages={run.messages} "
        f"duplicates={run.duplicates} jobs={run.jobs} connections={StrictConnection.opened}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
