#!/usr/bin/env python3
"""A small web app for baton: it takes its listening socket from baton
(fd 3, LISTEN_FDS) instead of binding, says READY=1 on NOTIFY_SOCKET once
it serves, and finishes what it has in flight on SIGTERM. The standard
library only; `GREETING` says which service it is."""
import http.server
import os
import signal
import socket
import threading


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"{os.environ.get('GREETING', 'hello')} from pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True


if int(os.environ.get("LISTEN_FDS", "0")) < 1:
    raise SystemExit("no socket from baton: run me with `baton run --listen ADDR -- python3 app.py`")
server = Server(("127.0.0.1", 0), Hello, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=3)
# Drain on SIGTERM: stop accepting, finish the requests in flight, exit.
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
notify("READY=1")
server.serve_forever()
server.server_close()
