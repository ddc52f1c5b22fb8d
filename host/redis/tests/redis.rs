//! Redis-specific behaviour of the Redis Streams provider (the shared conformance suite covers
//! the common contract): trimming never drops unfinished entries, dead letters, keep-alive
//! against claims, hand-back on close, cross-instance watchers, status indexes through every
//! transition, and reconnecting after the connection to Redis was cut.
//!
//! Needs Redis at 127.0.0.1:6379 (`REDIS_URL` overrides); skips loudly without it.

mod common;

use std::time::Duration;

use common::{Setup, redis_addr};
use eventbroker::config::BrokerConfig;
use eventbroker::provider::{
    ConsumerOptions, Delivery, EventFilter, Provider, ProviderError, StatusUpdate,
};
use eventbroker::{Event, EventSource, EventStatus};
use eventbroker_redis::{RedisConfig, RedisProvider};
use eventbroker_testkit::conformance::cases::rerun;
use eventbroker_testkit::proxy::Proxy;
use eventbroker_testkit::services;
use futures::StreamExt;

const PATIENCE: Duration = Duration::from_secs(30);

/// A broker config on a fresh stream name, or `None` (after a loud skip) without Redis.
fn config() -> Option<Setup> {
    let addr = redis_addr();
    if !services::available("Redis", &addr) {
        return None;
    }
    let broker = BrokerConfig {
        instance_id: "redis-test".into(),
        ..BrokerConfig::default()
    };
    let mut config = Setup {
        broker,
        redis: RedisConfig::default(),
    };
    config.redis.url = Some(format!("redis://{addr}/0"));
    config.redis.stream_name = format!("eb-test:{}", uuid::Uuid::new_v4().simple());
    config.redis.maintenance_interval = Duration::from_secs(3600);
    config.redis.claim_interval = Duration::from_millis(100);
    config.redis.block_time = Duration::from_millis(200);
    Some(config)
}

async fn connect(config: &Setup) -> RedisProvider {
    RedisProvider::connect(&config.redis, &config.broker)
        .await
        .expect("connect to Redis")
}

/// Deletes every key of the test's stream.
async fn cleanup(config: &Setup) {
    let Ok(client) = redis::Client::open(format!("redis://{}/0", redis_addr())) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let prefix = &config.redis.stream_name;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    keys.push(prefix.clone());
    let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
}

async fn redis_int(args: &[&str]) -> i64 {
    let client = redis::Client::open(format!("redis://{}/0", redis_addr())).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(&mut conn).await.expect("query")
}

fn options(group: &str, lease: Duration) -> ConsumerOptions {
    ConsumerOptions {
        group: group.into(),
        name: format!("c-{}", uuid::Uuid::new_v4().simple()),
        lease,
    }
}

fn event(event_type: &str) -> Event {
    Event::new(EventSource::System, event_type, "redis-test")
}

fn finished(status: EventStatus, error: Option<&str>) -> StatusUpdate {
    StatusUpdate {
        status,
        error: error.map(str::to_owned),
        retry_count: 0,
        handlers: Vec::new(),
        processed_at: Some(chrono::Utc::now()),
        completed_at: Some(chrono::Utc::now()),
    }
}

/// Fetches until `want` deliveries arrived (or panics after [`PATIENCE`]).
async fn fetch_n(consumer: &dyn eventbroker::provider::Consumer, want: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while got.len() < want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {} of {want} deliveries",
            got.len()
        );
        match tokio::time::timeout(PATIENCE, consumer.fetch(want - got.len())).await {
            Ok(Ok(batch)) => got.extend(batch),
            Ok(Err(error)) => {
                eprintln!("fetch failed (retrying): {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => panic!("fetch did not return within {PATIENCE:?}"),
        }
    }
    got
}

#[tokio::test]
async fn trimming_never_drops_unfinished_entries() {
    let Some(mut config) = config() else { return };
    config.redis.max_len = 10;
    // The provider creates its configured group at start; a group that never reads would hold
    // trimming back (by design), so the test consumes that group.
    config.redis.consumer_group = "trim-group".into();
    let provider = connect(&config).await;
    let consumer = provider
        .consume(options("trim-group", Duration::from_secs(60)))
        .await
        .unwrap();
    for _ in 0..300 {
        provider.publish(&event("a.b")).await.unwrap();
    }
    let stream = config.redis.stream_name.clone();
    provider.maintain().await.unwrap();
    assert_eq!(redis_int(&["XLEN", &stream]).await, 300, "nothing read yet");

    let deliveries = fetch_n(consumer.as_ref(), 300).await;
    provider.maintain().await.unwrap();
    assert_eq!(
        redis_int(&["XLEN", &stream]).await,
        300,
        "all pending, none may be trimmed"
    );
    for delivery in &deliveries {
        consumer
            .complete(delivery, &finished(EventStatus::Completed, None))
            .await
            .unwrap();
    }
    provider.maintain().await.unwrap();
    let left = redis_int(&["XLEN", &stream]).await;
    assert!(left < 300, "finished entries are trimmed ({left} left)");
    // The records stay, independent of the stream.
    let done = provider
        .list(&EventFilter {
            status: Some(EventStatus::Completed),
            limit: Some(1000),
            ..EventFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(done.len(), 300);
    consumer.close().await;
    provider.close().await;
    cleanup(&config).await;
}

#[tokio::test]
async fn failed_events_become_dead_letters_and_requeue_moves_them_back() {
    let Some(mut config) = config() else { return };
    // The provider's own group (whose state `get` and `requeue` concern) is the one consumed.
    config.redis.consumer_group = "dlq".into();
    let provider = connect(&config).await;
    let consumer = provider
        .consume(options("dlq", Duration::from_secs(60)))
        .await
        .unwrap();
    let e = event("orders.create");
    provider.publish(&e).await.unwrap();
    let delivery = fetch_n(consumer.as_ref(), 1).await.remove(0);
    let stats = provider.stats().await.unwrap();
    assert_eq!(stats.backend["group.dlq.pending"], 1, "{stats:?}");
    consumer
        .complete(&delivery, &finished(EventStatus::Failed, Some("boom")))
        .await
        .unwrap();
    let dead = format!("{}:dead", config.redis.stream_name);
    assert_eq!(redis_int(&["XLEN", &dead]).await, 1);
    let stored = provider.get(&e.id).await.unwrap().expect("stored");
    assert_eq!(stored.status, EventStatus::Failed);
    assert_eq!(stored.error.as_deref(), Some("boom"));

    let pending = rerun();
    provider.requeue(&e.id, &pending).await.unwrap();
    assert_eq!(redis_int(&["XLEN", &dead]).await, 0, "dead letter removed");
    // Pending and not handed out yet: a second re-run is accepted and adds no second entry.
    provider.requeue(&e.id, &pending).await.unwrap();
    let stream = config.redis.stream_name.as_str();
    assert_eq!(
        redis_int(&["XLEN", stream]).await,
        2,
        "publish and one re-run"
    );
    let delivery = fetch_n(consumer.as_ref(), 1).await.remove(0);
    assert_eq!(delivery.event.id, e.id);
    assert!(delivery.processing_recorded, "the claim records the mark");
    // Held by a live consumer (and `processing` since its claim): refused.
    let again = provider.requeue(&e.id, &pending).await.unwrap_err();
    assert!(
        matches!(
            again,
            ProviderError::InvalidState {
                status: EventStatus::Processing,
                ..
            }
        ),
        "{again:?}"
    );
    consumer
        .complete(&delivery, &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    consumer.close().await;
    provider.close().await;
    cleanup(&config).await;
}

/// (Keep-alive holding the lease is a conformance case.)
#[tokio::test]
async fn a_silent_consumer_is_claimed_and_cannot_acknowledge_any_more() {
    let Some(config) = config() else { return };
    let provider = connect(&config).await;
    let lease = Duration::from_millis(300);
    let a = provider.consume(options("claims", lease)).await.unwrap();
    let b = provider.consume(options("claims", lease)).await.unwrap();
    let e = event("a.b");
    provider.publish(&e).await.unwrap();
    let held = fetch_n(a.as_ref(), 1).await.remove(0);

    // A goes silent: B claims it after the idle threshold; A can no longer acknowledge it.
    let claimed = fetch_n(b.as_ref(), 1).await.remove(0);
    assert_eq!(claimed.event.id, e.id);
    assert!(claimed.delivery_count >= 2, "{}", claimed.delivery_count);
    assert!(a.keep_alive(&held).await.is_err());
    assert!(
        a.complete(&held, &finished(EventStatus::Completed, None))
            .await
            .is_err()
    );
    b.complete(&claimed, &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    a.close().await;
    b.close().await;
    provider.close().await;
    cleanup(&config).await;
}

#[tokio::test]
async fn closing_hands_back_deliveries_at_once() {
    let Some(config) = config() else { return };
    let provider = connect(&config).await;
    // A lease far longer than the test's patience: only the hand-back can redeliver in time.
    let lease = Duration::from_secs(600);
    let a = provider.consume(options("handback", lease)).await.unwrap();
    for _ in 0..5 {
        provider.publish(&event("a.b")).await.unwrap();
    }
    let held = fetch_n(a.as_ref(), 5).await;
    a.close().await;
    a.close().await;
    assert!(
        a.fetch(1).await.unwrap().is_empty(),
        "closed consumer fetches nothing"
    );
    let b = provider.consume(options("handback", lease)).await.unwrap();
    let again = fetch_n(b.as_ref(), 5).await;
    let mut first: Vec<_> = held.iter().map(|d| d.event.id.clone()).collect();
    let mut second: Vec<_> = again.iter().map(|d| d.event.id.clone()).collect();
    first.sort();
    second.sort();
    assert_eq!(first, second);
    assert!(
        again.iter().all(|d| d.delivery_count == 1),
        "hand-back is not counted"
    );
    b.close().await;
    provider.close().await;
    cleanup(&config).await;
}

#[tokio::test]
async fn delayed_retry_is_redelivered_to_its_group_only() {
    let Some(config) = config() else { return };
    let provider = connect(&config).await;
    let g1 = provider
        .consume(options("g1", Duration::from_secs(60)))
        .await
        .unwrap();
    let g2 = provider
        .consume(options("g2", Duration::from_secs(60)))
        .await
        .unwrap();
    let e = event("a.b");
    provider.publish(&e).await.unwrap();
    let first = fetch_n(g1.as_ref(), 1).await.remove(0);
    let other = fetch_n(g2.as_ref(), 1).await.remove(0);
    let mut update = finished(EventStatus::Pending, Some("try again"));
    update.completed_at = None;
    update.retry_count = 1;
    g1.retry(&first, &update, Duration::from_millis(300))
        .await
        .unwrap();
    let second = fetch_n(g1.as_ref(), 1).await.remove(0);
    assert_eq!(second.event.id, e.id);
    assert_eq!(second.delivery_count, 2);
    assert_eq!(second.event.retry_count, 1);
    g2.complete(&other, &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    // g2 never sees g1's redelivery.
    let nothing = tokio::time::timeout(Duration::from_millis(500), g2.fetch(1)).await;
    assert!(
        nothing.is_err()
            || nothing
                .as_ref()
                .is_ok_and(|r| r.as_ref().is_ok_and(Vec::is_empty)),
        "{nothing:?}"
    );
    g1.complete(&second, &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    g1.close().await;
    g2.close().await;
    provider.close().await;
    cleanup(&config).await;
}

#[tokio::test]
async fn watchers_see_events_of_other_instances() {
    let Some(config) = config() else { return };
    let one = connect(&config).await;
    let two = connect(&config).await;
    let mut watcher = one.stream(&"orders.>".parse().unwrap()).await.unwrap();
    two.publish(&event("users.create")).await.unwrap();
    let e = event("orders.create").with_payload(serde_json::json!({"n": 1}));
    two.publish(&e).await.unwrap();
    let seen = tokio::time::timeout(PATIENCE, watcher.next())
        .await
        .expect("watcher got nothing")
        .expect("stream ended")
        .expect("error item");
    assert_eq!(seen, e);
    // The claim on the other instance records `processing`; its script builds the watch
    // message (only while someone subscribes, as here).
    let consumer = two
        .consume(options(
            &config.redis.consumer_group,
            Duration::from_secs(60),
        ))
        .await
        .unwrap();
    // Both published events (the first one's type is not watched).
    let mut deliveries = fetch_n(consumer.as_ref(), 2).await;
    deliveries.sort_by_key(|d| d.event.id != e.id);
    let delivery = deliveries.remove(0);
    assert_eq!(delivery.event.id, e.id);
    assert!(delivery.processing_recorded);
    let seen = tokio::time::timeout(PATIENCE, watcher.next())
        .await
        .expect("watcher got nothing")
        .expect("stream ended")
        .expect("error item");
    assert_eq!(seen.id, e.id);
    assert_eq!(seen.status, EventStatus::Processing);
    assert_eq!(seen.processed_at, delivery.event.processed_at);
    assert_eq!(seen.payload, e.payload);
    for other in &deliveries {
        consumer
            .complete(other, &finished(EventStatus::Completed, None))
            .await
            .unwrap();
    }
    consumer
        .complete(&delivery, &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    let seen = tokio::time::timeout(PATIENCE, watcher.next())
        .await
        .expect("watcher got nothing")
        .expect("stream ended")
        .expect("error item");
    assert_eq!(seen.status, EventStatus::Completed);
    consumer.close().await;
    one.close().await;
    assert!(
        tokio::time::timeout(PATIENCE, watcher.next())
            .await
            .expect("stream did not end on close")
            .is_none()
    );
    two.close().await;
    cleanup(&config).await;
}

#[tokio::test]
async fn nothing_is_lost_when_the_connection_to_redis_is_cut() {
    let Some(mut config) = config() else { return };
    let proxy = Proxy::start(redis_addr()).await;
    config.redis.url = Some(format!("redis://127.0.0.1:{}/0", proxy.port));
    config.redis.command_timeout = Duration::from_secs(1);
    let provider = connect(&config).await;
    let consumer = provider
        .consume(options("outage", Duration::from_secs(60)))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let e = event("a.b");
        provider.publish(&e).await.unwrap();
        ids.push(e.id);
    }
    let before = fetch_n(consumer.as_ref(), 5).await;
    proxy.cut().await;
    // During the outage publishing fails with an error (never silently).
    let during = event("a.b");
    assert!(provider.publish(&during).await.is_err());
    proxy.restore().await;
    // After the outage: publish again (a publish whose reply was lost may have landed).
    let after = event("a.b");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match provider.publish(&after).await {
            Ok(()) | Err(ProviderError::Duplicate(_)) => break,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no reconnect: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    ids.push(after.id.clone());
    // The deliveries taken before the outage can still be completed.
    for delivery in &before {
        consumer
            .complete(delivery, &finished(EventStatus::Completed, None))
            .await
            .unwrap();
    }
    let rest = fetch_n(consumer.as_ref(), ids.len() - before.len()).await;
    for delivery in &rest {
        consumer
            .complete(delivery, &finished(EventStatus::Completed, None))
            .await
            .unwrap();
    }
    let mut got: Vec<_> = before
        .iter()
        .chain(&rest)
        .map(|d| d.event.id.clone())
        .collect();
    got.sort();
    ids.sort();
    assert_eq!(got, ids);
    consumer.close().await;
    provider.close().await;
    cleanup(&config).await;
}

/// `XINFO CONSUMERS` of a group: `(name, pending)`.
async fn consumers(stream: &str, group: &str) -> Vec<(String, i64)> {
    let client = redis::Client::open(format!("redis://{}/0", redis_addr())).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let reply: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(&mut conn)
        .await
        .expect("xinfo");
    reply
        .into_iter()
        .map(|c| {
            let name = c
                .get("name")
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_default();
            let pending = c
                .get("pending")
                .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
                .unwrap_or(-1);
            (name, pending)
        })
        .collect()
}

#[tokio::test]
async fn idle_consumers_are_deleted_only_when_they_hold_nothing() {
    let Some(mut config) = config() else { return };
    config.redis.consumer_idle_timeout = Duration::ZERO;
    let provider = connect(&config).await;
    let stream = config.redis.stream_name.clone();
    let lease = Duration::from_secs(600);
    let holder = provider.consume(options("idle", lease)).await.unwrap();
    let empty = provider.consume(options("idle", lease)).await.unwrap();
    provider.publish(&event("a.b")).await.unwrap();
    provider.publish(&event("a.b")).await.unwrap();
    let held = fetch_n(holder.as_ref(), 1).await.remove(0);
    // The other consumer handles one event and then holds nothing.
    let done = fetch_n(empty.as_ref(), 1).await.remove(0);
    empty
        .complete(&done, &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    assert_eq!(consumers(&stream, "idle").await.len(), 2);
    provider.maintain().await.unwrap();
    let left = consumers(&stream, "idle").await;
    assert_eq!(
        left.len(),
        1,
        "only the consumer holding an entry stays: {left:?}"
    );
    assert_eq!(left[0].1, 1);
    holder
        .complete(&held, &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    // Closing deletes the (now empty) consumer itself.
    holder.close().await;
    empty.close().await;
    assert!(consumers(&stream, "idle").await.is_empty());
    provider.close().await;
    cleanup(&config).await;
}

/// The statuses whose index (`{stream}:gs:{group}:{status}`) holds `id`.
async fn indexed_statuses(stream: &str, group: &str, id: &str) -> Vec<&'static str> {
    let client = redis::Client::open(format!("redis://{}/0", redis_addr())).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut found = Vec::new();
    for status in ["pending", "processing", "completed", "failed"] {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(format!("{stream}:gs:{group}:{status}"))
            .arg(id)
            .query_async(&mut conn)
            .await
            .expect("ZSCORE");
        if score.is_some() {
            found.push(status);
        }
    }
    found
}

/// A status change moves the event out of its old status index only (not out of every one):
/// through publish, claim, completion, failure, retry, release and re-run, each event sits in
/// exactly the index of its status in the group, and `stats` counts agree with `get`.
#[tokio::test]
async fn every_transition_leaves_each_event_in_exactly_its_status_index() {
    let Some(mut config) = config() else { return };
    config.redis.consumer_group = "g".into();
    let provider = connect(&config).await;
    let consumer = provider
        .consume(options("g", Duration::from_secs(60)))
        .await
        .unwrap();
    let stream = config.redis.stream_name.clone();
    let events: Vec<Event> = (0..4).map(|_| event("orders.create")).collect();
    for e in &events {
        provider.publish(e).await.unwrap();
    }
    let check = |stage: &'static str| {
        let (provider, stream, events) = (&provider, &stream, &events);
        async move {
            let mut counted = std::collections::BTreeMap::<String, u64>::new();
            for e in events {
                let status = provider.get(&e.id).await.unwrap().expect("stored").status;
                *counted.entry(status.to_string()).or_default() += 1;
                assert_eq!(
                    indexed_statuses(stream, "g", &e.id).await,
                    [status.to_string().as_str()],
                    "{stage}: event {} is {status}",
                    e.id
                );
            }
            let stats = provider.stats().await.unwrap();
            for (status, count) in &counted {
                assert_eq!(
                    stats.by_status.get(status),
                    Some(count),
                    "{stage}: {stats:?}"
                );
            }
        }
    };
    check("published").await;
    let mut deliveries = fetch_n(consumer.as_ref(), 4).await;
    deliveries.sort_by_key(|d| events.iter().position(|e| e.id == d.event.id));
    check("claimed").await;
    consumer
        .complete(&deliveries[0], &finished(EventStatus::Completed, None))
        .await
        .unwrap();
    consumer
        .complete(&deliveries[1], &finished(EventStatus::Failed, Some("boom")))
        .await
        .unwrap();
    let mut retried = finished(EventStatus::Pending, Some("again"));
    retried.completed_at = None;
    consumer
        .retry(&deliveries[2], &retried, Duration::from_secs(3600))
        .await
        .unwrap();
    consumer.release(&deliveries[3]).await.unwrap();
    check("completed, failed, retried, released").await;
    for e in &events[..2] {
        provider.requeue(&e.id, &rerun()).await.unwrap();
    }
    check("re-run").await;
    consumer.close().await;
    provider.close().await;
    cleanup(&config).await;
}
