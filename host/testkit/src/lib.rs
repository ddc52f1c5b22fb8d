//! Shared harness of the host's integration tests: the backends under test (one isolated
//! namespace per test), waiting on conditions, and multi-host clusters of `serve` processes.

#![allow(dead_code)]

pub mod backends;
pub mod cluster;
pub mod proxy;

#[path = "../../../tests/src/services.rs"]
pub mod services;

#[path = "../../../tests/src/guests.rs"]
pub mod guests;

use std::time::Duration;

/// Generous bound for conditions that normally hold within milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `check` until it returns `Some`, panicking with `what` after [`PATIENCE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A short unique suffix for names of isolated test namespaces (tables, streams, keys).
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}
