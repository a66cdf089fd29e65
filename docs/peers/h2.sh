#!/bin/bash
# HTTP/2 proxies side by side in one run: nginx, HAProxy and baton, each
# taking cleartext HTTP/2 (h2c by prior knowledge) from h2load, in front of
#   - the Gin app over HTTP/1.1 (examples/gin-hello/plain): GET /;
#   - the gRPC example over h2c (examples/grpc-go): the health service's
#     unary Check, as h2load sends it (a POST with a 5-byte gRPC message).
# For each: the proxy's CPU time (user + system, from /proc/PID/stat, every
# process of the proxy) divided by the requests it carried, throughput and
# what h2load counted as failed (for gRPC, h2load sees only HTTP status).
#
# Settings: DUR (seconds per cell, default 4), CONNS (h2load -c, default 8),
# STREAMS (h2load -m, default 10), ONLY (a regex on the labels).
# One nginx worker and one HAProxy thread; baton with its default proxy
# threads (half the cores). Needs Debian's nginx-light, haproxy,
# nghttp2-client, golang-go with the Gin, go-systemd and grpc sources (see
# .ci/run), and a release build (cargo build --release).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
DUR=${DUR:-4}
CONNS=${CONNS:-8}
STREAMS=${STREAMS:-10}
ONLY=${ONLY:-.}
HTTP_APP=$(free_port)
GRPC_APP=$(free_port)
PUB=$(free_port)

"$root/examples/gin-hello/build.sh" "$work" >/dev/null
"$root/examples/grpc-go/build.sh" "$work" >/dev/null
PORT=$HTTP_APP "$work/gin-plain" 2>/dev/null &
PORT=$GRPC_APP "$work/grpc-hello" 2>/dev/null &
# The health service's Check with an empty request: a gRPC message of 0
# bytes (flag 0, length 0).
printf '\0\0\0\0\0' >"$work/check.bin"

wait_port() {
    for _ in $(seq 400); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on port $1" >&2
    exit 1
}
wait_port "$HTTP_APP"
wait_port "$GRPC_APP"


# kind (http|grpc), app port -> the configs
configs() {
    local kind=$1 app=$2
    local h2_server="" nginx_pass="proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";"
    if [ "$kind" = grpc ]; then
        h2_server=" proto h2"
        nginx_pass="grpc_pass grpc://app;"
    fi
    cat >"$work/haproxy.cfg" <<CFG
global
    maxconn 4000
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend f
    bind 127.0.0.1:$PUB proto h2
    default_backend b
backend b
    server app 127.0.0.1:$app$h2_server
CFG
    cat >"$work/nginx.conf" <<CFG
worker_processes 1;
pid $work/nginx.pid;
error_log /dev/null;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream app { server 127.0.0.1:$app; keepalive 64; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$PUB http2;
        location / { $nginx_pass }
    }
}
CFG
}

# label kind pids... -> a table row
measure() {
    local label=$1 kind=$2 before after
    shift 2
    local args=(-c "$CONNS" -m "$STREAMS" -D "$DUR" "http://127.0.0.1:$PUB/")
    if [ "$kind" = grpc ]; then
        args=(-c "$CONNS" -m "$STREAMS" -D "$DUR" -d "$work/check.bin"
            -H 'content-type: application/grpc' -H 'te: trailers'
            "http://127.0.0.1:$PUB/grpc.health.v1.Health/Check")
    fi
    before=$(ticks "$@")
    h2load "${args[@]}" >"$work/h2load.out" 2>&1
    after=$(ticks "$@")
    python3 - "$work/h2load.out" $((after - before)) "$HZ" "$label" "$kind" <<'PY'
import re, sys
out = open(sys.argv[1]).read()
ticks, hz, label, kind = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
rps = re.search(r"finished in [^,]+, ([\d.]+) req/s", out)
if not m:
    print(f"| {label} | {kind} | h2load failed: {out.strip().splitlines()[-1]} | | |")
    sys.exit()
done, ok = int(m.group(2)), int(m.group(3))
cpu = f"{ticks / hz * 1e6 / done:.1f} µs" if ticks and done else "—"
print(f"| {label} | {kind} | {cpu} | {float(rps.group(1)):.0f} | {done - ok} of {done} |")
PY
}
# label kind start-command...: starts a proxy, measures it, stops it
proxy() {
    local label=$1 kind=$2
    shift 2
    [[ "$label $kind" =~ $ONLY ]] || return 0
    "$@" 2>/dev/null &
    local pid=$!
    wait_port "$PUB"
    sleep 0.5
    local pids=("$pid")
    # nginx: the master and its worker; baton: the guardian process (its
    # proxy threads), not the app it runs nor its keeper.
    if [ -f "$work/nginx.pid" ]; then pids=($(cat "$work/nginx.pid") $(pgrep -P "$(cat "$work/nginx.pid")")); fi
    measure "$label" "$kind" "${pids[@]}"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$work/nginx.pid"
    for _ in $(seq 100); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1)" "$PUB" 2>/dev/null || break
        sleep 0.05
    done
}

echo "h2load -c $CONNS -m $STREAMS, ${DUR}s per cell; CPU per request of the proxy process"
echo
echo "| proxy | load | CPU/request | req/s | failed |"
echo "|---|---|---|---|---|"
for kind in http grpc; do
    app=$HTTP_APP
    baton_args=()
    if [ "$kind" = grpc ]; then
        app=$GRPC_APP
        baton_args=(--upstream-protocol h2c)
    fi
    configs "$kind" "$app"
    proxy "nginx (http2, one worker)" "$kind" nginx -c "$work/nginx.conf" -g "daemon off;"
    proxy "HAProxy (proto h2, one thread)" "$kind" haproxy -f "$work/haproxy.cfg" -db
    # baton runs its own copy of the app behind it, on a private port.
    if [ "$kind" = grpc ]; then cmd=("$work/grpc-hello"); else cmd=("$work/gin-plain"); fi
    proxy "baton --proxy http" "$kind" "$B" run --proxy http "${baton_args[@]}" \
        --listen "127.0.0.1:$PUB" --control "$work/b.sock" -- "${cmd[@]}"
done
