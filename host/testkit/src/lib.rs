//! # eventbroker-testkit
//!
//! The shared harness of the workspace's tests (not published): the provider conformance
//! cases as functions every backend crate runs ([`conformance!`]), a [`backends::Backend`] a
//! backend's tests wrap their provider in, services and their loud skips ([`services`]), the
//! example guests built once per test process ([`guests`], [`toolchains`]), a TCP proxy that
//! cuts connections on demand ([`proxy`]), and waiting on conditions ([`wait_for`]).
//!
//! It depends on the core crate only (no database, Redis or NATS client): each backend's
//! tests bring their own client for cleaning up the namespaces they create.
#![deny(missing_docs)]

pub mod backends;
pub mod conformance;
pub mod gates;
pub mod guests;
pub mod memory_store;
pub mod proxy;
pub mod services;
pub mod toolchains;

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

/// The component with a custom section appended, so that its content hash (version id)
/// differs for each `n` while it behaves identically.
pub fn variant(component: &[u8], n: u32) -> Vec<u8> {
    fn leb(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"eventbroker-test-variant";
    let mut section = Vec::new();
    leb(name.len(), &mut section);
    section.extend_from_slice(name);
    section.extend_from_slice(&n.to_le_bytes());
    let mut out = component.to_vec();
    out.push(0);
    leb(section.len(), &mut out);
    out.extend_from_slice(&section);
    out
}
