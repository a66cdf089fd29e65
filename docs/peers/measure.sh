#!/bin/bash
# Measures baton beside tableflip, facebookgo/grace and a cold restart, in one
# run, with the same load (baton bench: 32 clients, 10 s, restarts at 2.5 s,
# 5 s and 7.5 s), the same Gin app (300 ms simulated startup) and, for baton,
# also the axum example. Prints a markdown table. Needs Debian's golang-go,
# golang-github-{gin-gonic-gin,coreos-go-systemd,cloudflare-tableflip,
# facebookgo-grace}-dev and a release build (cargo build --release --workspace).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
B=$root/target/release/baton
AX=$root/target/release/axum-hello
work=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$work"' EXIT

"$root/examples/gin-hello/build.sh" "$work" >/dev/null
overlay=$work/gopath
mkdir -p "$overlay/src/github.com/coreos/go-systemd"
ln -s /usr/share/gocode/src/github.com/coreos/go-systemd "$overlay/src/github.com/coreos/go-systemd/v22"
for peer in tableflip grace; do
    (cd "$root/docs/peers/$peer" && GO111MODULE=off GOPATH="$overlay:/usr/share/gocode" GOCACHE="$work/.gocache" \
        go build -o "$work/$peer-gin" .)
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done; echo "no server on $1" >&2; exit 1; }
row() { # label mode json
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys
label, mode, path = sys.argv[1:]
s = json.load(open(path))["summary"]
w = s["windows"]
kinds = ", ".join(f"{k} {n}" for k, n in s["failures"].items() if n)
first = [x["first_new_ms"] for x in w if x["first_new_ms"] is not None]
hand = f"{sum(first)/len(first):.0f} ms" if first else "-"
print(f"| {label} | {mode} | {s['requests']} | {s['failed']}{' (' + kinds + ')' if kinds else ''} | {s['failure_rate_pct']:.3f} % | {s['unavailable_mean_ms']:.0f} ms | {s['restart']['p99_ms']:.1f} ms | {hand} |")
PY
}
bench() { # port trigger... -> json file
    local port=$1 out=$2; shift 2
    "$B" bench --url "http://127.0.0.1:$port/" -c 32 -d 10s --reload-at 2500ms,5s,7500ms --json "$@" > "$out"
}

echo "| restarted by | clients | requests | failed | failed % | unavailable per restart | p99 in restart windows | handover (mean) |"
echo "|---|---|---|---|---|---|---|---|"
for mode in new-conn keep-alive; do
    flag=(); [ $mode = new-conn ] && flag=(--new-conn)

    # baton + gin-hello, and baton + the axum example
    for app in "$work/gin-hello -startup 300ms" "$AX --startup 300ms"; do
        "$B" run --listen 127.0.0.1:0 --control "$work/b.sock" -- $app 2> "$work/b.log" & bp=$!
        until grep -q ' ready ' "$work/b.log"; do sleep 0.05; done
        port=$(grep -o 'addr=127.0.0.1:[0-9]*' "$work/b.log" | head -1 | cut -d: -f2)
        bench "$port" "$work/r.json" "${flag[@]}" --control "$work/b.sock"
        kill $bp; wait $bp || true
        case $app in *axum*) label="baton + axum example";; *) label="baton + Gin (go-systemd)";; esac
        row "$label" "$mode" "$work/r.json"
    done

    # tableflip
    port=$(free_port)
    "$work/tableflip-gin" -listen "127.0.0.1:$port" -startup 300ms -pid-file "$work/tf.pid" 2>/dev/null &
    wait_up "$port"
    bench "$port" "$work/r.json" "${flag[@]}" --trigger "kill -HUP \$(cat $work/tf.pid)"
    kill "$(cat "$work/tf.pid")"
    row "tableflip + Gin" "$mode" "$work/r.json"

    # facebookgo/grace
    port=$(free_port)
    "$work/grace-gin" -listen "127.0.0.1:$port" -startup 300ms 2>/dev/null &
    wait_up "$port"
    bench "$port" "$work/r.json" "${flag[@]}" --trigger "pkill -USR2 -x grace-gin"
    pkill -TERM -x grace-gin || true
    row "facebookgo/grace + Gin" "$mode" "$work/r.json"

    # cold restart: SIGTERM (graceful Shutdown), wait for the exit, start again
    port=$(free_port)
    start="$work/gin-hello -listen 127.0.0.1:$port -startup 300ms 2>/dev/null & echo \$! > $work/cold.pid"
    sh -c "$start"
    wait_up "$port"
    gone='p=$(cat '"$work"'/cold.pid); kill $p; while [ -e /proc/$p ] && ! grep -q "^State:.*Z" /proc/$p/status; do sleep 0.005; done'
    bench "$port" "$work/r.json" "${flag[@]}" --trigger "$gone; $start"
    kill "$(cat "$work/cold.pid")"
    row "cold restart (stop, start) + Gin" "$mode" "$work/r.json"
done
