//! What happens at each reload time: a shell command (`--trigger`), a reload
//! through baton's control socket (`--name`/`--control`), or, for
//! `baton demo`'s cold restarts, any async action.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::client;
use crate::control::proto::{Request, Response};

use super::stats::TriggerRecord;

/// The action run at each reload time; `Ok(message)` when it succeeded.
pub type Trigger =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> + Send + Sync>;

/// Runs `sh -c command`; success is exit status 0. Its stdout is discarded
/// (bench's own stdout may be JSON) and its stderr is bench's; no pipe is
/// waited on, so a command that leaves a server running in the background
/// does not hold the trigger.
pub fn shell(command: String) -> Trigger {
    Arc::new(move || {
        let command = command.clone();
        Box::pin(async move {
            let status = tokio::task::spawn_blocking(move || {
                std::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(&command)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .status()
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("running the trigger: {e}"))?;
            if status.success() {
                Ok("trigger exited 0".to_owned())
            } else {
                Err(format!("trigger failed ({status})"))
            }
        })
    })
}

/// Asks the baton at `path` to reload and waits for the outcome.
pub fn control(path: PathBuf) -> Trigger {
    Arc::new(move || {
        let path = path.clone();
        Box::pin(async move {
            let answer =
                tokio::task::spawn_blocking(move || client::call(&path, &Request::Reload, None))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
            match answer {
                Response::Reloaded {
                    generation,
                    ready_ms,
                    ..
                } => Ok(format!("generation {generation} ready after {ready_ms} ms")),
                Response::RolledBack { message, .. } => Err(format!("rolled back: {message}")),
                other => Err(format!("unexpected answer {other:?}")),
            }
        })
    })
}

/// Runs `trigger` at each of `times` after `start` (one after the other),
/// recording when each ran and how it went.
pub async fn schedule(
    trigger: Trigger,
    times: Vec<Duration>,
    start: Instant,
) -> Vec<TriggerRecord> {
    let mut records = Vec::with_capacity(times.len());
    for at in times {
        tokio::time::sleep_until(tokio::time::Instant::from_std(start + at)).await;
        let at_us = start.elapsed().as_micros() as u64;
        let result = trigger().await;
        let done_us = start.elapsed().as_micros() as u64;
        let (ok, message) = match result {
            Ok(m) => (true, m),
            Err(m) => (false, m),
        };
        records.push(TriggerRecord {
            at_us,
            done_us,
            ok,
            message,
        });
    }
    records
}
