//! `--proxy tcp`: a layer-4 relay for any protocol. Each accepted client
//! connection is paired with a new connection to the current generation and
//! the bytes are copied both ways; a connection stays with the generation it
//! was paired with until either side closes it (or that generation is
//! killed at the stop timeout).
//!
//! A retired generation gets its stop signal once the connections paired
//! with it have closed, or after the drain wait (`--drain-wait`), except
//! that connections that opened with the HTTP/2 preface do not hold it:
//! an HTTP/2 server's graceful stop sends them GOAWAY, and their clients
//! open their next connection, which goes to the new generation.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use super::conn_io::{OpenStream, copy_both_ways, stopped};
use super::health::connect;
use super::route::Proxy;
use baton::serve::{Acceptor, AsyncListener, Stream, Ticket};

/// Accepts on `listeners` and relays until `stop` turns true; then stops
/// accepting (relays in progress go on).
pub async fn serve(listeners: Vec<AsyncListener>, proxy: Arc<Proxy>, stop: watch::Receiver<bool>) {
    let mut loops = JoinSet::new();
    for listener in listeners {
        loops.spawn(accept_loop(listener, Arc::clone(&proxy), stop.clone()));
    }
    while loops.join_next().await.is_some() {}
}

async fn accept_loop(listener: AsyncListener, proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    let Ok(mut listener) = Acceptor::new(listener) else {
        return;
    };
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = listener.accept_from() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Then a slot under the connection cap. In tcp mode nothing is
        // evicted (some protocols wait for the server to speak first), and
        // a connection once accepted is relayed, over the cap at a stop.
        let ticket = tokio::select! {
            ticket = proxy.connections().admit() => ticket,
            () = stopped(&mut stop) => proxy.connections().admit_over_cap(),
        };
        ticket.spoke();
        tokio::spawn(relay(stream, ticket, Arc::clone(&proxy)));
    }
}

/// Pairs one client connection with the current generation and copies
/// until both sides have closed, or nothing moved either way for the idle
/// timeout.
async fn relay(client: Stream, ticket: Ticket, proxy: Arc<Proxy>) {
    let _ticket = ticket;
    let _open = OpenStream::new(&proxy.counters.open_streams);
    let Some((mut upstream, mut active)) = proxy.acquire().await else {
        return;
    };
    let mut retried = false;
    let mut server = loop {
        match connect(upstream.addr).await {
            Ok(server) => break server,
            Err(e) => {
                // Nothing was sent: the next generation, once.
                if !retried {
                    retried = true;
                    proxy.counters.retries.fetch_add(1, Ordering::Relaxed);
                    if let Some(next) = proxy.next(Some(&upstream)).await
                        && let Some(entered) = next.enter_if_open()
                    {
                        (upstream, active) = (next, entered);
                        continue;
                    }
                }
                debug!(generation = upstream.generation, error = %e, "cannot reach the generation; closing the client connection");
                return;
            }
        }
    };
    // An HTTP/2 connection stops holding its generation's drain.
    let active = std::sync::Mutex::new(Some(active));
    let first = |bytes: &[u8]| {
        if super::http2::opens_h2(bytes)
            && let Ok(mut active) = active.lock()
        {
            active.take();
        }
    };
    // The client socket is waited on in any case: registered at the accept.
    match client {
        Stream::Tcp(mut client) => {
            let _ = client.set_nodelay(true);
            let (r, w) = client.split();
            copy_both_ways(
                r,
                w,
                &mut server,
                proxy.limits.serve.idle_timeout,
                &proxy.counters.idle_relays,
                first,
            )
            .await;
        }
        Stream::Unix(mut client) => {
            let (r, w) = client.split();
            copy_both_ways(
                r,
                w,
                &mut server,
                proxy.limits.serve.idle_timeout,
                &proxy.counters.idle_relays,
                first,
            )
            .await;
        }
        _ => {}
    }
    drop(active);
}
