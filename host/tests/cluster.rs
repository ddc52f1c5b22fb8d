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

/// The `event_broker` section of a PostgreSQL cluster on a table of its own, or `None` after
/// a loud skip when the server is unreachable.
fn postgres_broker() -> Option<serde_json::Value> {
    if !support::services::available("PostgreSQL", "127.0.0.1:5432") {
        return None;
    }
    Some(json!({
        "provider": "database",
        "database": {
            "url": support::backends::postgres_url(),
            "table_name": format!("cluster_{}", support::unique_suffix()),
            "poll_interval": "200ms",
            "rescue_interval": "500ms",
        },
    }))
}

#[test]
fn postgres_two_hosts_share_work_exactly_once() {
    if let Some(broker) = postgres_broker() {
        support::cluster::scenarios::two_hosts_share_work_exactly_once(broker);
    }
}

#[test]
fn postgres_killing_a_host_mid_load_loses_nothing() {
    if let Some(broker) = postgres_broker() {
        support::cluster::scenarios::killing_a_host_mid_load_loses_nothing(broker);
    }
}
