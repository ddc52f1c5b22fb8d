//! A TCP proxy in front of a shared service (Redis, PostgreSQL) that a test can cut, stop and
//! restore, to simulate outages without disturbing other tests' connections to the service.
//!
//! - [`Proxy::cut`]: open connections are cut; new ones are accepted and closed at once.
//! - [`Proxy::stop`]: open connections are cut and the port is closed: new connections are
//!   refused, as by a stopped server.
//! - [`Proxy::restore`]: forwarding resumes (on the same port).
//! - [`Proxy::lose_reply_containing`]: the next server answer containing a marker is dropped
//!   and its connection closed (an answer lost in the network after the server acted on the
//!   request, e.g. PostgreSQL's `COMMIT` completion).

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

#[derive(Default)]
struct State {
    up: AtomicBool,
    connections: tokio::sync::Mutex<JoinSet<()>>,
    /// Armed by [`Proxy::lose_reply_containing`]; taken by the first answer that contains it.
    marker: Mutex<Option<Vec<u8>>>,
}

impl State {
    /// Whether `chunk` contains the armed marker (disarming it).
    fn trips(&self, chunk: &[u8]) -> bool {
        let mut marker = self.marker.lock().unwrap_or_else(|p| p.into_inner());
        let found = marker
            .as_deref()
            .is_some_and(|m| !m.is_empty() && chunk.windows(m.len()).any(|w| w == m));
        if found {
            *marker = None;
        }
        found
    }
}

/// A proxy from `127.0.0.1:port` to a target address.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    target: String,
    state: Arc<State>,
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl Proxy {
    /// Starts forwarding from a free local port to `target` (`host:port`).
    pub async fn start(target: impl Into<String>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = Proxy {
            port,
            target: target.into(),
            state: Arc::new(State::default()),
            listener: Mutex::new(None),
        };
        proxy.state.up.store(true, Ordering::Release);
        proxy.serve(listener);
        proxy
    }

    fn serve(&self, listener: TcpListener) {
        let (state, target) = (self.state.clone(), self.target.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                // Checked under the lock `cut` takes, so no connection outlives a cut.
                let mut connections = state.connections.lock().await;
                if !state.up.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                connections.spawn(relay(inbound, target.clone(), state.clone()));
            }
        });
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Cuts every open connection; new ones are accepted and closed until [`Proxy::restore`].
    pub async fn cut(&self) {
        self.state.up.store(false, Ordering::Release);
        self.state.connections.lock().await.abort_all();
    }

    /// Cuts every open connection and closes the port: connections are refused until
    /// [`Proxy::restore`].
    pub async fn stop(&self) {
        self.cut().await;
        let task = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Forwards again (reopening the port after [`Proxy::stop`]).
    pub async fn restore(&self) {
        let closed = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none();
        if closed {
            let mut attempts = 0;
            let listener = loop {
                match TcpListener::bind(("127.0.0.1", self.port)).await {
                    Ok(listener) => break listener,
                    Err(error) => {
                        attempts += 1;
                        assert!(
                            attempts < 100,
                            "cannot reopen proxy port {}: {error}",
                            self.port
                        );
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            self.serve(listener);
        }
        self.state.up.store(true, Ordering::Release);
    }

    /// Arms a one-shot fault: the next chunk the server sends that contains `marker` is
    /// dropped and its connection closed.
    pub fn lose_reply_containing(&self, marker: &[u8]) {
        *self.state.marker.lock().unwrap_or_else(|p| p.into_inner()) = Some(marker.to_vec());
    }

    /// Whether a fault armed by [`Proxy::lose_reply_containing`] has not happened yet.
    pub fn armed(&self) -> bool {
        self.state
            .marker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

/// Forwards one connection both ways until either side closes (or a lost reply ends it).
async fn relay(inbound: TcpStream, target: String, state: Arc<State>) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = inbound.into_split();
    let (mut server_read, mut server_write) = outbound.into_split();
    let up = async {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(read @ 1..) = client_read.read(&mut buffer).await {
            if server_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let down = async {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(read @ 1..) = server_read.read(&mut buffer).await {
            // A lost answer: the client sees the connection close instead.
            if state.trips(&buffer[..read])
                || client_write.write_all(&buffer[..read]).await.is_err()
            {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}
