//! Test harness of the end-to-end suite: builds the example guests and the misbehaving test
//! fixtures once per test process, starts hosts in-process on a free port, and talks to them
//! over HTTP.

pub mod guests;
pub mod host;
pub mod services;
pub mod toolchains;

/// Generous bound for conditions that normally hold within milliseconds.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

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
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
