//! The whole host as a library call: provider, broker, WebAssembly handlers (loaded and
//! watched), the HTTP server, and graceful shutdown.
//!
//! [`run`] is what `eventbroker serve` calls; tests call [`Service::start`] to get the bound
//! address and a handle, then [`Service::stop`].
//!
//! # Examples
//! Starting the service from code, on a free port, and stopping it:
//! ```no_run
//! use eventbroker_server::{Config, Service};
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = Config::load(None)?;
//! config.server.listen = "127.0.0.1:0".into();
//! config.handlers.dir = "handlers".into();
//! let service = Service::start(config).await?;
//! println!("listening on http://{}", service.local_addr());
//! let report = service.stop().await?;
//! assert!(report.drained);
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::capture::{Capture, CaptureError};
use crate::config::Config;
use crate::http::wire::CheckedListener;
use crate::http::{self, AppState, PolicyError, RouterLimits, Security};
use eventbroker::broker::{Broker, BrokerError, StopReport};
use eventbroker_wasm::config::HandlerSource;
use eventbroker_wasm::{ClusterSync, HandlerSet, WasmEngine, WasmError};
use eventbroker_wasm::{Watcher, watch};

/// A running host.
pub struct Service {
    addr: SocketAddr,
    broker: Broker,
    handlers: HandlerSet,
    state: AppState,
    watcher: Option<Watcher>,
    cluster_sync: Option<ClusterSync>,
    capture: Option<Capture>,
    http_shutdown: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
}

/// Refuses a non-loopback listen address where writes would need no token, unless a proxy in
/// front is said to authenticate (`server.allow_unauthenticated`).
fn check_exposure(
    security: &Security,
    config: &Config,
    addr: SocketAddr,
) -> Result<(), ServiceError> {
    if addr.ip().is_loopback() || security.tokens.protected() || config.server.allow_unauthenticated
    {
        return Ok(());
    }
    Err(ServiceError::Insecure(addr))
}

impl Service {
    /// Builds the provider and broker from `config`, loads the handlers directory, starts the
    /// broker, starts change capture (when `capture.tables` is set), watches the directory (unless `handlers.watch` is off), and serves HTTP on
    /// `config.server.listen` (port 0 picks a free port; see [`Service::local_addr`]).
    ///
    /// # Errors
    /// [`ServiceError`] saying which part failed to start.
    pub async fn start(config: Config) -> Result<Service, ServiceError> {
        let listener = TcpListener::bind(&config.server.listen)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: config.server.listen.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServiceError::Bind {
            addr: config.server.listen.clone(),
            source,
        })?;
        let security = Security::from_config(&config.server, addr)?;
        check_exposure(&security, &config, addr)?;
        config.validate()?;
        let provider = crate::providers::connect(&config.backend, &config.event_broker)
            .await
            .map_err(BrokerError::from)?;
        let broker = Broker::new(config.event_broker.clone(), provider);
        let engine = WasmEngine::new(&config.handlers.pool, config.handlers.cache_dir())?;
        if let Some(store) = broker.provider().keyvalue() {
            engine.set_keyvalue(eventbroker_wasm::keyvalue::KeyValueBinding {
                store,
                scope: config.event_broker.consumer_group.clone(),
            })?;
        }
        let store = broker.provider().handler_store();
        let source = config.handlers.source.unwrap_or(if store.is_some() {
            HandlerSource::Both
        } else {
            HandlerSource::Directory
        });
        let handlers = match (store, source) {
            (_, HandlerSource::Directory) => {
                HandlerSet::new(engine, broker.clone(), config.handlers.clone())
            }
            (Some(store), source) => HandlerSet::clustered(
                engine,
                broker.clone(),
                config.handlers.clone(),
                store,
                source,
            ),
            (None, _) => {
                return Err(ServiceError::NoHandlerStore(broker.provider().name()));
            }
        };
        let state = AppState::new(
            broker.clone(),
            Some(handlers.clone()),
            RouterLimits {
                body_limit: config.server.body_limit.as_u64() as usize,
                upload_limit: config.server.upload_limit.as_u64() as usize,
                max_batch: config.server.max_batch,
                sse_keep_alive: config.server.sse_keep_alive,
                websocket: (&config.server.websocket).into(),
            },
            security,
        );
        // HTTP comes up first: /healthz answers and /readyz says "loading" while handlers
        // compile; publishing answers 503 until the broker runs.
        let app = http::router(state.clone());
        let http_shutdown = CancellationToken::new();
        let graceful = http_shutdown.clone();
        let http = tokio::spawn(async move {
            axum::serve(CheckedListener::new(listener), app)
                .with_graceful_shutdown(graceful.cancelled_owned())
                .await
        });
        let started = async {
            // Handlers subscribe before the pool starts, so that a backlog waiting in a durable
            // provider is not processed before its handlers exist.
            if handlers.is_clustered() {
                let start = handlers.start_cluster().await;
                tracing::info!(
                    loaded = start.loaded.len(),
                    failed = start.failed.len(),
                    published = start.published.len(),
                    "handlers loaded from the cluster handler store"
                );
            } else {
                let report = handlers.load_dir().await;
                if !report.failed.is_empty() {
                    tracing::warn!(
                        loaded = report.loaded.len(),
                        failed = report.failed.len(),
                        "some handlers could not be loaded; see the errors above and GET /v1/handlers"
                    );
                }
            }
            state.set_handlers_loaded();
            broker.start().await?;
            let cluster_sync = handlers.follow_cluster();
            let watcher = if config.handlers.watch && handlers.reads_directory() {
                Some(watch(handlers.clone(), config.handlers.debounce)?)
            } else {
                None
            };
            // Change capture starts once the broker runs: changes committed while the host
            // was down are published first.
            let capture = if config.capture.enabled() {
                match Capture::start(&config.capture, broker.clone()).await {
                    Ok(capture) => Some(capture),
                    Err(error) => {
                        let _ = broker.stop().await;
                        return Err(ServiceError::Capture(error));
                    }
                }
            } else {
                None
            };
            Ok::<_, ServiceError>((watcher, capture, cluster_sync))
        };
        let (watcher, capture, cluster_sync) = match started.await {
            Ok(started) => started,
            Err(error) => {
                http_shutdown.cancel();
                let _ = http.await;
                return Err(error);
            }
        };
        tracing::info!(%addr, provider = broker.provider().name(), "eventbroker listening");
        Ok(Service {
            addr,
            broker,
            handlers,
            state,
            watcher,
            cluster_sync,
            capture,
            http_shutdown,
            http,
        })
    }

    /// The address the HTTP server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The WebAssembly handlers.
    pub fn handlers(&self) -> &HandlerSet {
        &self.handlers
    }

    /// Graceful shutdown: publish and admin endpoints answer 503 at once, the directory watch
    /// stops, the broker drains within `shutdown_timeout` (what is left stays pending for
    /// redelivery on durable providers), then the HTTP server finishes open requests and stops.
    ///
    /// # Errors
    /// [`ServiceError`] if the broker or server failed while stopping.
    pub async fn stop(mut self) -> Result<StopReport, ServiceError> {
        self.state.stop_accepting();
        self.watcher.take();
        self.cluster_sync.take();
        if let Some(capture) = self.capture.take() {
            capture.stop().await;
        }
        let report = self.broker.stop().await?;
        self.http_shutdown.cancel();
        match self.http.await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => return Err(ServiceError::Http(source)),
            Err(join) => return Err(ServiceError::Http(std::io::Error::other(join))),
        }
        Ok(report)
    }
}

/// Runs the host until `shutdown` resolves, then stops it gracefully.
///
/// # Errors
/// [`ServiceError`] if the host fails to start or to stop cleanly.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<StopReport, ServiceError> {
    let service = Service::start(config).await?;
    shutdown.await;
    tracing::info!("shutting down: no longer accepting events, draining work");
    let report = service.stop().await?;
    if report.drained {
        tracing::info!("shutdown complete; all work drained");
    } else {
        tracing::warn!(
            released = report.released,
            unfinished = report.unfinished,
            "shutdown deadline reached; {} deliveries given back and {} accepted events unfinished (they stay pending for redelivery on durable providers)",
            report.released,
            report.unfinished
        );
    }
    Ok(report)
}

/// Why the host could not start or stop.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The broker or provider failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A non-loopback address without any token.
    #[error(
        "refusing to listen on {0} without authentication: anyone who can reach it could publish \
         events and deploy code. Set server.token (EVENTBROKER_SERVER__TOKEN) to require one token \
         for every write and read, or server.admin_token and server.publish_token for separate \
         admin and publish scopes; or listen on a loopback address such as 127.0.0.1; or set \
         server.allow_unauthenticated: true if a proxy in front of the host authenticates every request"
    )]
    Insecure(SocketAddr),
    /// `server.allowed_hosts` or `server.allowed_origins` holds an invalid entry.
    #[error(transparent)]
    Security(#[from] PolicyError),
    /// The HTTP server failed.
    #[error("HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    /// The WebAssembly engine could not be set up.
    #[error(transparent)]
    Wasm(#[from] WasmError),
    /// PostgreSQL change capture could not start.
    #[error("change capture: {0}")]
    Capture(#[source] CaptureError),
    /// `handlers.source` asks for a cluster handler store the backend does not have.
    #[error(
        "handlers.source asks for the cluster handler store, but the {0} provider has none (only \
         PostgreSQL, Redis and NATS, which a cluster shares, do); set handlers.source: directory"
    )]
    NoHandlerStore(&'static str),
    /// The configuration breaks a rule.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}
