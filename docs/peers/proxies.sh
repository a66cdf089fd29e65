#!/bin/bash
# Proxies in front of the same app, side by side in one run: direct, nginx,
# HAProxy and baton, http and tcp, keep-alive clients and a new connection
# per request. For each: the proxy's CPU time (user + system, from
# /proc/PID/stat, every process of the proxy) divided by the requests it
# carried, throughput, p50 and p99 (baton bench, 32 clients).
#
#   docs/peers/proxies.sh                 the Gin app (examples/gin-hello/plain)
#   APP=python docs/peers/proxies.sh      Python's http.server, which writes a
#                                         response's head and body in two writes
#
# Three loads, a row each: GET (a 6-byte answer), GET 304 (a conditional GET
# answered 304 Not Modified: no body), POST (a 1 KiB body; the Gin app only).
#
# Settings: DUR (per target, default 4s), CLIENTS (32), ONLY (a regex on the
# labels), LOADS (default "get 304 post"), BATON_ARGS (extra flags for baton
# run), B_BEFORE (a second baton binary, measured in the same run, for a
# before/after comparison). One nginx worker and one HAProxy thread; baton
# with its default proxy threads (half the cores).
# Needs Debian's haproxy, nginx-light, libnginx-mod-stream, golang-go and
# the Gin sources (see .ci/run), and a release build (cargo build --release).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
DUR=${DUR:-4s}
CLIENTS=${CLIENTS:-32}
ONLY=${ONLY:-.}
APP_PORT=$(free_port)
PUB=$(free_port)

case ${APP:-gin} in
gin)
    "$root/examples/gin-hello/build.sh" "$work" >/dev/null
    app=("$work/gin-plain")
    ;;
python)
    cat >"$work/app.py" <<'PY'
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as behind a proxy's pool
    def do_GET(self):
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()          # the head: one write
        self.wfile.write(body)      # the body: a second write
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Hello).serve_forever()
PY
    app=(python3 "$work/app.py")
    ;;
*) echo "APP must be gin or python" >&2; exit 2 ;;
esac

wait_port() {
    for _ in $(seq 400); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done
    echo "nothing answers on port $1" >&2
    exit 1
}

PORT=$APP_PORT "${app[@]}" 2>/dev/null &
wait_port "$APP_PORT"

cat >"$work/haproxy-http.cfg" <<CFG
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
    bind 127.0.0.1:$PUB
    default_backend b
backend b
    server app 127.0.0.1:$APP_PORT
CFG
sed -e 's/mode http/mode tcp/' -e '/http-reuse/d' "$work/haproxy-http.cfg" >"$work/haproxy-tcp.cfg"
cat >"$work/nginx-http.conf" <<CFG
worker_processes 1;
pid $work/nginx.pid;
error_log /dev/null;
events { worker_connections 4096; }
http {
    access_log off;
    upstream app { server 127.0.0.1:$APP_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$PUB;
        location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CFG
cat >"$work/nginx-tcp.conf" <<CFG
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid $work/nginx.pid;
error_log /dev/null;
events { worker_connections 4096; }
stream { server { listen 127.0.0.1:$PUB; proxy_pass 127.0.0.1:$APP_PORT; } }
CFG

LOADS=${LOADS:-get 304 post}
[ "${APP:-gin}" = gin ] || LOADS=get
POST_BODY=$(head -c 1024 /dev/zero | tr '\0' x)
# label port pids... -> a table row per load (keep-alive, then new connections)
measure() {
    local label=$1 port=$2 load
    shift 2
    for load in $LOADS; do
        measure_load "$label" "$port" "$load" "$@"
    done
}
measure_load() {
    local label=$1 port=$2 load=$3 mode before after
    shift 3
    local cells=() args=()
    case $load in
    get) ;;
    304) args=(--header 'If-None-Match: "v1"') ;;
    post) args=(--body "$POST_BODY") ;;
    esac
    for mode in keep-alive new-conn; do
        local flag=()
        [ $mode = new-conn ] && flag=(--new-conn)
        before=$(ticks "$@")
        "$B" bench --url "http://127.0.0.1:$port/" -c "$CLIENTS" -d "$DUR" --json "${flag[@]}" "${args[@]}" >"$work/run.json"
        after=$(ticks "$@")
        cells+=("$(python3 - "$work/run.json" $((after - before)) "$HZ" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
ticks, hz = int(sys.argv[2]), int(sys.argv[3])
cpu = f"{ticks / hz * 1e6 / s['requests']:.1f} µs" if ticks else "—"
print(f"{cpu} | {s['throughput_rps']:.0f} | {s['steady']['p50_ms']:.2f} / {s['steady']['p99_ms']:.2f} ms | {s['failed']}")
PY
)")
    done
    echo "| $label | $load | ${cells[0]} | ${cells[1]} |"
}
# label start-command...: starts a proxy, measures it, stops it
proxy() {
    local label=$1
    shift
    [[ $label =~ $ONLY ]] || return 0
    "$@" 2>/dev/null &
    local pid=$!
    wait_port "$PUB"
    local pids=("$pid")
    # nginx: the master and its worker; baton: the guardian process (its
    # proxy threads), not the app it runs nor its keeper.
    if [ -f "$work/nginx.pid" ]; then pids=($(cat "$work/nginx.pid") $(pgrep -P "$(cat "$work/nginx.pid")")); fi
    measure "$label" "$PUB" "${pids[@]}"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$work/nginx.pid"
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PUB/" || break; sleep 0.05; done
}

echo "app: ${APP:-gin}; $CLIENTS clients, $DUR per cell; CPU per request of the proxy process"
echo
echo "| proxy | load | keep-alive: CPU/request | req/s | p50 / p99 | failed | new connection: CPU/request | req/s | p50 / p99 | failed |"
echo "|---|---|---|---|---|---|---|---|---|---|"
[[ direct =~ $ONLY ]] && measure "direct to the app" "$APP_PORT"
proxy "nginx, http (upstream keepalive 64)" nginx -c "$work/nginx-http.conf" -g "daemon off;"
proxy "HAProxy, mode http, http-reuse always" haproxy -f "$work/haproxy-http.cfg" -db
proxy "baton --proxy http" "$B" run --proxy http ${BATON_ARGS:-} --listen "127.0.0.1:$PUB" --control "$work/b.sock" -- "${app[@]}"
[ -n "${B_BEFORE:-}" ] && proxy "baton --proxy http (B_BEFORE)" "$B_BEFORE" run --proxy http ${BATON_ARGS:-} --listen "127.0.0.1:$PUB" --control "$work/b.sock" -- "${app[@]}"
proxy "nginx stream (tcp)" nginx -c "$work/nginx-tcp.conf" -g "daemon off;"
proxy "HAProxy, mode tcp" haproxy -f "$work/haproxy-tcp.cfg" -db
proxy "baton --proxy tcp" "$B" run --proxy tcp ${BATON_ARGS:-} --listen "127.0.0.1:$PUB" --control "$work/b.sock" -- "${app[@]}"
