#!/bin/bash
# Proxies in front of the same Gin app (examples/gin-hello/plain, r.Run()),
# one run: throughput through each as a fraction of the app's direct
# throughput, keep-alive and new connection per request (baton bench, 32
# clients, 10 s each). Needs Debian's haproxy, nginx-light,
# libnginx-mod-stream, golang-go and the Gin sources, and a release build.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
B=$root/target/release/baton
work=$(mktemp -d)
cleanup() { pkill -P $$ 2>/dev/null || true; [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$root/examples/gin-hello/build.sh" "$work" >/dev/null
APP=20401; PUB=20402
DUR=${DUR:-10s}
PORT=$APP "$work/gin-plain" 2>/dev/null &
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$APP/" && break; sleep 0.05; done

rps() { # port [--new-conn]
    "$B" bench --url "http://127.0.0.1:$1/" -c 32 -d "$DUR" --json ${2:-} |
        python3 -c "import json,sys; s=json.load(sys.stdin)['summary']; print(f\"{s['throughput_rps']:.0f} {s['failed']} {s['steady']['p99_ms']:.2f}\")"
}
wait_port() { for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return; sleep 0.05; done; }

cat > "$work/haproxy-http.cfg" <<CFG
global
    maxconn 4000
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
    server app 127.0.0.1:$APP
CFG
sed -e 's/mode http/mode tcp/' -e '/http-reuse/d' "$work/haproxy-http.cfg" > "$work/haproxy-tcp.cfg"
cat > "$work/nginx-http.conf" <<CFG
worker_processes auto;
pid $work/nginx.pid;
error_log /dev/null;
events { worker_connections 4096; }
http {
    access_log off;
    upstream app { server 127.0.0.1:$APP; keepalive 64; }
    server {
        listen 127.0.0.1:$PUB;
        location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CFG
cat > "$work/nginx-tcp.conf" <<CFG
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
pid $work/nginx.pid;
error_log /dev/null;
events { worker_connections 4096; }
stream { server { listen 127.0.0.1:$PUB; proxy_pass 127.0.0.1:$APP; } }
CFG

declare -A direct
for mode in keep-alive new-conn; do
    flag=""; [ $mode = new-conn ] && flag=--new-conn
    direct[$mode]=$(rps $APP $flag)
done
echo "| proxy | keep-alive (× direct) | new connection (× direct) |"
echo "|---|---|---|"
dp() { set -- $1; echo "$1 req/s, p99 $3 ms"; }
echo "| direct to the app | $(dp "${direct[keep-alive]}") | $(dp "${direct[new-conn]}") |"
run() { # label start-command
    local label=$1; shift
    "$@" & local pid=$!
    wait_port $PUB
    local ka nc
    ka=$(rps $PUB); nc=$(rps $PUB --new-conn)
    kill $pid 2>/dev/null || true; [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    wait $pid 2>/dev/null || true; rm -f "$work/nginx.pid"; sleep 0.5
    python3 - "$label" "$ka" "$nc" "${direct[keep-alive]}" "${direct[new-conn]}" <<'PY'
import sys
label, ka, nc, dka, dnc = sys.argv[1:]
f = lambda s: [float(x) for x in s.split()]
(k, kf, kp), (n, nf, np_), (d1, _, _), (d2, _, _) = f(ka), f(nc), f(dka), f(dnc)
print(f"| {label} | {k/d1:.2f}× ({k:.0f}, {kf:.0f} failed, p99 {kp:.2f} ms) | {n/d2:.2f}× ({n:.0f}, {nf:.0f} failed, p99 {np_:.2f} ms) |")
PY
}
[ -n "${ONLY_BATON:-}" ] || run "HAProxy, mode http, http-reuse always" haproxy -f "$work/haproxy-http.cfg" -db
[ -n "${ONLY_BATON:-}" ] || run "HAProxy, mode tcp" haproxy -f "$work/haproxy-tcp.cfg" -db
[ -n "${ONLY_BATON:-}" ] || run "nginx reverse proxy (http)" nginx -c "$work/nginx-http.conf" -g "daemon off;"
[ -n "${ONLY_BATON:-}" ] || run "nginx stream (tcp)" nginx -c "$work/nginx-tcp.conf" -g "daemon off;"
# baton proxies to its own generation of the same app (PORT given by baton).
run "baton --proxy http" "$B" run --proxy http ${BATON_ARGS:-} --listen "127.0.0.1:$PUB" --control "$work/b.sock" -- "$work/gin-plain"
run "baton --proxy tcp" "$B" run --proxy tcp ${BATON_ARGS:-} --listen "127.0.0.1:$PUB" --control "$work/b.sock" -- "$work/gin-plain"
