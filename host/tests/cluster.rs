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

/// The `event_broker` section of a cluster on an isolated NATS namespace, and a tear-down
/// that deletes it; `None` after a loud skip when NATS is unreachable.
fn nats_cluster() -> Option<(serde_json::Value, impl FnOnce())> {
    use support::backends::{NATS_ADDR, nats_config};
    if !support::services::available("NATS", NATS_ADDR) {
        return None;
    }
    let config = nats_config(&support::unique_suffix());
    let section = json!({
        "provider": "nats",
        "nats": serde_json::to_value(&config.nats).expect("nats section"),
    });
    let tear_down = move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async {
            match eventbroker::provider::NatsProvider::connect(&config).await {
                Ok(provider) => {
                    if let Err(error) = provider.destroy().await {
                        eprintln!("could not delete the test stream: {error}");
                    }
                }
                Err(error) => eprintln!("could not delete the test stream: {error}"),
            }
        });
    };
    Some((section, tear_down))
}

#[test]
fn nats_two_hosts_share_work_exactly_once() {
    if let Some((broker, tear_down)) = nats_cluster() {
        support::cluster::scenarios::two_hosts_share_work_exactly_once(broker);
        tear_down();
    }
}

#[test]
fn nats_killing_a_host_mid_load_loses_nothing() {
    if let Some((broker, tear_down)) = nats_cluster() {
        support::cluster::scenarios::killing_a_host_mid_load_loses_nothing(broker);
        tear_down();
    }
}
