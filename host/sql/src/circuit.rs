//! Fail fast while the database is unreachable.
//!
//! When a write finds the database unreachable (a connection error, or no answer within the
//! write deadline), the circuit opens: every write fails at once with an error saying so,
//! instead of each waiting for its own connection timeout, and writes already waiting on the
//! database give up too ([`Circuit::opened`]). A probe task then checks the
//! database (`SELECT 1` on a pooled connection) with growing pauses, and closes the circuit
//! on the first answer. Reads and consumers are not affected: they report their own errors.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::AnyPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{NAME, Shared};
use eventbroker::provider::ProviderError;

/// First pause between probes; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between probes.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// Longest wait for one probe's answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// An outage in progress.
struct Outage {
    since: Instant,
    cause: String,
}

/// Whether writes may go to the database; see the module documentation.
pub struct Circuit {
    outage: Mutex<Option<Outage>>,
    /// Whether the circuit is open, for writes waiting on the database.
    open: watch::Sender<bool>,
}

impl Default for Circuit {
    fn default() -> Self {
        Circuit {
            outage: Mutex::new(None),
            open: watch::Sender::new(false),
        }
    }
}

impl Circuit {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Outage>> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// While the circuit is open, why writes fail: the outage's duration and cause.
    pub fn reason(&self) -> Option<String> {
        self.lock().as_ref().map(|outage| {
            format!(
                "database unreachable for {:.1}s ({}); writes fail at once until it answers \
                 again",
                outage.since.elapsed().as_secs_f64(),
                outage.cause
            )
        })
    }

    /// `Ok` while the circuit is closed; while it is open, the error every write fails with.
    ///
    /// # Errors
    /// [`ProviderError::Backend`] with [`Circuit::reason`].
    pub fn check(&self) -> Result<(), ProviderError> {
        match self.reason() {
            None => Ok(()),
            Some(reason) => Err(ProviderError::backend(NAME, reason)),
        }
    }

    /// Opens the circuit because of `cause`; returns true if it was closed (the caller then
    /// starts the probe).
    pub fn open(&self, cause: &str) -> bool {
        let mut outage = self.lock();
        if outage.is_some() {
            return false;
        }
        tracing::warn!(%cause, "database unreachable; writes fail at once until it answers");
        *outage = Some(Outage {
            since: Instant::now(),
            cause: cause.to_owned(),
        });
        self.open.send_replace(true);
        true
    }

    /// Resolves once the circuit is open (at once if it is): a write waiting on the database
    /// races this to give up as soon as another write found the database unreachable.
    pub async fn opened(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }

    /// Closes the circuit (the database answered).
    pub fn close(&self) {
        let closed = self.lock().take();
        self.open.send_replace(false);
        if let Some(outage) = closed {
            tracing::info!(
                after = ?outage.since.elapsed(),
                "database reachable again; writes resume"
            );
        }
    }
}

/// Whether `pool` answers a `SELECT 1` within `within` (at most [`PROBE_TIMEOUT`]).
pub async fn probe(pool: &AnyPool, within: Duration) -> bool {
    let answer = tokio::time::timeout(
        within.min(PROBE_TIMEOUT),
        sqlx::query("SELECT 1").execute(pool),
    )
    .await;
    matches!(answer, Ok(Ok(_)))
}

/// Opens the circuit of `shared` because of `cause` and, if it was closed, starts the task
/// that probes until the database answers.
pub fn trip(shared: &Arc<Shared>, cause: &str) {
    if shared.circuit.open(cause) {
        tokio::spawn(probe_until_reachable(
            Arc::downgrade(shared),
            shared.shutdown.clone(),
        ));
    }
}

/// Probes until the database answers, then closes the circuit; ends early on `shutdown` or
/// when the provider is gone.
async fn probe_until_reachable(shared: Weak<Shared>, shutdown: CancellationToken) {
    let mut pause = FIRST_PAUSE;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if probe(&shared.pool, PROBE_TIMEOUT).await {
            shared.circuit.close();
            return;
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Whether `error` means the database could not be reached (rather than refusing a
/// statement): I/O and TLS failures, an exhausted wait for a connection, a dead connection
/// worker, and the server's connection-exception and shutdown codes (SQLSTATE class 08,
/// 57P01–57P03).
pub fn is_unreachable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_circuit_fails_with_the_cause_until_closed() {
        let circuit = Circuit::default();
        assert!(circuit.check().is_ok());
        assert!(circuit.open("connection refused"));
        assert!(!circuit.open("again"), "opening twice starts one probe");
        let error = circuit.check().expect_err("open").to_string();
        assert!(
            error.contains("unreachable") && error.contains("connection refused"),
            "{error}"
        );
        circuit.close();
        assert!(circuit.check().is_ok());
    }

    #[tokio::test]
    async fn waiting_writes_learn_that_the_circuit_opened() {
        let circuit = std::sync::Arc::new(Circuit::default());
        let waiting = tokio::spawn({
            let circuit = circuit.clone();
            async move { circuit.opened().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        circuit.open("connection refused");
        tokio::time::timeout(Duration::from_secs(30), waiting)
            .await
            .expect("the waiting write gives up")
            .expect("task");
        // Already open: at once.
        circuit.opened().await;
    }

    #[test]
    fn connection_failures_are_told_from_refused_statements() {
        let io = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(is_unreachable(&io));
        assert!(is_unreachable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unreachable(&sqlx::Error::RowNotFound));
        assert!(!is_unreachable(&sqlx::Error::PoolClosed));
    }
}
