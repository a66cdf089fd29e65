# Shared by the side-by-side scripts here (sourced, not run): the work
# directory and its cleanup, free ports, and CPU ticks of processes.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
B=$root/target/release/baton
work=$(mktemp -d)
cleanup() {
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null
    pkill -P $$ 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# CPU ticks (user + system) of the given pids and their threads.
ticks() {
    local total=0 pid
    for pid in "$@"; do
        # Fields 14 and 15, after the parenthesised command name.
        read -r -a f < <(sed 's/^.*) //' "/proc/$pid/stat")
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)
