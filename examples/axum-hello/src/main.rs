//! axum-hello: an axum service that baton restarts without dropping a
//! request. The three calls that make it so are marked 1, 2 and 3.
//!
//! ```text
//! axum-hello [--listen ADDR] [--startup DUR] [--drain DUR] [--idle-grace DUR]
//! ```
//!
//! - `/` answers with the headers `x-pid` and `x-baton-generation`;
//! - `/slow?ms=N` sleeps N ms first (to watch a drain finish it);
//! - `--startup DUR` waits that long before reporting ready (a stand-in for
//!   opening database pools and warming caches).
//!
//! Standalone it binds `--listen` (default `127.0.0.1:3000`); under baton or
//! systemd socket activation it serves on the sockets it inherits.

use std::error::Error;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use baton::serve::{AsyncListener, Drain};

struct Args {
    listen: String,
    startup: Duration,
    drain: Drain,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;

    // 1. Take the inherited sockets, before any thread starts; bind our own
    //    address when there are none (run standalone).
    let mut inherited = baton::listeners()?;
    let listeners = if inherited.is_empty() {
        let listener = std::net::TcpListener::bind(&args.listen)?;
        eprintln!("axum-hello: listening on {}", listener.local_addr()?);
        vec![baton::Listener::Tcp(listener)]
    } else {
        inherited.take_all()?
    };

    tokio::runtime::Runtime::new()?.block_on(async move {
        // Install the SIGTERM handler before anything slow happens.
        let shutdown = baton::shutdown::signal()?;
        tokio::time::sleep(args.startup).await;
        let listeners = listeners
            .into_iter()
            .map(AsyncListener::from_listener)
            .collect::<Result<Vec<_>, _>>()?;
        let app = Router::new()
            .route("/", get(hello))
            .route("/slow", get(slow));

        // 2. Ready: baton retires the previous generation only now.
        baton::ready()?;

        // 3. Serve until SIGTERM, then drain: stop accepting, answer further
        //    keep-alive requests with `Connection: close`, close idle ones
        //    after the grace period.
        let stop = async move {
            let signal = shutdown.await;
            let _ = baton::stopping();
            eprintln!("axum-hello: {signal}, draining");
        };
        let report = baton::serve::serve_router(listeners, app, stop, args.drain).await?;

        // Cleanup after the drain, last registered first, within a budget.
        let mut hooks = baton::shutdown::Hooks::new();
        hooks.add("report", move || {
            eprintln!(
                "axum-hello: drained after {} connections ({} cut at the deadline)",
                report.connections, report.cut_at_deadline
            );
        });
        hooks.run_within(Duration::from_secs(5));
        Ok(())
    })
}

/// `x-pid` and `x-baton-generation` on every answer.
fn stamped(body: String) -> impl IntoResponse {
    let generation = baton::generation().unwrap_or(0);
    (
        [
            (
                HeaderName::from_static("x-pid"),
                HeaderValue::from(std::process::id()),
            ),
            (
                HeaderName::from_static("x-baton-generation"),
                HeaderValue::from(generation),
            ),
        ],
        body,
    )
}

async fn hello() -> impl IntoResponse {
    let generation = baton::generation().unwrap_or(0);
    stamped(format!(
        "hello from generation {generation} (pid {})\n",
        std::process::id()
    ))
}

async fn slow(uri: Uri) -> impl IntoResponse {
    let ms = uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ms=")))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1000)
        .min(600_000);
    eprintln!(
        "axum-hello: pid {} started a {ms} ms request",
        std::process::id()
    );
    tokio::time::sleep(Duration::from_millis(ms)).await;
    stamped(format!("slept {ms} ms\n"))
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:3000".to_owned(),
        startup: Duration::ZERO,
        drain: Drain::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?,
            "--startup" => args.startup = duration(&value()?)?,
            "--drain" => args.drain.deadline = duration(&value()?)?,
            "--idle-grace" => args.drain.idle_grace = duration(&value()?)?,
            "-h" | "--help" => {
                println!(
                    "usage: axum-hello [--listen ADDR] [--startup DUR] [--drain DUR] [--idle-grace DUR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown option {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// `250ms`, `2s`.
fn duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}: expected e.g. 250ms or 2s");
    if let Some(ms) = text.strip_suffix("ms") {
        ms.parse().map(Duration::from_millis).map_err(|_| bad())
    } else if let Some(s) = text.strip_suffix('s') {
        s.parse()
            .ok()
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or_else(bad)
    } else {
        Err(bad())
    }
}
