#!/bin/bash
# gRPC through reloads, in baton's three modes, in one run: the gRPC
# example (examples/grpc-go) under baton, 8 unary clients each on its own
# long-lived HTTP/2 connection plus 4 open server streams (grpc-load), and
# 3 reloads 2 s apart. For each mode: calls made and failed, streams, and
# how many server processes each client met (4 = every generation), and
# the slowest client's delay from a reload's answer to its first call to
# the new generation.
#
# Settings: GAP (seconds between reloads, default 2). Needs Debian's
# golang-go with the go-systemd and grpc sources (see .ci/run), and a
# release build (cargo build --release).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
GAP=${GAP:-2}
"$root/examples/grpc-go/build.sh" "$work" >/dev/null

echo "8 unary clients + 4 streams, 3 reloads ${GAP}s apart"
echo
echo "| mode | calls | failed | streams opened / ended (UNAVAILABLE) / failed | processes met per client | to the new generation (slowest client) |"
echo "|---|---|---|---|---|---|"
run_mode() {
    local label=$1
    shift
    local port
    port=$(free_port)
    "$B" run --listen "127.0.0.1:$port" --control "$work/b.sock" "$@" -- "$work/grpc-hello" 2>"$work/baton.log" &
    local pid=$!
    "$work/grpc-load" -addr "127.0.0.1:$port" -duration $((4 * GAP + 2))s -seen "$work/seen.log" >"$work/load.json" &
    local load=$!
    sleep "$GAP"
    : >"$work/reloads"
    for _ in 1 2 3; do
        "$B" reload --control "$work/b.sock" >/dev/null
        date +%s%3N >>"$work/reloads"
        sleep "$GAP"
    done
    wait "$load"
    "$B" stop --control "$work/b.sock" >/dev/null
    wait "$pid" || true
    python3 - "$work/load.json" "$work/seen.log" "$work/reloads" "$label" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
seen = [l.split() for l in open(sys.argv[2])]
reloads = [int(l) for l in open(sys.argv[3])]
met = sorted({len(c["pids"]) for c in r["clients"]})
# First time each (client, pid) was met, in order of pids' first sight.
first = {}
for client, pid, ms in seen:
    first.setdefault(pid, {})[client] = int(ms)
order = sorted(first, key=lambda p: min(first[p].values()))
delays = []
for at, pid in zip(reloads, order[1:]):
    delays.append(max(first[pid].values()) - at)
ended = r["streams_ended"].get("Unavailable", 0)
failed_streams = sum(r["streams_failed"].values())
print(f"| {sys.argv[4]} | {r['rpcs']} | {r['failed']} | {r['streams_opened']} / {ended} / {failed_streams} "
      f"| {'–'.join(map(str, met))} | {', '.join(f'{d} ms' for d in delays)} |")
PY
    rm -f "$work/seen.log"
}
run_mode "sockets (LISTEN_FDS)"
run_mode "--proxy tcp" --proxy tcp
run_mode "--proxy http --upstream-protocol h2c" --proxy http --upstream-protocol h2c
