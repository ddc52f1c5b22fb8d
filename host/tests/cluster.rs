//! Clusters of `eventbroker serve` processes sharing one backend: work is shared, each event
//! handled once in the normal case, and a host killed with SIGKILL mid-load loses nothing.
//!
//! Each shared backend adds its two scenario tests here (see `support::cluster::scenarios`).

mod support;

use serde_json::json;
use support::cluster::{Cluster, attempts};

/// The harness itself, on one host with the embedded memory provider: every event is handled
/// exactly once and the invocation counts add up.
#[test]
fn a_single_memory_host_handles_every_event_once() {
    let cluster = Cluster::start(json!({"provider": "memory"}), 1);
    let ids = cluster.publish(50, 1_000);
    let events = cluster.wait_all_finished(0, &ids);
    for event in &events {
        assert_eq!(event["status"], "completed", "{event}");
        assert_eq!(attempts(event), 1, "{event}");
    }
    assert_eq!(cluster.invocations(0), ids.len() as u64);
}
