//! A stop in `--proxy http` without `--shutdown-delay`: the clients go
//! first. The proxy stops accepting and tells its clients (HTTP/2 GOAWAY,
//! HTTP/1 `Connection: close`), and the app gets its stop signal once
//! their connections have ended, or after the drain wait (the loop hears
//! `Event::ClientsGone`): streams a client opens before its GOAWAY
//! arrives still reach an app that serves. A second stop request
//! meanwhile stops at once. tcp mode relays bytes: its connections end
//! with the app's own graceful stop, which must not wait for them.

use tracing::info;

use super::event::Event;
use super::processes::Processes;
use crate::config::ProxyConfig;

/// Lets the clients go first if the proxy is in http mode; returns
/// whether it does (the stop proper then waits for `Event::ClientsGone`).
pub(super) fn start(proxy: Option<&ProxyConfig>, procs: &mut Processes, why: &str) -> bool {
    let Some(wait) = proxy
        .filter(|p| p.mode == crate::proxy::Mode::Http)
        .map(|p| p.drain_wait)
    else {
        return false;
    };
    let Some(done) = procs.launch.quiesce() else {
        return false;
    };
    info!(
        reason = why,
        drain_wait_ms = wait.as_millis() as u64,
        "stop: clients first; the app's stop signal follows once their connections end"
    );
    let events = procs.events.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(wait, done).await;
        let _ = events.send(Event::ClientsGone);
    });
    true
}
