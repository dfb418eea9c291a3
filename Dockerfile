# syntax=docker/dockerfile:1
#
# rotaproxy container image.
#
#   docker build -t rotaproxy .
#   docker build --build-arg PGO=1 -t rotaproxy .   # profile-guided build (scripts/build-pgo):
#                                                   # 4-8% less CPU per request, ~30 min more
#   docker run --rm \
#     -v "$PWD/rotaproxy.toml:/etc/rotaproxy/rotaproxy.toml:ro" \
#     -v "$PWD/secrets:/run/secrets:ro" \
#     -e ROTAPROXY_ADMIN_TOKEN \
#     -p 6380:6380 -p 9180:9180 rotaproxy
#
# Configuration: mount the TOML file at /etc/rotaproxy/rotaproxy.toml (or pass another path:
# `docker run ... rotaproxy run --config /path`). Secrets are never in the image nor in the
# config: the config refers to them as `env:NAME` (pass with -e / a Kubernetes Secret as env) or
# `file:/run/secrets/...` (a mounted Secret / Docker secret; read-only is enough).
# As a sidecar in a pod, keep the default loopback binds (the pod shares loopback); to publish
# the ports with `docker run -p`, bind 0.0.0.0 in [listener] and [admin] and set client auth.
# Probes: GET /healthz (liveness) and /readyz (readiness) on the admin port; with the admin
# listener on loopback, exec probes: `rotaproxy probe live` and `rotaproxy probe ready` (they
# read admin.bind from /etc/rotaproxy/rotaproxy.toml). See "Kubernetes" in the README.

FROM rust:1.95-bookworm AS builder
ARG PGO=0
WORKDIR /src
# The whole context (see .dockerignore), so every target the manifest declares is present.
COPY . .
# PGO=1 trains the build against a Redis started inside this stage (redis-server, redis-tools,
# openssl and python3 from Debian, llvm-tools from rustup; none of them reach the final image).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ "$PGO" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends redis-server redis-tools openssl python3 \
      && scripts/build-pgo \
      && install -m 0755 target/pgo/release/rotaproxy /usr/local/bin/rotaproxy; \
    else \
      cargo build --release --locked \
      && install -m 0755 target/release/rotaproxy /usr/local/bin/rotaproxy; \
    fi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 rotaproxy \
 && useradd --uid 10001 --gid rotaproxy --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin rotaproxy \
 && mkdir -p /etc/rotaproxy
COPY --from=builder /usr/local/bin/rotaproxy /usr/local/bin/rotaproxy
USER 10001:10001
# 9187: admin.metrics_bind, when set (metrics and health only).
EXPOSE 6380 9180 9187
ENTRYPOINT ["rotaproxy"]
CMD ["run", "--config", "/etc/rotaproxy/rotaproxy.toml"]
