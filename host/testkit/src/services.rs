//! Reachability of the external services some tests need. Without a service such a test
//! skips; with `EVENTBROKER_REQUIRE_SERVICES=1` (set by CI) it fails.
//!
//! A skipped test passes as far as cargo is concerned, so every skip is also counted
//! ([`skip`]), and when the test binary exits — right under cargo's `test result:` line for
//! that binary — one line says how many of its tests skipped and why:
//!
//! ```text
//! test result: ok. 23 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.31s
//!
//! SKIPPED 23 tests of this binary, so this was not a full run: Redis is not reachable at 127.0.0.1:6379 (23)
//! ```

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::{Mutex, Once};
use std::time::Duration;

/// Skips of this test binary, by reason.
static SKIPS: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());
static REPORT_AT_EXIT: Once = Once::new();

/// Records that the running test skips because of `reason` (a missing service or tool), and
/// prints it. Fails the test instead when services are required
/// ([`services_required`]).
pub fn skip(reason: &str) {
    assert!(
        !services_required(),
        "{reason} (EVENTBROKER_REQUIRE_SERVICES is set)"
    );
    eprintln!(
        "SKIPPED: {reason}; this test needs it (set EVENTBROKER_REQUIRE_SERVICES=1 to make this a failure)"
    );
    *SKIPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(reason.to_owned())
        .or_default() += 1;
    REPORT_AT_EXIT.call_once(|| {
        // SAFETY: `report_skips` is an `extern "C"` function without arguments that does not
        // unwind (it only formats and writes to stderr), as `atexit` requires.
        unsafe {
            libc::atexit(report_skips);
        }
    });
}

/// Prints the one-line summary of this binary's skips (run at exit, after the harness's own
/// summary).
extern "C" fn report_skips() {
    let skips = match SKIPS.lock() {
        Ok(skips) => skips,
        Err(poisoned) => poisoned.into_inner(),
    };
    let total: usize = skips.values().sum();
    if total == 0 {
        return;
    }
    let reasons: Vec<String> = skips
        .iter()
        .map(|(reason, count)| format!("{reason} ({count})"))
        .collect();
    eprintln!(
        "\nSKIPPED {total} test{} of this binary, so this was not a full run: {}\n",
        if total == 1 { "" } else { "s" },
        reasons.join("; ")
    );
}

/// Whether a missing service must fail the test instead of skipping it.
pub fn services_required() -> bool {
    std::env::var("EVENTBROKER_REQUIRE_SERVICES").is_ok_and(|v| v == "1" || v == "true")
}

/// True if `addr` accepts TCP connections. Otherwise records a [`skip`] and returns false, or
/// panics when services are required.
pub fn available(service: &str, addr: &str) -> bool {
    let reachable = addr
        .parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some();
    if !reachable {
        skip(&format!("{service} is not reachable at {addr}"));
    }
    reachable
}
