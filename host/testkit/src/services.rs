//! Reachability of the external services some tests need. Without a service such a test
//! skips with a loud message; with `EVENTBROKER_REQUIRE_SERVICES=1` (set by CI) it fails.

use std::net::TcpStream;
use std::time::Duration;

/// Whether a missing service must fail the test instead of skipping it.
pub fn services_required() -> bool {
    std::env::var("EVENTBROKER_REQUIRE_SERVICES").is_ok_and(|v| v == "1" || v == "true")
}

/// True if `addr` accepts TCP connections. Otherwise prints a loud SKIPPED line and returns
/// false, or panics when services are required.
pub fn available(service: &str, addr: &str) -> bool {
    let reachable = addr
        .parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some();
    if !reachable {
        let message = format!("{service} is not reachable at {addr}");
        assert!(
            !services_required(),
            "{message} (EVENTBROKER_REQUIRE_SERVICES is set)"
        );
        eprintln!(
            "SKIPPED: {message}; this test needs it (set EVENTBROKER_REQUIRE_SERVICES=1 to make this a failure)"
        );
    }
    reachable
}
