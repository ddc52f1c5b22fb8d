//! A TCP proxy in front of a backend (PostgreSQL, Redis, NATS) whose connections a test can
//! cut and refuse for a while: an outage of the backend as its clients see it, without
//! stopping the shared server other tests use.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};

/// A running proxy. Dropping it stops accepting and closes every connection it carries.
pub struct Proxy {
    /// The local port clients connect to instead of the backend's.
    pub port: u16,
    up: Arc<AtomicBool>,
    cuts: AtomicU64,
    connections: Arc<Mutex<JoinSet<()>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards each connection to `target` (`host:port`).
    ///
    /// # Panics
    /// If no local port can be bound.
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let up = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let (up2, connections2, target) = (up.clone(), connections.clone(), target.to_owned());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                // Checked under the lock `cut` takes, so no connection outlives a cut.
                let mut connections = connections2.lock().await;
                if !up2.load(Ordering::Acquire) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                // Reap finished connections so the set does not grow with every reconnect.
                while connections.try_join_next().is_some() {}
            }
        });
        Proxy {
            port,
            up,
            cuts: AtomicU64::new(0),
            connections,
            accept,
        }
    }

    /// Closes every open connection at once and refuses new ones until [`Proxy::restore`].
    pub async fn cut(&self) {
        self.up.store(false, Ordering::Release);
        self.cuts.fetch_add(1, Ordering::Relaxed);
        self.connections.lock().await.abort_all();
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, Ordering::Release);
    }

    /// How often [`Proxy::cut`] was called.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut connections) = self.connections.try_lock() {
            connections.abort_all();
        }
    }
}
