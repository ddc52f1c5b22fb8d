//! Clusters of `eventbroker serve` processes sharing one backend: work is shared, each event
//! handled once in the normal case, and a host killed with SIGKILL mid-load loses nothing.
//!
//! Each shared backend adds its scenario tests here (see `support::cluster::scenarios`,
//! `deploys` and `keyvalue`).

mod common;

use common as support;

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

/// The examples that use grants (webhooks in three languages, the dedupe counter) under one
/// `serve` with the embedded memory provider.
#[test]
fn memory_grant_examples_under_serve() {
    support::cluster::examples::grant_examples_under_serve(json!({"provider": "memory"}));
}

/// The webhook examples with every request refused (`run --deny-net`): an error each guest
/// handles, not a trap.
#[test]
fn webhook_examples_see_a_refused_request_as_an_error() {
    support::cluster::examples::webhook_examples_see_a_refused_request_as_an_error();
}

/// The same on SQLite.
#[test]
fn sqlite_grant_examples_under_serve() {
    let dir = tempfile::tempdir().expect("temp dir");
    support::cluster::examples::grant_examples_under_serve(json!({
        "provider": "database",
        "database": {"url": format!("sqlite://{}/examples.db", dir.path().display())},
    }));
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
            "url": support::postgres_url(),
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
fn postgres_deploy_once_canary_and_rollback() {
    if let Some(broker) = postgres_broker() {
        support::cluster::deploys::deploy_once_canary_and_rollback(broker, "postgres");
    }
}

#[test]
fn postgres_two_hosts_share_key_value_state() {
    if let Some(broker) = postgres_broker() {
        support::cluster::keyvalue::two_hosts_count_each_order_once(broker);
    }
}

#[test]
fn postgres_grant_examples_under_serve() {
    if let Some(broker) = postgres_broker() {
        support::cluster::examples::grant_examples_under_serve(broker);
    }
}

#[test]
fn postgres_killing_a_host_mid_load_loses_nothing() {
    if let Some(broker) = postgres_broker() {
        support::cluster::scenarios::killing_a_host_mid_load_loses_nothing(broker);
    }
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
        support::cluster::scenarios::two_hosts_share_work_exactly_once(broker.clone());
        delete_redis_keys(&broker);
    }
}

#[test]
fn redis_deploy_once_canary_and_rollback() {
    if let Some(broker) = redis_cluster() {
        support::cluster::deploys::deploy_once_canary_and_rollback(broker.clone(), "redis");
        delete_redis_keys(&broker);
    }
}

#[test]
fn redis_two_hosts_share_key_value_state() {
    if let Some(broker) = redis_cluster() {
        support::cluster::keyvalue::two_hosts_count_each_order_once(broker.clone());
        delete_redis_keys(&broker);
    }
}

#[test]
fn redis_grant_examples_under_serve() {
    if let Some(broker) = redis_cluster() {
        support::cluster::examples::grant_examples_under_serve(broker.clone());
        delete_redis_keys(&broker);
    }
}

#[test]
fn redis_killing_a_host_mid_load_loses_nothing() {
    if let Some(broker) = redis_cluster() {
        support::cluster::scenarios::killing_a_host_mid_load_loses_nothing(broker.clone());
        delete_redis_keys(&broker);
    }
}

/// Deletes the keys of a finished Redis cluster test (its stream name is the key prefix).
fn delete_redis_keys(broker: &serde_json::Value) {
    let (Some(url), Some(prefix)) = (
        broker["redis"]["url"].as_str(),
        broker["redis"]["stream_name"].as_str(),
    ) else {
        return;
    };
    let Ok(mut conn) = redis::Client::open(url).and_then(|c| c.get_connection()) else {
        return;
    };
    let keys: Vec<String> =
        match redis::Commands::scan_match::<_, String>(&mut conn, format!("{prefix}*")) {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
    for chunk in keys.chunks(500) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
    }
}

/// A TCP proxy to Redis (threads, blocking I/O) whose connections can be cut and refused for
/// a while, to simulate a Redis outage without disturbing other tests' connections.
struct Proxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(target: String) -> Proxy {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (up2, open2) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = TcpStream::connect(&target) else {
                    continue;
                };
                // Registered under the lock `cut` takes, so no connection outlives a cut.
                let Ok(mut list) = open2.lock() else { continue };
                if !up2.load(Ordering::Acquire) {
                    let _ = inbound.shutdown(Shutdown::Both);
                    let _ = outbound.shutdown(Shutdown::Both);
                    continue;
                }
                list.extend(inbound.try_clone());
                list.extend(outbound.try_clone());
                drop(list);
                let pairs = [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ];
                for pair in pairs {
                    if let (Ok(mut from), Ok(mut to)) = pair {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(Shutdown::Both);
                            let _ = from.shutdown(Shutdown::Both);
                        });
                    }
                }
            }
        });
        Proxy { port, up, open }
    }

    /// Cuts every open connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::Release);
        if let Ok(mut list) = self.open.lock() {
            for stream in list.drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Two hosts under load lose their Redis connections (cut and refused for a moment); after
/// they reconnect, every event is completed: nothing published before the outage is lost.
#[test]
fn redis_outage_mid_load_loses_nothing() {
    let Some(mut broker) = redis_cluster() else {
        return;
    };
    let addr = std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let proxy = Proxy::start(addr);
    broker["redis"]["url"] = json!(format!("redis://127.0.0.1:{}/0", proxy.port));
    broker["redis"]["command_timeout"] = json!("1s");
    let cluster = Cluster::start(broker.clone(), 2);
    // Few, slow events: most are still queued or running when the connections drop.
    let ids = cluster.publish(40, 300_000_000);
    proxy.cut();
    eprintln!(
        "outage starts after {} + {} invocations",
        cluster.invocations(0),
        cluster.invocations(1)
    );
    // The outage lasts a moment (hosts keep working on what they hold, and fail to record it).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    proxy.restore();
    let events = cluster.wait_all_finished(1, &ids);
    for event in &events {
        assert_eq!(event["status"], "completed", "{event}");
        assert!(attempts(event) >= 1, "{event}");
    }
    let repeated = events.iter().filter(|e| attempts(e) > 1).count();
    eprintln!(
        "{repeated} events ran more than once (their outcome could not be recorded during the outage)"
    );
    drop(cluster);
    broker["redis"]["url"] = json!(format!(
        "redis://{}/0",
        std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into())
    ));
    delete_redis_keys(&broker);
}

/// The `event_broker` section of a cluster on an isolated NATS namespace, and a tear-down
/// that deletes it; `None` after a loud skip when NATS is unreachable.
fn nats_cluster() -> Option<(serde_json::Value, impl FnOnce())> {
    if !support::services::available("NATS", support::NATS_ADDR) {
        return None;
    }
    let nats = support::nats_section(&support::unique_suffix());
    let section = json!({
        "provider": "nats",
        "nats": serde_json::to_value(&nats).expect("nats section"),
    });
    let tear_down = move || support::delete_nats_namespace(&nats);
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
fn nats_deploy_once_canary_and_rollback() {
    if let Some((broker, tear_down)) = nats_cluster() {
        support::cluster::deploys::deploy_once_canary_and_rollback(broker, "nats");
        tear_down();
    }
}

#[test]
fn nats_two_hosts_share_key_value_state() {
    if let Some((broker, tear_down)) = nats_cluster() {
        support::cluster::keyvalue::two_hosts_count_each_order_once(broker);
        tear_down();
    }
}

#[test]
fn nats_grant_examples_under_serve() {
    if let Some((broker, tear_down)) = nats_cluster() {
        support::cluster::examples::grant_examples_under_serve(broker);
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
