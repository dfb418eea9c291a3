#!/usr/bin/env bash
# Instructions per request of rotaproxy and of the copy_bidirectional floor, counted by
# valgrind's callgrind: repeatable to a fraction of a percent whatever else the machine does,
# unlike CPU time on a shared VM. See benches/README.md ("Counting instructions").
#
#   benches/callgrind.sh [--tls] [set|get] [pipeline] [requests]   # default: set 16 1000000
#
# With --tls both reach Redis over TLS (a CA and a server certificate made for the run).
# Needs valgrind, redis-server, redis-benchmark, redis-cli and release builds of rotaproxy and
# examples/floor_forwarder (cargo build --release --bin rotaproxy --example floor_forwarder).
# ROTAPROXY_BIN=/path/to/rotaproxy counts another build of rotaproxy instead.
# Each target runs twice, with the given request count and with 1/10 of it, so the start-up
# cost (the warm pool, metrics set-up, valgrind itself) cancels out of the per-request figure.
# Start-up is not quite constant (the metrics clock calibrates for a set time, so its count
# depends on the machine's speed: a few million instructions either way), hence the default
# of a million requests. Output files stay in the printed work dir (callgrind_annotate them for detail).
set -euo pipefail

tls=false
if [[ "${1:-}" == --tls ]]; then
  tls=true
  shift
fi
test_name="${1:-set}"
pipeline="${2:-16}"
requests="${3:-1000000}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
proxy_bin="${ROTAPROXY_BIN:-$root/target/release/rotaproxy}"  # another build, for an A/B
floor_bin="$root/target/release/examples/floor_forwarder"
for need in valgrind openssl redis-server redis-cli redis-benchmark python3; do
  command -v "$need" >/dev/null || { echo "callgrind.sh: $need is required" >&2; exit 2; }
done
for bin in "$proxy_bin" "$floor_bin"; do
  [[ -x "$bin" ]] || { echo "callgrind.sh: build $bin first (see the header)" >&2; exit 2; }
done

work="$(mktemp -d /tmp/rotaproxy-callgrind.XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_ping() { # port [auth...]
  local port="$1"; shift
  for _ in $(seq 1 300); do
    [[ "$(redis-cli -p "$port" "$@" ping 2>/dev/null)" == PONG ]] && return 0
    sleep 0.1
  done
  echo "callgrind.sh: nothing answers on port $port (see $work)" >&2
  exit 1
}

# A CA and a certificate for localhost, for --tls.
make_certs() {
  local ossl=(openssl)
  "${ossl[@]}" ecparam -name prime256v1 -genkey -noout -out "$work/ca.key" 2>/dev/null
  "${ossl[@]}" req -x509 -new -key "$work/ca.key" -sha256 -days 2 -subj "/CN=callgrind CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign \
    -out "$work/ca.pem" 2>/dev/null
  "${ossl[@]}" ecparam -name prime256v1 -genkey -noout -out "$work/server.key" 2>/dev/null
  "${ossl[@]}" req -new -key "$work/server.key" -subj /CN=localhost -out "$work/server.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n' \
    >"$work/server.ext"
  "${ossl[@]}" x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 2 -sha256 -extfile "$work/server.ext" -out "$work/server.pem" 2>/dev/null
  chmod 600 "$work/server.key"
}

redis_port="$(free_port)"
redis_tls_args=()
upstream_port="$redis_port"
if $tls; then
  make_certs
  upstream_port="$(free_port)"
  redis_tls_args=(--tls-port "$upstream_port" --tls-cert-file "$work/server.pem"
    --tls-key-file "$work/server.key" --tls-ca-cert-file "$work/ca.pem" --tls-auth-clients no)
fi
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
  "${redis_tls_args[@]}" >"$work/redis.log" 2>&1 &
pids+=($!)
wait_ping "$redis_port"
password="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
redis-cli -p "$redis_port" ACL SETUSER bench on ">$password" '~*' '&*' '+@all' >/dev/null
redis-cli -p "$redis_port" SET key:__rand_int__ xxx >/dev/null

# Prints the instructions counted for one target and request count.
count() { # target requests
  local target="$1" n="$2" port out pid
  port="$(free_port)"
  out="$work/callgrind.$target.$n.out"
  local auth=()
  if [[ "$target" == rotaproxy ]]; then
    local upstream_toml="url = \"redis://127.0.0.1:$redis_port\""
    if $tls; then
      upstream_toml="url = \"rediss://127.0.0.1:$upstream_port\"
ca_file = \"$work/ca.pem\"
server_name = \"localhost\""
    fi
    cat >"$work/rotaproxy.toml" <<EOF
[listener]
bind = "127.0.0.1:$port"
[upstream]
$upstream_toml
[credentials]
username = "bench"
password = "env:CALLGRIND_BENCH_PASSWORD"
[pool]
warm = 60
[admin]
bind = "127.0.0.1:0"
[runtime]
worker_threads = 1
[log]
level = "warn"
EOF
    CALLGRIND_BENCH_PASSWORD="$password" valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$proxy_bin" run --config "$work/rotaproxy.toml" >"$work/$target.$n.log" 2>&1 &
  else
    auth=(--user bench --pass "$password")
    local floor_tls=()
    $tls && floor_tls=(--tls "$work/ca.pem" localhost)
    valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$floor_bin" "127.0.0.1:$port" "127.0.0.1:$upstream_port" "${floor_tls[@]}" \
      >"$work/$target.$n.log" 2>&1 &
  fi
  pid=$!
  pids+=("$pid")
  wait_ping "$port" "${auth[@]}"
  local bench_auth=()
  [[ "$target" == floor ]] && bench_auth=(--user bench -a "$password")
  redis-benchmark -p "$port" "${bench_auth[@]}" -c 50 -P "$pipeline" -n "$n" -t "$test_name" -q \
    >"$work/$target.$n.bench" 2>&1
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  grep -a '^==[0-9]*== Collected' "$work/$target.$n.log" | awk '{gsub(",", "", $4); print $4}'
}

echo "work dir: $work"
echo "$test_name -c 50 -P $pipeline$($tls && echo ' TLS'), $requests requests (instructions per request, start-up removed)"
for target in floor rotaproxy; do
  small=$((requests / 10))
  full_count="$(count "$target" "$requests")"
  small_count="$(count "$target" "$small")"
  python3 -c "print(f'{\"$target\":10s} {($full_count - $small_count) / ($requests - $small):8.0f}')"
done
