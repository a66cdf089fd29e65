//! Accepts control connections and hands each request to the guardian's
//! event loop, which owns all state; this task only does I/O.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::proto::{Request, Response};

/// A request and where its answer goes.
#[derive(Debug)]
pub struct ControlRequest {
    /// The request.
    pub request: Request,
    /// The answer's way back.
    pub reply: oneshot::Sender<Response>,
}

/// The longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// Serves the control socket until the receiving loop goes away.
pub async fn serve(listener: UnixListener, to_loop: mpsc::UnboundedSender<ControlRequest>) {
    let uid = rustix::process::geteuid().as_raw();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // The socket file is 0600, but check the peer too: a socket passed
        // around or a permissive umask must not open the door.
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == uid || cred.uid() == 0 => {}
            Ok(cred) => {
                warn!(
                    peer_uid = cred.uid(),
                    "control socket: refused a peer of another user"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "control socket: cannot read peer credentials");
                continue;
            }
        }
        let to_loop = to_loop.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, to_loop).await {
                debug!(error = %e, "control connection ended");
            }
        });
    }
}

async fn handle(
    stream: UnixStream,
    to_loop: mpsc::UnboundedSender<ControlRequest>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_LINE))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if to_loop.send(ControlRequest { request, reply }).is_err() {
                return Ok(());
            }
            match answer.await {
                Ok(response) => response,
                Err(_) => Response::Stopping,
            }
        }
        Err(e) => Response::Error {
            message: format!("bad request {:?}: {e}", line.trim()),
        },
    };
    let mut out = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    out.push('\n');
    write.write_all(out.as_bytes()).await?;
    write.shutdown().await
}
