// A Node.js server that takes its listening socket from baton (fd 3,
// LISTEN_FDS) instead of binding: one process per core with
// `baton run --workers auto`, like PM2's cluster mode, with reloads that
// drop nothing. Readiness is the socket answering (--ready delay:) or,
// with `systemd-notify --ready`, READY=1 (see README.md).
"use strict";
const http = require("http");

const worker = process.env.BATON_WORKER || "0";
const generation = process.env.BATON_GENERATION || "?";
const inherited = Number(process.env.LISTEN_FDS || 0) > 0;

const server = http.createServer((req, res) => {
  res.setHeader("X-Pid", String(process.pid));
  res.setHeader("X-Baton-Generation", generation);
  res.end(`hello from worker ${worker} of generation ${generation} (pid ${process.pid})\n`);
});

// Drain on SIGTERM: stop accepting, finish what is in flight, exit.
process.on("SIGTERM", () => {
  server.close(() => process.exit(0));
  // Idle keep-alive connections would hold close() open.
  server.closeIdleConnections();
});

if (inherited) {
  server.listen({ fd: 3 });
} else {
  server.listen(Number(process.env.PORT || 8080));
}
