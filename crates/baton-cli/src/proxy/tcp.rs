//! `--proxy tcp`: a layer-4 relay for any protocol. Each accepted client
//! connection is paired with a new connection to the current generation and
//! the bytes are copied both ways; a connection stays with the generation it
//! was paired with until either side closes it (or that generation is
//! killed at the stop timeout).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use super::Proxy;
use baton::serve::AsyncListener;

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
    loop {
        tokio::select! {
            () = stopped(&mut stop) => return,
            accepted = accept(&listener) => match accepted {
                Ok(Client::Tcp(stream)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(relay(stream, Arc::clone(&proxy)));
                }
                Ok(Client::Unix(stream)) => {
                    tokio::spawn(relay(stream, Arc::clone(&proxy)));
                }
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

enum Client {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &AsyncListener) -> std::io::Result<Client> {
    match listener {
        AsyncListener::Tcp(l) => l.accept().await.map(|(s, _)| Client::Tcp(s)),
        AsyncListener::Unix(l) => l.accept().await.map(|(s, _)| Client::Unix(s)),
        _ => std::future::pending().await,
    }
}

/// Pairs one client connection with the current generation and copies.
async fn relay<C>(mut client: C, proxy: Arc<Proxy>)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let _open = super::http::OpenStream(Arc::clone(&proxy));
    proxy
        .counters
        .open_streams
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let Some((mut upstream, mut active)) = proxy.acquire().await else {
        return;
    };
    let mut retried = false;
    loop {
        match super::connect(upstream.addr).await {
            Ok(mut server) => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                drop(active);
                return;
            }
            Err(e) => {
                // Nothing was sent: the next generation, once.
                if !retried {
                    retried = true;
                    proxy
                        .counters
                        .retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    }
}
