//! Test harness of the end-to-end suite: builds the example guests and the misbehaving test
//! fixtures once per test process, starts hosts in-process on a free port, and talks to them
//! over HTTP.

pub mod guests;
pub mod host;
pub mod services;
pub mod toolchains;

/// Generous bound for conditions that normally hold within milliseconds.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

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
