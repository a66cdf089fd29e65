#!/bin/bash
# Upstream pooling against a misbehaving app: does a reverse proxy that keeps
# keep-alive connections to the app hand one client's answer to another?
#
# One app (Python, raw sockets) answers GET /echo?token=T with `tok=T` (and an
# X-Token: T header), and misbehaves on purpose on the paths below; attacker
# clients ask for the misbehaviour in a loop while victim clients ask for
# their own tokens, on keep-alive connections, and check every answer:
#
#   none            no attackers: the baseline
#   head-body       HEAD answered with Content-Length: N, then, 0.1 ms later in
#                   a second write, N body bytes that form a forged answer
#                   (gunicorn 20.1 sent a body after a HEAD answer)
#   204-extra       a 204, then 0.1 ms later the forged answer as extra bytes
#   304-extra       a 304, the same
#   late-extra-Dms  a correct Content-Length answer, the forged answer D ms
#                   later (D = 0: in the same write, right after the body)
#   cl0-onewrite    the attacker POSTs a body that is itself a complete request
#                   (GET /evil); the app answers the POST without reading it,
#                   so reads the body as the next request and answers SMUGGLED
#                   ("CL.0" request smuggling)
#
# The forged answer is `HTTP/1.1 200 OK`, `X-Injected: yes`, body `POISONED`.
# Each cell is victims / misdelivered / forged / failed: victim requests sent;
# answers carrying someone else's token; forged answers (POISONED, SMUGGLED,
# X-Injected) handed to a victim; failures (5xx, resets, timeouts, anything
# unparseable or unexpected). A victim reconnects after any answer that is not
# its own, so one desync on its own connection counts once. A second table:
# attacker requests / of them failed / connections the app accepted (each a
# new upstream connection: how often the proxy gave one up; 1-3 of them are
# readiness checks, and nginx also retires one per 1000 requests).
#
# Timing: this measures races. Stray bytes that reach the proxy with the
# answer (same read) can be caught; bytes that arrive after the proxy has
# pooled the connection and sent the next request on it cannot be told from
# that request's answer. Counts depend on the machine, the 0.1 ms gap (GAP in
# the app), the D delays, DUR and the number of connections: compare columns
# within one run, and read zeros as "not seen in DUR", not as "impossible".
#
# Columns: direct (no proxy: nothing is shared, so victims must see 0 — shows
# the counting is not fooled by the attackers); a naive pool (a deliberately
# careless Python proxy that pools upstream connections and never looks at
# stray bytes: the control, showing the test can fail); nginx (upstream
# keepalive 64, one worker); HAProxy (mode http, http-reuse always, nbthread
# 1); baton (--proxy http). Every cell gets a fresh app and proxy.
#
#   docs/peers/desync.sh
#   DUR=10 ONLY='nginx|haproxy' docs/peers/desync.sh
#
# Settings: DUR (seconds per cell, default 4), ONLY (a regex matched against
# "PROXY CASE", e.g. nginx, cl0, 'haproxy .*extra'), ATTACKERS (connections,
# 2), VICTIMS (connections, 6), B (the baton binary, default a release build),
# LOGS (a directory: keep each cell's proxy log there). Needs Debian's nginx
# (or nginx-light), haproxy, python3 and curl; loopback only.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
B=${B:-$root/target/release/baton}
DUR=${DUR:-4}
ONLY=${ONLY:-.}
ATTACKERS=${ATTACKERS:-2}
VICTIMS=${VICTIMS:-6}
work=$(mktemp -d)
cleanup() {
    [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null
    local p
    for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Waits until an echo request gets a 2xx through port $1 (so baton's app is up).
wait_port() {
    for _ in $(seq 200); do curl -sf -o /dev/null -m 1 "http://127.0.0.1:$1/echo?token=ready" && return 0; sleep 0.05; done
    echo "nothing answers on port $1" >&2
    exit 1
}

cat >"$work/app.py" <<'PY'
import os, signal, socket, threading, time
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: yes\r\n\r\nPOISONED"
GAP = 0.0001  # head-body, 204-extra, 304-extra: the stray bytes 0.1 ms later

def serve(c):
    # Separate writes go out as separate segments, without Nagle's wait.
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    def more():
        d = c.recv(65536)
        if not d:
            raise EOFError
        return d
    with c:
        while True:
            while b"\r\n\r\n" not in buf:
                buf += more()
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            method, target = lines[0].split(b" ")[:2]
            length = 0
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            path, _, query = target.partition(b"?")
            q = dict(p.partition(b"=")[::2] for p in query.split(b"&"))
            tok = q.get(b"token", b"-")
            if path != b"/cl0-onewrite":  # CL.0: answer without reading the body
                while len(buf) < length:
                    buf += more()
                buf = buf[length:]
            body = b"tok=" + tok
            out = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Token: %s\r\n\r\n" % (len(body), tok)
            extra, wait = b"", 0.0
            if path == b"/evil":
                out = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
            elif path == b"/head-body" and method == b"HEAD":
                out = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Token: %s\r\n\r\n" % (len(FORGED), tok)
                extra, wait = FORGED, GAP
            elif path == b"/204-extra":
                out, extra, wait = b"HTTP/1.1 204 No Content\r\nX-Token: %s\r\n\r\n" % tok, FORGED, GAP
            elif path == b"/304-extra":
                out, extra, wait = b'HTTP/1.1 304 Not Modified\r\nETag: "1"\r\nX-Token: %s\r\n\r\n' % tok, FORGED, GAP
            elif path == b"/late-extra":
                d = int(q.get(b"d", b"0"))
                if d == 0:
                    out += body + FORGED  # one write: answer and stray bytes together
                else:
                    out, extra, wait = out + body, FORGED, d / 1000
            elif method != b"HEAD":
                out += body
            c.sendall(out)
            if extra:
                time.sleep(wait)
                c.sendall(extra)

def guarded(c):
    try:
        serve(c)
    except (OSError, ValueError, EOFError):
        pass

def stop(*_):  # on SIGTERM: how many connections the proxy opened to the app
    with open(os.environ["APP_STATS"], "w") as f:
        f.write(str(accepted))
    os._exit(0)

signal.signal(signal.SIGTERM, stop)
s = socket.create_server(("127.0.0.1", int(os.environ["PORT"])), backlog=1024)
accepted = 0
while True:
    c = s.accept()[0]
    accepted += 1
    threading.Thread(target=guarded, args=(c,), daemon=True).start()
PY

cat >"$work/client.py" <<'PY'
import random, re, socket, sys, threading, time
from collections import Counter

def close(c):
    """Closes a Conn (or nothing); returns None, the 'no connection' value."""
    if c:
        c.s.close()

class Conn:
    """A socket with a read buffer."""
    def __init__(self, port=None, sock=None, timeout=2.0):
        self.s = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.s.settimeout(timeout)
        self.buf = b""
    def fill(self):
        d = self.s.recv(65536)
        if not d:
            raise EOFError("closed")
        self.buf += d
    def until(self, sep):
        while sep not in self.buf:
            if len(self.buf) > 65536:
                raise ValueError("no end of head")
            self.fill()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out
    def take(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

def read_response(c, method):
    """One answer: (status, headers, head bytes, body)."""
    head = c.until(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not m:
        raise ValueError("bad status line")
    status, h = int(m.group(1)), {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        h[k.strip().lower()] = v.strip()
    if method == "HEAD" or status in (204, 304) or status < 200:
        return status, h, head, b""
    if "chunked" in h.get("transfer-encoding", ""):
        body = b""
        while (size := int(c.until(b"\r\n").split(b";")[0], 16)):
            body += c.take(size)
            c.take(2)
        c.until(b"\r\n")
        return status, h, head, body
    if "content-length" not in h:
        raise ValueError("no framing")
    return status, h, head, c.take(int(h["content-length"]))

def judge(tok, status, h, body):
    if b"POISONED" in body or b"SMUGGLED" in body or "x-injected" in h:
        return "forged"
    mine = b"tok=" + tok.encode()
    if status == 200 and h.get("x-token") == tok and body == mine:
        return "ok"
    if h.get("x-token", tok) != tok or (body.startswith(b"tok=") and body != mine):
        return "misdelivered"
    return "failed"

def attack_request(case):
    """(method, request bytes for a token) of a case's attacker."""
    if case == "head-body":
        return "HEAD", lambda t: b"HEAD /head-body?token=%s HTTP/1.1\r\nHost: t\r\n\r\n" % t
    if case == "cl0-onewrite":
        evil = b"GET /evil HTTP/1.1\r\nHost: t\r\n\r\n"
        return "POST", lambda t: (b"POST /cl0-onewrite?token=%s HTTP/1.1\r\nHost: t\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (t, len(evil), evil))
    m = re.fullmatch(r"late-extra-(\d+)ms", case)
    path = b"/late-extra?d=%s&" % m.group(1).encode() if m else b"/%s?" % case.encode()
    return "GET", lambda t: b"GET %stoken=%s HTTP/1.1\r\nHost: t\r\n\r\n" % (path, t)

def run(port, case, dur, attackers, victims):
    deadline = time.monotonic() + dur
    def worker(n, role, method, request):
        """Sends `request` in a loop on a keep-alive connection; a victim
        judges each answer, an attacker only needs one."""
        c, k = None, 0
        while time.monotonic() < deadline:
            k += 1
            tok = "%s-%d-%06x" % (role, k, random.getrandbits(24))
            n["requests"] += 1
            try:
                c = c or Conn(port)
                c.s.sendall(request(tok.encode()))
                status, h, _, body = read_response(c, method)
                verdict = judge(tok, status, h, body) if role[0] == "v" else "ok"
            except (OSError, EOFError, ValueError):
                verdict, h = "failed", {}
            if verdict != "ok":  # then a fresh connection, so one desync counts once
                n[verdict] += 1
                c = close(c)
                time.sleep(0.001 if verdict == "failed" else 0)
            elif h.get("connection", "").lower() == "close":
                c = close(c)
    echo = lambda t: b"GET /echo?token=%s HTTP/1.1\r\nHost: t\r\n\r\n" % t
    vs, ats = [Counter() for _ in range(victims)], [Counter() for _ in range(attackers)]
    threads = [threading.Thread(target=worker, args=(n, "v%d" % i, "GET", echo)) for i, n in enumerate(vs)]
    if case != "none":
        method, request = attack_request(case)
        threads += [threading.Thread(target=worker, args=(n, "a%d" % i, method, request))
                    for i, n in enumerate(ats)]
    for t in threads:
        t.daemon = True
        t.start()
    for t in threads:
        t.join(max(0.1, deadline + 3 - time.monotonic()))
    v, a = sum(vs, Counter()), sum(ats, Counter())
    print(v["requests"], v["misdelivered"], v["forged"], v["failed"], a["requests"], a["failed"])

def naive(listen, app):
    """The control: a pooling proxy that reads each answer by its framing and
    puts the connection back in its pool, never minding stray bytes."""
    pool, lock = [], threading.Lock()
    def handle(s):
        c = Conn(sock=s, timeout=30)
        try:
            while True:
                head = c.until(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                body = c.take(int(m.group(1))) if m else b""
                with lock:
                    up = pool.pop() if pool else None
                up = up or Conn(app, timeout=30)
                up.s.sendall(head + body)
                _, _, uhead, ubody = read_response(up, head.split(b" ")[0].decode())
                s.sendall(uhead + ubody)  # the app never chunks: head + body is the answer
                with lock:
                    pool.append(up)
        except (OSError, EOFError, ValueError):
            s.close()
    srv = socket.create_server(("127.0.0.1", listen), backlog=1024)
    while True:
        threading.Thread(target=handle, args=(srv.accept()[0],), daemon=True).start()

if sys.argv[1] == "naive":
    naive(int(sys.argv[2]), int(sys.argv[3]))
else:
    run(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
PY

# Config files for one cell, on the cell's ports.
configs() {
    cat >"$work/nginx.conf" <<CFG
worker_processes 1;
pid $work/nginx.pid;
error_log stderr info;
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
    cat >"$work/haproxy.cfg" <<CFG
global
    maxconn 4000
    nbthread 1
    log stderr format short local0 info
defaults
    mode http
    log global
    option httplog
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
}

# start LABEL: a fresh app and proxy; sets $port (where the clients go) and $pids.
start() {
    APP_PORT=$(free_port)
    PUB=$(free_port)
    configs
    pids=()
    local log=${LOGS:+$LOGS/$1-$2.log}
    log=${log:-/dev/null}
    if [ "$1" != baton ]; then
        PORT=$APP_PORT APP_STATS=$work/accepted python3 "$work/app.py" 2>>"$log" &
        pids+=($!)
        wait_port "$APP_PORT"
    fi
    case $1 in
    direct) port=$APP_PORT; return ;;
    naive) python3 "$work/client.py" naive "$PUB" "$APP_PORT" 2>>"$log" & ;;
    nginx) nginx -c "$work/nginx.conf" -g "daemon off;" 2>>"$log" & ;;
    haproxy) haproxy -f "$work/haproxy.cfg" -db >>"$log" 2>&1 & ;;
    # --orphans stop: the app goes too, even if baton is killed outright.
    baton) APP_STATS=$work/accepted "$B" run --proxy http --orphans stop --listen "127.0.0.1:$PUB" --control "$work/b.sock" \
        -- python3 "$work/app.py" >>"$log" 2>&1 & ;;
    esac
    pids+=($!)
    port=$PUB
    wait_port "$PUB"
}
stop() {
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    accepted=$(cat "$work/accepted" 2>/dev/null || echo "?")
    rm -f "$work/nginx.pid" "$work/b.sock" "$work/accepted"
}

labels=(direct naive nginx haproxy baton)
declare -A title=([direct]="direct (no proxy)" [naive]="naive pool (control)" [nginx]="nginx, keepalive 64"
    [haproxy]="HAProxy, http-reuse always" [baton]="baton --proxy http")
cases=(none head-body 204-extra 304-extra late-extra-0ms late-extra-5ms late-extra-50ms cl0-onewrite)
[ -n "${LOGS:-}" ] && mkdir -p "$LOGS"
declare -A cell
for label in "${labels[@]}"; do
    if [ $label = baton ] && [ ! -x "$B" ]; then
        echo "no baton binary at $B (set B=...): no baton column" >&2
        continue
    fi
    for case in "${cases[@]}"; do
        [[ "$label $case" =~ $ONLY ]] || continue
        echo "... $label $case" >&2
        start "$label" "$case"
        cell[$case/$label]=$(python3 "$work/client.py" "$port" "$case" "$DUR" "$ATTACKERS" "$VICTIMS")
        stop
        cell[$case/$label]+=" $accepted"
    done
done

# table FIRST COUNT FORMAT: fields FIRST.. of each cell; one row per case, one column per proxy that ran.
table() {
    local shown=() label case v f
    for label in "${labels[@]}"; do
        for case in "${cases[@]}"; do [ -n "${cell[$case/$label]:-}" ] && { shown+=("$label"); break; }; done
    done
    printf '| case |'; for label in "${shown[@]}"; do printf ' %s |' "${title[$label]}"; done; echo
    printf '|---|'; for label in "${shown[@]}"; do printf -- '---|'; done; echo
    for case in "${cases[@]}"; do
        v=""; for label in "${shown[@]}"; do v+=${cell[$case/$label]:-}; done
        [ -n "$v" ] || continue
        printf '| %s |' "$case"
        for label in "${shown[@]}"; do
            read -r -a f <<<"${cell[$case/$label]:-- - - - - - -}"
            printf " $3 |" "${f[@]:$1:$2}"
        done
        echo
    done
}
echo "$ATTACKERS attacker and $VICTIMS victim connections, ${DUR}s per cell; baton: $B"
echo
echo "Victim requests / misdelivered (someone else's token) / forged (POISONED, SMUGGLED, X-Injected) / failed:"
echo
table 0 4 '%s / %s / %s / %s'
echo
echo "Attacker requests / of them failed / connections the app accepted (the proxy's new upstream connections):"
echo
table 4 3 '%s / %s / %s'
echo
# Not a verdict, just the two checks the reading rests on.
bad() { local s=0 c; for c in "${cases[@]}"; do [ -n "${cell[$c/$1]:-}" ] && { read -r -a f <<<"${cell[$c/$1]}"; s=$((s + f[1] + f[2])); }; done; echo $s; }
echo "Checks: misdelivered + forged, summed over the cases: direct $(bad direct) (no sharing, so 0 is expected);" \
    "naive pool $(bad naive) (the control: non-zero shows the test can catch a desync)."
