#!/bin/bash
# baton's own resources, one run: memory per idle proxy connection (silent
# clients, then keep-alive clients after one request), memory once they
# left, and memory, descriptors and threads over many reloads.
#
#   docs/peers/endurance.sh                 # the release build of this tree
#   BATON=/path/to/other/baton docs/peers/endurance.sh   # another build
#
# Needs python3 and a hard descriptor limit above N plus a thousand.
# N (default 10000) clients, RELOADS (default 1000) reloads.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
B=${BATON:-$root/target/release/baton}
N=${N:-10000}
RELOADS=${RELOADS:-1000}
work=$(mktemp -d)
cleanup() { pkill -P $$ 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
show_log() { cat "$work"/*.log >&2; }
ulimit -n "$(ulimit -Hn)"

kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
mem() { echo "VmRSS $(kb "$1" VmRSS) kB, RssAnon $(kb "$1" RssAnon) kB"; }
wait_ready() { for _ in $(seq 400); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return; sleep 0.05; done; echo "not ready" >&2; show_log; exit 1; }

# Opens N connections; with "request", sends one request on each and reads
# the answer (the connection stays open, keep-alive). Prints "open" and holds
# them until stdin closes.
cat > "$work/clients.py" <<'PY'
import socket, sys
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if mode == "request":
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    socks.append(s)
if mode == "request":
    for s in socks:
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(4096)
print("open", flush=True)
sys.stdin.read()
PY
guard() { # key default: the proxy's connection counter, or default (a baton without it)
    "$B" status --control "$work/proxy.sock" --json | python3 -c "import json,sys
g=json.load(sys.stdin).get('guard')
print([c['$1'] for c in g['connections'] if c['socket']=='proxy'][0] if g else $2)"
}
hold() { # port n mode: opens, measures, closes
    coproc CLIENTS { python3 "$work/clients.py" "$1" "$2" "$3"; }
    read -r _ <&"${CLIENTS[0]}"
    sleep 1
    local now open
    now=$(kb "$pid" VmRSS)
    open=$(guard open "$2")
    echo "  $2 $3 clients, $open of them open in baton: $(mem "$pid")"
    echo "    -> $(( (now - idle_rss) * 1024 / open )) bytes of RSS per open connection"
    eval "exec ${CLIENTS[1]}>&-"
    wait "$CLIENTS_PID" 2>/dev/null || true
}

PUB=20451
"$B" run --control "$work/proxy.sock" --proxy http --listen 127.0.0.1:$PUB \
    -- "$B" demo-app --listen '127.0.0.1:{port}' 2>"$work/proxy.log" &
pid=$!
wait_ready $PUB
sleep 1
idle_rss=$(kb "$pid" VmRSS)
echo "proxy mode, baton pid $pid"
echo "  idle: $(mem "$pid")"
hold $PUB "$N" silent
sleep 2
echo "  after the silent clients left: $(mem "$pid")"
idle_rss=$(kb "$pid" VmRSS)
# Keep-alive clients stay open (60 s idle timeout): as many as the cap
# admits, so that none waits in the kernel's queue for a slot.
cap=$(guard max "$N")
hold $PUB "$(( N < cap ? N : cap ))" request
# Pooled connections to the app close after 15 s unused.
sleep 20
echo "  20 s after the keep-alive clients left: $(mem "$pid"), $(ls /proc/$pid/fd | wc -l) fds"
kill "$pid"; wait "$pid" 2>/dev/null || true

[ "$RELOADS" -gt 0 ] || exit 0
SOCK=20452
"$B" run --control "$work/socket.sock" --listen 127.0.0.1:$SOCK -- "$B" demo-app 2>"$work/socket.log" &
pid=$!
wait_ready $SOCK
echo "socket mode, baton pid $pid, $RELOADS reloads"
"$B" reload --control "$work/socket.sock" >/dev/null
echo "  after 1 reload: $(mem "$pid"), $(ls /proc/$pid/fd | wc -l) fds, $(kb "$pid" Threads) threads"
start=$(date +%s.%N)
for i in $(seq 2 "$RELOADS"); do
    "$B" reload --control "$work/socket.sock" >/dev/null
    if [ "$i" = 300 ]; then
        echo "  after 300 reloads: $(mem "$pid"), $(ls /proc/$pid/fd | wc -l) fds, $(kb "$pid" Threads) threads"
    fi
done
end=$(date +%s.%N)
sleep 1
echo "  after $RELOADS reloads: $(mem "$pid"), $(ls /proc/$pid/fd | wc -l) fds, $(kb "$pid" Threads) threads, zombies: $(ps -o stat= --ppid "$pid" | grep -c Z || true)"
echo "  $(echo "($end - $start) / ($RELOADS - 1) * 1000" | bc -l | cut -c1-5) ms per reload"
