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

/// The `event_broker` section of a Redis cluster on a stream of its own, or `None` (after a
/// loud skip) without Redis.
fn redis_cluster() -> Option<serde_json::Value> {
    let addr = std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    if !support::services::available("Redis", &addr) {
        return None;
    }
    Some(json!({
        "provider": "redis",
        "redis": {
            "url": format!("redis://{addr}/0"),
            "stream_name": format!("eb-cluster:{}", support::unique_suffix()),
            "claim_interval": "200ms",
        },
    }))
}

#[test]
fn redis_two_hosts_share_work_exactly_once() {
    if let Some(broker) = redis_cluster() {
        support::cluster::scenarios::two_hosts_share_work_exactly_once(broker);
    }
}

#[test]
fn redis_killing_a_host_mid_load_loses_nothing() {
    if let Some(broker) = redis_cluster() {
        support::cluster::scenarios::killing_a_host_mid_load_loses_nothing(broker);
    }
}
