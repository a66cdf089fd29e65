//! Accepts control connections and hands each request to the guardian's
//! event loop, which owns all state; this task only does I/O.
//!
//! Bounded against clients that misbehave: at most
//! [`crate::sys::limits::CONTROL_CONNECTIONS`] at
//! once (at the cap the oldest one that has sent nothing is closed to make
//! room, so idle connections cannot lock `baton status` out); a request line
//! must arrive within [`REQUEST_TIMEOUT`] of the accept and be at most
//! [`MAX_LINE`] bytes; the answer must be taken within [`REQUEST_TIMEOUT`].
//! Waiting for the answer itself (a reload waits for readiness) is not
//! idleness and has no timeout here: the guardian's own deadlines bound it.

use std::sync::Arc;
use std::time::Duration;

use baton::serve::{Connections, Stream, Ticket};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::proto::{Addressed, Request, Response};

/// A request and where its answer goes.
#[derive(Debug)]
pub struct ControlRequest {
    /// The request.
    pub request: Request,
    /// The answer's way back.
    pub reply: oneshot::Sender<Response>,
    /// For an upgrade: the client's connection itself, which the loop
    /// answers (and hands to the new image, which answers it then).
    pub conn: Option<std::os::unix::net::UnixStream>,
    /// The service it names (`--config-dir`), if any.
    pub service: Option<String>,
}

/// The longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// How long a client may take to send its request, and to take its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the control socket until the receiving loop goes away.
pub async fn serve(
    listener: UnixListener,
    to_loop: mpsc::UnboundedSender<ControlRequest>,
    connections: Arc<Connections>,
) {
    let uid = rustix::process::geteuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The socket file is 0600, but check the peer too: a socket passed
        // around or a permissive umask must not open the door.
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid || cred.uid() == 0 => {}
            Ok(cred) => {
                debug!(
                    peer_uid = cred.uid(),
                    "control socket: refused a peer of another user"
                );
                continue;
            }
            Err(e) => {
                debug!(error = %e, "control socket: cannot read peer credentials");
                continue;
            }
        }
        let ticket = connections.admit().await;
        let to_loop = to_loop.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, ticket, to_loop).await {
                debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    ticket: Ticket,
    to_loop: mpsc::UnboundedSender<ControlRequest>,
) -> std::io::Result<()> {
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time");
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    // Silent until its first byte: may be closed to make room.
    let stream = Stream::Unix(stream);
    tokio::select! {
        ready = stream.readable() => ready?,
        () = ticket.evicted() => if !stream.has_data() {
            return Ok(());
        },
        () = tokio::time::sleep_until(deadline) => return Err(timed_out()),
    }
    ticket.spoke();
    let Stream::Unix(stream) = stream else {
        return Ok(());
    };
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    {
        let mut limited = (&mut reader).take(MAX_LINE);
        tokio::time::timeout_at(deadline, limited.read_line(&mut line))
            .await
            .map_err(|_| timed_out())??;
    }
    let addressed = serde_json::from_str::<Addressed>(line.trim());
    // A `service` that is not a name is a bad request, not "every one".
    let parsed = serde_json::from_str::<Request>(line.trim()).and_then(|request| {
        addressed
            .as_ref()
            .map(|_| request)
            .map_err(|e| serde::de::Error::custom(e.to_string()))
    });
    let service = addressed.ok().and_then(|a| a.service);
    if let Ok(request @ Request::Upgrade { .. }) = parsed {
        // The loop answers this one on the connection itself. A request
        // line is all the client sends, so nothing is left in the buffer.
        let conn = reader.into_inner().into_std()?;
        conn.set_nonblocking(false)?;
        let (reply, _) = oneshot::channel();
        let _ = to_loop.send(ControlRequest {
            request,
            reply,
            conn: Some(conn),
            service,
        });
        return Ok(());
    }
    let (read, mut write) = reader.into_inner().into_split();
    drop(read);
    let response = match parsed {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if to_loop
                .send(ControlRequest {
                    request,
                    reply,
                    conn: None,
                    service,
                })
                .is_err()
            {
                return Ok(());
            }
            match answer.await {
                Ok(response) => response,
                Err(_) => Response::Stopping,
            }
        }
        Err(e) => {
            let mut shown: String = line.trim().chars().take(200).collect();
            if shown.len() < line.trim().len() {
                shown.push('…');
            }
            Response::Error {
                message: format!("bad request {shown:?}: {e}"),
            }
        }
    };
    let mut out = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    out.push('\n');
    let send = async {
        write.write_all(out.as_bytes()).await?;
        write.shutdown().await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, send).await {
        Ok(sent) => sent,
        Err(_) => {
            warn!("control socket: a client did not take its answer; closed");
            Ok(())
        }
    }
}
