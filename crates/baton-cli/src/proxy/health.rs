//! Reaching a generation's private port: a free port to give it, the
//! connect (with its time limit and the self-connect check), and the
//! readiness check (`--health tcp|http:/PATH`).

use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::time::Duration;

/// A free loopback port for a generation to listen on. The port is
/// released before the app binds it; another process taking it in between
/// makes that generation fail its check and roll back.
pub fn private_port() -> std::io::Result<u16> {
    Ok(StdTcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// How long a connect to a generation may take. On loopback it is
/// immediate unless the app's accept queue is full, when the kernel drops
/// the SYN and retries for about two minutes.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addr` within [`CONNECT_TIMEOUT`], treating a TCP
/// self-connection as refused: with nothing listening on a loopback port in
/// the ephemeral range, a connect can pick that very port as its source and
/// "succeed" by connecting to itself (a simultaneous open).
///
/// On a proxy thread the timeout is checked at the thread's one-second
/// tick (so it is 10 to 11 s) instead of with a timer of its own: a timer
/// due before every other one makes the runtime wake its own event loop
/// through an eventfd, two system calls for each connection.
pub async fn connect(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    connect_within(addr, CONNECT_TIMEOUT).await
}

/// [`connect`] with a time limit of one's own.
async fn connect_within(
    addr: SocketAddr,
    limit: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out (the app's accept queue is full?)",
        )
    };
    let connecting = tokio::net::TcpStream::connect(addr);
    let stream = match super::slot::ticks() {
        Some(mut ticks) => {
            let started = std::time::Instant::now();
            let mut connecting = std::pin::pin!(connecting);
            loop {
                tokio::select! {
                    biased;
                    connected = &mut connecting => break connected?,
                    // No more ticks: the thread is ending.
                    ticked = ticks.changed() => {
                        if ticked.is_err() || started.elapsed() >= limit {
                            return Err(timed_out());
                        }
                    }
                }
            }
        }
        None => tokio::time::timeout(limit, connecting)
            .await
            .map_err(|_| timed_out())??,
    };
    // Connected to itself: its own address is the one it connected to.
    if stream.local_addr()? == addr {
        return Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The address of a generation's private port.
pub fn private_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// How a generation is checked for readiness in proxy mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// A TCP connect to its private port succeeds.
    Tcp,
    /// `GET PATH` on its private port answers 2xx.
    Http(String),
}

impl std::str::FromStr for Health {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Health::Tcp),
            _ => match s.strip_prefix("http:") {
                Some(path) if path.starts_with('/') => Ok(Health::Http(path.to_owned())),
                _ => Err(format!(
                    "invalid health check {s:?}: expected tcp or http:/PATH"
                )),
            },
        }
    }
}

impl Health {
    /// Checks the generation at `addr` once.
    pub async fn passes(&self, addr: SocketAddr) -> bool {
        let check = async {
            let mut stream = connect(addr).await.ok()?;
            let Health::Http(path) = self else {
                return Some(());
            };
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.ok()?;
            // "HTTP/1.1 2xx"
            (head.starts_with(b"HTTP/1.") && head[9] == b'2').then_some(())
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), check).await,
            Ok(Some(()))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_the_app_never_completes_times_out_on_a_proxy_thread() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let ticks = crate::proxy::slot::start_ticks();
            // A listener whose accept queue holds one connection; the
            // kernel drops the SYNs of the next ones.
            let fd = rustix::net::socket(
                rustix::net::AddressFamily::INET,
                rustix::net::SocketType::STREAM,
                None,
            )
            .unwrap();
            rustix::net::bind(&fd, &SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            rustix::net::listen(&fd, 0).unwrap();
            let addr = crate::sys::socket::tcp_local_addr(&fd).unwrap();
            let limit = Duration::from_secs(2);
            let _queued = connect_within(addr, limit)
                .await
                .expect("the first one is queued");
            let started = std::time::Instant::now();
            let second = connect_within(addr, limit).await;
            assert_eq!(
                second.map(|_| ()).unwrap_err().kind(),
                std::io::ErrorKind::TimedOut
            );
            assert!(started.elapsed() >= limit);
            ticks.abort();
        });
    }
}
