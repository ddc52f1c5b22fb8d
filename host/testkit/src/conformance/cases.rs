//! The cases of the provider conformance suite, generic over the backend.
//!
//! Every case works in the backend's own namespace, so cases run in parallel. Timestamps of
//! the events published here are whole microseconds, the precision every backend keeps.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};
use eventbroker::event::{
    Event, EventSource, EventStatus, Failure, FailureKind, HandlerOutcome, OutcomeState,
};
use eventbroker::pattern::Pattern;
use eventbroker::provider::{
    Consumer, ConsumerOptions, Delivery, EventFilter, Provider, ProviderError, SortOrder,
    StatusUpdate,
};
use futures::StreamExt;
use serde_json::json;

use crate::backends::{Backend, OWN_GROUP, Open};
use crate::{PATIENCE, unique_suffix, wait_for};

/// The lease of consumers whose deliveries are acknowledged promptly.
const LONG_LEASE: Duration = Duration::from_secs(60);
/// The lease of consumers whose deliveries are left to expire.
const SHORT_LEASE: Duration = Duration::from_secs(1);

fn options(group: &str, lease: Duration) -> ConsumerOptions {
    ConsumerOptions {
        group: group.to_owned(),
        name: format!("consumer-{}", unique_suffix()),
        lease,
    }
}

/// An event of `event_type` with every field set, as a publisher would hand it over.
fn full_event(event_type: &str, n: usize) -> Event {
    let mut event = Event::crud(EventSource::Database, "shop", "orders", "create", "host-a")
        .with_payload(json!({"n": n, "items": [{"sku": "a-1", "qty": 2}], "note": "ünïcødé ✓"}))
        .with_metadata("user_name", json!("ada"))
        .with_metadata("roles", json!(["admin", "ops"]));
    event.event_type = event_type.to_owned();
    event.user_id = Some(42 + n as i64);
    event.session_id = format!("session-{n}");
    event.created_at = now_micros();
    event
}

fn simple_event(event_type: &str) -> Event {
    let mut event = Event::new(EventSource::System, event_type, "host-a");
    event.created_at = now_micros();
    event
}

fn now_micros() -> chrono::DateTime<Utc> {
    Utc::now()
        .duration_trunc(TimeDelta::microseconds(1))
        .unwrap_or_else(|_| Utc::now())
}

fn finished(status: EventStatus, event: &Event) -> StatusUpdate {
    StatusUpdate {
        status,
        error: (status == EventStatus::Failed).then(|| "handler failed".to_owned()),
        retry_count: event.retry_count,
        handlers: vec![HandlerOutcome {
            handler: "h".into(),
            version: Some("v1".into()),
            state: if status == EventStatus::Failed {
                OutcomeState::Failed
            } else {
                OutcomeState::Succeeded
            },
            attempts: 1,
            last_error: (status == EventStatus::Failed)
                .then(|| Failure::new(FailureKind::Fail, "boom")),
            finished_at: now_micros(),
        }],
        processed_at: Some(now_micros()),
        completed_at: Some(now_micros()),
    }
}

/// The update of a re-run (`requeue`) that keeps nothing: `pending`, no error, no retries,
/// no outcomes, no processing or completion time.
pub fn rerun() -> StatusUpdate {
    StatusUpdate {
        status: EventStatus::Pending,
        error: None,
        retry_count: 0,
        handlers: Vec::new(),
        processed_at: None,
        completed_at: None,
    }
}

fn completed(event: &Event) -> StatusUpdate {
    finished(EventStatus::Completed, event)
}

pub async fn publish_all(provider: &Arc<dyn Provider>, events: &[Event]) {
    for event in events {
        provider.publish(event).await.expect("publish");
    }
}

/// Fetches until `count` deliveries arrived (or panics after [`PATIENCE`]).
pub async fn fetch_n(consumer: &Arc<dyn Consumer>, count: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while out.len() < count {
            let batch = consumer.fetch(count - out.len()).await.expect("fetch");
            out.extend(batch);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out: {} of {count} deliveries arrived", out.len()));
    out
}

/// Fetches one delivery, or `None` if none arrives within `within`.
pub async fn fetch_within(consumer: &Arc<dyn Consumer>, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, async {
        loop {
            let mut batch = consumer.fetch(1).await.expect("fetch");
            if let Some(delivery) = batch.pop() {
                return delivery;
            }
        }
    })
    .await
    .ok()
}

pub async fn status_of(provider: &Arc<dyn Provider>, id: &str) -> Option<EventStatus> {
    provider.get(id).await.expect("get").map(|e| e.status)
}

/// Asserts the fields a publisher set survived storage and delivery.
fn assert_same_event(got: &Event, want: &Event) {
    assert_eq!(got.id, want.id);
    assert_eq!(got.source, want.source, "source of {}", want.id);
    assert_eq!(got.event_type, want.event_type, "type of {}", want.id);
    assert_eq!(got.payload, want.payload, "payload of {}", want.id);
    assert_eq!(got.user_id, want.user_id, "user_id of {}", want.id);
    assert_eq!(got.session_id, want.session_id, "session_id of {}", want.id);
    assert_eq!(
        got.instance_id, want.instance_id,
        "instance_id of {}",
        want.id
    );
    assert_eq!(got.schema, want.schema, "schema of {}", want.id);
    assert_eq!(got.entity, want.entity, "entity of {}", want.id);
    assert_eq!(got.operation, want.operation, "operation of {}", want.id);
    assert_eq!(got.created_at, want.created_at, "created_at of {}", want.id);
    assert_eq!(got.metadata, want.metadata, "metadata of {}", want.id);
    assert_eq!(
        got.retry_count, want.retry_count,
        "retry_count of {}",
        want.id
    );
}

pub async fn publish_then_consume_keeps_every_field(backend: &Backend) {
    let provider = backend.connect().await;
    let events: Vec<Event> = (0..50)
        .map(|n| full_event("shop.orders.create", n))
        .collect();
    publish_all(&provider, &events).await;

    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let deliveries = fetch_n(&consumer, events.len()).await;
    let by_id: HashMap<&str, &Delivery> = deliveries
        .iter()
        .map(|d| (d.event.id.as_str(), d))
        .collect();
    assert_eq!(by_id.len(), events.len(), "each event delivered once");
    for event in &events {
        let delivery = by_id[event.id.as_str()];
        assert_same_event(&delivery.event, event);
        assert_eq!(delivery.delivery_count, 1);
    }
    if provider.features().ordered {
        let got: Vec<&str> = deliveries.iter().map(|d| d.event.id.as_str()).collect();
        let want: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            got, want,
            "a single consumer receives events in publish order"
        );
    }
    for delivery in &deliveries {
        consumer
            .complete(delivery, &completed(&delivery.event))
            .await
            .expect("complete");
    }
    for event in &events {
        let stored = provider.get(&event.id).await.expect("get").expect("stored");
        assert_same_event(&stored, event);
        assert_eq!(stored.status, EventStatus::Completed);
        assert_eq!(stored.handlers.len(), 1, "handler outcomes are stored");
        assert!(stored.completed_at.is_some());
    }
    provider.close().await;
}

pub async fn many_publishers_and_consumers_deliver_each_event_once(backend: &Backend) {
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: usize = 60;
    const CONSUMERS: usize = 3;
    let provider = backend.connect().await;
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        consumers.push(
            provider
                .consume(options("workers", LONG_LEASE))
                .await
                .expect("consume"),
        );
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut readers = Vec::new();
    for consumer in &consumers {
        let consumer = consumer.clone();
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let batch = consumer.fetch(8).await.expect("fetch");
                if batch.is_empty() {
                    return;
                }
                for delivery in batch {
                    consumer
                        .complete(&delivery, &completed(&delivery.event))
                        .await
                        .expect("complete");
                    seen.lock().expect("lock").push(delivery.event.id.clone());
                }
            }
        }));
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let provider = provider.clone();
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..PER_PUBLISHER {
                let event = full_event(&format!("load.p{p}.created"), n);
                provider.publish(&event).await.expect("publish");
                ids.push(event.id);
            }
            ids
        }));
    }
    let mut published = BTreeSet::new();
    for publisher in publishers {
        published.extend(publisher.await.expect("publisher"));
    }
    wait_for("every event to be consumed", || {
        let seen = seen.clone();
        let want = published.len();
        async move { (seen.lock().expect("lock").len() >= want).then_some(()) }
    })
    .await;
    for consumer in &consumers {
        consumer.close().await;
    }
    for reader in readers {
        reader.await.expect("reader");
    }
    let seen = seen.lock().expect("lock").clone();
    let distinct: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(distinct, published, "every published event was delivered");
    assert_eq!(seen.len(), published.len(), "no event was delivered twice");
    provider.close().await;
}

/// The status a fresh delivery shows for an event that was `pending`: `processing` when the
/// backend records the mark with the claim, `pending` otherwise.
fn claimed_status(delivery: &Delivery) -> EventStatus {
    if delivery.processing_recorded {
        EventStatus::Processing
    } else {
        EventStatus::Pending
    }
}

pub async fn negative_acknowledgement_redelivers(backend: &Backend) {
    let provider = backend.connect().await;
    let event = simple_event("nack.test");
    provider.publish(&event).await.expect("publish");
    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let first = fetch_n(&consumer, 1).await.remove(0);
    assert_eq!(first.event.id, event.id);
    consumer.release(&first).await.expect("release");
    let second = fetch_within(&consumer, PATIENCE)
        .await
        .expect("a released delivery is redelivered");
    assert_eq!(second.event.id, event.id);
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(claimed_status(&second)),
        "the release returned it to pending; the new claim marks it as the backend does"
    );
    consumer
        .complete(&second, &completed(&second.event))
        .await
        .expect("complete");
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Completed)
    );
    provider.close().await;
}

pub async fn retry_redelivers_after_its_delay_with_the_update(backend: &Backend) {
    let provider = backend.connect().await;
    let event = simple_event("retry.test");
    provider.publish(&event).await.expect("publish");
    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let first = fetch_n(&consumer, 1).await.remove(0);
    let update = StatusUpdate {
        status: EventStatus::Pending,
        error: Some("transient: try later".into()),
        retry_count: 1,
        handlers: finished(EventStatus::Failed, &first.event).handlers,
        processed_at: Some(now_micros()),
        completed_at: None,
    };
    let retried_at = tokio::time::Instant::now();
    consumer
        .retry(&first, &update, Duration::from_millis(300))
        .await
        .expect("retry");
    let stored = provider.get(&event.id).await.expect("get").expect("stored");
    assert_eq!(stored.status, EventStatus::Pending);
    assert_eq!(stored.retry_count, 1);
    assert_eq!(stored.error.as_deref(), Some("transient: try later"));
    assert_eq!(stored.handlers, update.handlers);

    let second = fetch_within(&consumer, PATIENCE)
        .await
        .expect("a retried delivery is redelivered");
    assert!(
        retried_at.elapsed() >= Duration::from_millis(300),
        "a retry is not redelivered before its delay"
    );
    assert_eq!(second.event.id, event.id);
    assert_eq!(
        second.event.retry_count, 1,
        "the redelivery carries the update"
    );
    assert_eq!(second.event.handlers, update.handlers);
    assert!(second.delivery_count >= 2);
    consumer
        .complete(&second, &completed(&second.event))
        .await
        .expect("complete");
    provider.close().await;
}

pub async fn unacknowledged_delivery_is_redelivered_after_its_lease(backend: &Backend) {
    let provider = backend.connect().await;
    let event = simple_event("lease.test");
    provider.publish(&event).await.expect("publish");
    // The first consumer takes the event and then "crashes": it never acknowledges it.
    let crashed = provider
        .consume(options(OWN_GROUP, SHORT_LEASE))
        .await
        .expect("consume");
    let first = fetch_n(&crashed, 1).await.remove(0);
    assert_eq!(first.event.id, event.id);

    let survivor = provider
        .consume(options(OWN_GROUP, SHORT_LEASE))
        .await
        .expect("consume");
    let second = fetch_within(&survivor, PATIENCE)
        .await
        .expect("an expired lease is redelivered to another consumer");
    assert_eq!(second.event.id, event.id);
    assert!(second.delivery_count >= 2, "the redelivery is counted");
    survivor
        .complete(&second, &completed(&second.event))
        .await
        .expect("complete");
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Completed)
    );
    // The crashed consumer's late acknowledgement must not resurrect or fail the event.
    let _ = crashed.complete(&first, &completed(&first.event)).await;
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Completed)
    );
    drop(crashed);
    provider.close().await;
}

pub async fn keep_alive_holds_the_lease(backend: &Backend) {
    let provider = backend.connect().await;
    let event = simple_event("keepalive.test");
    provider.publish(&event).await.expect("publish");
    let lease = Duration::from_secs(2);
    let holder = provider
        .consume(options(OWN_GROUP, lease))
        .await
        .expect("consume");
    let held = fetch_n(&holder, 1).await.remove(0);
    let other = provider
        .consume(options(OWN_GROUP, lease))
        .await
        .expect("consume");

    // For three leases, the holder keeps its delivery alive at a tenth of the lease; the
    // other consumer of the group must not receive the event meanwhile.
    let keeper = {
        let holder = holder.clone();
        let held = held.clone();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + lease * 3;
            while tokio::time::Instant::now() < end {
                holder.keep_alive(&held).await.expect("keep_alive");
                tokio::time::sleep(lease / 10).await;
            }
        })
    };
    let stolen = fetch_within(&other, lease * 3).await;
    keeper.await.expect("keeper");
    assert!(
        stolen.is_none(),
        "a delivery kept alive was redelivered: {stolen:?}"
    );
    holder
        .complete(&held, &completed(&held.event))
        .await
        .expect("complete");
    provider.close().await;
}

pub async fn closing_and_reopening_consumers_loses_nothing(backend: &Backend) {
    let provider = backend.connect().await;
    let events: Vec<Event> = (0..60).map(|n| full_event("reopen.test", n)).collect();
    publish_all(&provider, &events).await;
    let want: BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    let mut done = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while done != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out: {} of {} events completed",
            done.len(),
            want.len()
        );
        // Each round: take a few, finish some, leave the rest unacknowledged, close.
        let consumer = provider
            .consume(options(OWN_GROUP, SHORT_LEASE))
            .await
            .expect("consume");
        let batch = tokio::time::timeout(Duration::from_secs(5), consumer.fetch(7))
            .await
            .unwrap_or(Ok(Vec::new()))
            .expect("fetch");
        for (i, delivery) in batch.iter().enumerate() {
            if i % 3 != 2 {
                consumer
                    .complete(delivery, &completed(&delivery.event))
                    .await
                    .expect("complete");
                done.insert(delivery.event.id.clone());
            }
        }
        consumer.close().await;
    }
    for id in &want {
        assert_eq!(status_of(&provider, id).await, Some(EventStatus::Completed));
    }
    provider.close().await;
}

pub async fn every_consumer_group_receives_every_event(backend: &Backend) {
    let provider = backend.connect().await;
    if !provider.features().consumer_groups {
        eprintln!("{}: no consumer groups claimed; skipped", backend.name);
        return;
    }
    let audit = provider
        .consume(options("audit", LONG_LEASE))
        .await
        .expect("consume");
    let billing = provider
        .consume(options("billing", LONG_LEASE))
        .await
        .expect("consume");
    let events: Vec<Event> = (0..20).map(|n| full_event("groups.test", n)).collect();
    publish_all(&provider, &events).await;
    let want: BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    // Both groups take everything before either acknowledges.
    let from_audit = fetch_n(&audit, events.len()).await;
    let from_billing = fetch_n(&billing, events.len()).await;
    for (name, deliveries) in [("audit", &from_audit), ("billing", &from_billing)] {
        let got: BTreeSet<String> = deliveries.iter().map(|d| d.event.id.clone()).collect();
        assert_eq!(got, want, "group {name} received every event");
    }
    for delivery in &from_audit {
        audit
            .complete(delivery, &completed(&delivery.event))
            .await
            .expect("complete");
    }
    for delivery in &from_billing {
        billing
            .complete(delivery, &completed(&delivery.event))
            .await
            .expect("complete");
    }
    provider.close().await;
}

pub async fn watchers_receive_only_matching_types(backend: &Backend) {
    let provider = backend.connect().await;
    let pattern = Pattern::new("shop.orders.*").expect("pattern");
    let mut watcher = provider.stream(&pattern).await.expect("stream");
    let mut everything = provider
        .stream(&Pattern::new("*").expect("pattern"))
        .await
        .expect("stream");
    let matching = [
        simple_event("shop.orders.create"),
        simple_event("shop.orders.update"),
    ];
    let other = [
        simple_event("shop.users.create"),
        simple_event("shop.orders.create.extra"),
    ];
    for event in [&matching[0], &other[0], &other[1], &matching[1]] {
        provider.publish(event).await.expect("publish");
    }
    let want: BTreeSet<String> = matching.iter().map(|e| e.id.clone()).collect();
    let mut got = BTreeSet::new();
    tokio::time::timeout(PATIENCE, async {
        while got != want {
            let event = watcher
                .next()
                .await
                .expect("the stream stays open")
                .expect("no error");
            assert!(
                pattern.matches(&event.event_type),
                "watcher got a non-matching type {}",
                event.event_type
            );
            got.insert(event.id);
        }
    })
    .await
    .expect("watcher receives the matching events");
    // The catch-all watcher sees all four.
    let all: BTreeSet<String> = matching
        .iter()
        .chain(other.iter())
        .map(|e| e.id.clone())
        .collect();
    let mut seen = BTreeSet::new();
    tokio::time::timeout(PATIENCE, async {
        while seen != all {
            let event = everything.next().await.expect("open").expect("no error");
            seen.insert(event.id);
        }
    })
    .await
    .expect("the catch-all watcher receives every event");
    provider.close().await;
}

/// A watcher that is never read holds at most `watcher_buffer` events, however many large
/// events are published: once it would hold more it is cut (its backend subscription is
/// released, so `subscribers` drops), and reading it then yields at most the buffered events,
/// `Lagged`, and the end of the stream.
pub async fn a_stalled_watcher_is_cut_and_holds_a_bounded_buffer(backend: &Backend) {
    const BUFFER: usize = 8;
    const PUBLISHED: usize = BUFFER * 6;
    let provider = backend
        .open(Open {
            watcher_buffer: Some(BUFFER),
            ..Open::default()
        })
        .await;
    let before = provider.stats().await.expect("stats").subscribers;
    let mut stalled = provider
        .stream(&Pattern::new("stall.*").expect("pattern"))
        .await
        .expect("stream");
    assert_eq!(
        provider.stats().await.expect("stats").subscribers,
        before + 1
    );
    let payload = json!({"blob": "x".repeat(100 * 1024)});
    for n in 0..PUBLISHED {
        let event = simple_event(&format!("stall.n{n}")).with_payload(payload.clone());
        provider.publish(&event).await.expect("publish");
    }
    wait_for("the stalled watcher to be cut", || async {
        let subscribers = provider.stats().await.ok()?.subscribers;
        (subscribers == before).then_some(())
    })
    .await;
    let mut buffered = 0;
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match stalled.next().await {
                Some(Ok(_)) => buffered += 1,
                other => return other,
            }
        }
    })
    .await
    .expect("the cut watcher ends");
    assert!(
        buffered <= BUFFER,
        "a stalled watcher held {buffered} events, more than watcher_buffer ({BUFFER})"
    );
    assert!(
        matches!(end, Some(Err(ProviderError::Lagged(_)))),
        "the watcher ends with Lagged, got {end:?}"
    );
    assert!(
        stalled.next().await.is_none(),
        "nothing after the lag report"
    );
    provider.close().await;
}

pub async fn store_get_update_delete(backend: &Backend) {
    let provider = backend.connect().await;
    let event = full_event("crud.test", 1);
    provider.publish(&event).await.expect("publish");
    let stored = provider.get(&event.id).await.expect("get").expect("stored");
    assert_same_event(&stored, &event);
    assert_eq!(stored.status, EventStatus::Pending);

    let processing = StatusUpdate::processing(&stored);
    provider
        .update_status(&event.id, &processing)
        .await
        .expect("update");
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Processing)
    );
    let failed = finished(EventStatus::Failed, &stored);
    provider
        .update_status(&event.id, &failed)
        .await
        .expect("update");
    let stored = provider.get(&event.id).await.expect("get").expect("stored");
    assert_eq!(stored.status, EventStatus::Failed);
    assert_eq!(stored.error.as_deref(), Some("handler failed"));
    assert_eq!(stored.handlers, failed.handlers);
    assert_eq!(stored.completed_at, failed.completed_at);
    assert_same_event(&stored, &event);

    let missing = uuid::Uuid::new_v4().to_string();
    assert!(provider.get(&missing).await.expect("get").is_none());
    assert!(matches!(
        provider.update_status(&missing, &failed).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(provider.delete(&event.id).await.expect("delete"));
    assert!(provider.get(&event.id).await.expect("get").is_none());
    assert!(!provider.delete(&event.id).await.expect("delete again"));
    provider.close().await;
}

/// Which of the listed test events a filter should return (by index and event).
type Predicate = dyn Fn(usize, &Event) -> bool;

pub async fn list_filters_order_and_paginate(backend: &Backend) {
    let provider = backend.connect().await;
    // A namespace of our own inside the backend's: a unique schema and instance.
    let tag = format!("s{}", unique_suffix());
    let instance = format!("host-{tag}");
    let base = now_micros();
    let mut events = Vec::new();
    for n in 0..12usize {
        let operation = ["create", "update", "delete"][n % 3];
        let mut event = Event::crud(
            if n % 2 == 0 {
                EventSource::Database
            } else {
                EventSource::Frontend
            },
            &tag,
            if n < 6 { "orders" } else { "users" },
            operation,
            instance.clone(),
        );
        event.user_id = Some((n % 4) as i64);
        event.session_id = format!("sess-{}", n % 2);
        event.created_at = base + TimeDelta::milliseconds(n as i64);
        if n % 5 == 2 {
            // Events 2 and 7 are derived from event 0.
            let cause = events
                .first()
                .map(|e: &Event| e.id.clone())
                .unwrap_or_default();
            event.metadata.insert(
                eventbroker::broker::CAUSED_BY_KEY.to_owned(),
                serde_json::Value::String(cause),
            );
        }
        events.push(event);
    }
    for event in &events {
        provider.publish(event).await.expect("publish");
    }
    // Two of them finished; event 0 ran a second handler too.
    let mut first = completed(&events[0]);
    let mut other = first.handlers[0].clone();
    other.handler = "second-handler".into();
    first.handlers.push(other);
    provider
        .update_status(&events[0].id, &first)
        .await
        .expect("update");
    provider
        .update_status(&events[1].id, &finished(EventStatus::Failed, &events[1]))
        .await
        .expect("update");

    let ids = |events: &[Event]| events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
    let scoped = |f: EventFilter| EventFilter {
        instance_id: Some(instance.clone()),
        ..f
    };
    let query = |f: EventFilter| {
        let provider = provider.clone();
        async move { provider.list(&f).await.expect("list") }
    };
    let expect = |pred: &dyn Fn(usize, &Event) -> bool, order: SortOrder| {
        let mut want: Vec<String> = events
            .iter()
            .enumerate()
            .filter(|(n, e)| pred(*n, e))
            .map(|(_, e)| e.id.clone())
            .collect();
        if order == SortOrder::Desc {
            want.reverse();
        }
        want
    };

    // Default: newest first.
    let all = query(scoped(EventFilter::default())).await;
    assert_eq!(ids(&all), expect(&|_, _| true, SortOrder::Desc));
    let asc = query(scoped(EventFilter {
        order: SortOrder::Asc,
        ..EventFilter::default()
    }))
    .await;
    assert_eq!(ids(&asc), expect(&|_, _| true, SortOrder::Asc));

    let cases: Vec<(&str, EventFilter, Box<Predicate>)> = vec![
        (
            "source",
            EventFilter {
                source: Some(EventSource::Frontend),
                ..EventFilter::default()
            },
            Box::new(|_, e| e.source == EventSource::Frontend),
        ),
        (
            "status",
            EventFilter::status(EventStatus::Failed),
            Box::new(|n, _| n == 1),
        ),
        (
            "pending",
            EventFilter::status(EventStatus::Pending),
            Box::new(|n, _| n >= 2),
        ),
        (
            "user_id",
            EventFilter {
                user_id: Some(3),
                ..EventFilter::default()
            },
            Box::new(|_, e| e.user_id == Some(3)),
        ),
        (
            "session_id",
            EventFilter {
                session_id: Some("sess-1".into()),
                ..EventFilter::default()
            },
            Box::new(|_, e| e.session_id == "sess-1"),
        ),
        (
            "schema",
            EventFilter {
                schema: Some(tag.clone()),
                ..EventFilter::default()
            },
            Box::new(|_, _| true),
        ),
        (
            "entity",
            EventFilter {
                entity: Some("users".into()),
                ..EventFilter::default()
            },
            Box::new(|_, e| e.entity == "users"),
        ),
        (
            "operation",
            EventFilter {
                operation: Some("update".into()),
                ..EventFilter::default()
            },
            Box::new(|_, e| e.operation == "update"),
        ),
        (
            "type pattern",
            EventFilter {
                type_pattern: Some(Pattern::new(&format!("{tag}.orders.*")).expect("pattern")),
                ..EventFilter::default()
            },
            Box::new(|_, e| e.entity == "orders"),
        ),
        (
            "type pattern with >",
            EventFilter {
                type_pattern: Some(Pattern::new(&format!("{tag}.>")).expect("pattern")),
                ..EventFilter::default()
            },
            Box::new(|_, _| true),
        ),
        (
            "handler",
            EventFilter {
                handler: Some("second-handler".into()),
                ..EventFilter::default()
            },
            Box::new(|n, _| n == 0),
        ),
        (
            "handler shared by two outcomes",
            EventFilter {
                handler: Some("h".into()),
                ..EventFilter::default()
            },
            Box::new(|n, _| n <= 1),
        ),
        (
            "caused_by",
            EventFilter {
                caused_by: Some(events[0].id.clone()),
                ..EventFilter::default()
            },
            Box::new(|n, _| n % 5 == 2),
        ),
        (
            "created range",
            EventFilter {
                created_after: Some(base + TimeDelta::milliseconds(3)),
                created_before: Some(base + TimeDelta::milliseconds(7)),
                ..EventFilter::default()
            },
            Box::new(|n, _| (3..7).contains(&n)),
        ),
        (
            "combined",
            EventFilter {
                source: Some(EventSource::Database),
                entity: Some("orders".into()),
                status: Some(EventStatus::Pending),
                ..EventFilter::default()
            },
            Box::new(|n, e| e.source == EventSource::Database && (2..6).contains(&n)),
        ),
    ];
    for (name, filter, pred) in cases {
        let got = query(scoped(filter)).await;
        assert_eq!(ids(&got), expect(&*pred, SortOrder::Desc), "filter {name}");
    }
    let other_host = query(EventFilter {
        instance_id: Some(format!("{instance}-other")),
        ..EventFilter::default()
    })
    .await;
    assert!(other_host.is_empty(), "instance_id filter");

    // Pagination.
    let desc = expect(&|_, _| true, SortOrder::Desc);
    let page = |offset: usize, limit: usize, order: SortOrder| {
        scoped(EventFilter {
            offset,
            limit: Some(limit),
            order,
            ..EventFilter::default()
        })
    };
    assert_eq!(ids(&query(page(0, 5, SortOrder::Desc)).await), desc[..5]);
    assert_eq!(ids(&query(page(5, 5, SortOrder::Desc)).await), desc[5..10]);
    assert_eq!(ids(&query(page(10, 5, SortOrder::Desc)).await), desc[10..]);
    assert!(query(page(12, 5, SortOrder::Desc)).await.is_empty());
    assert!(query(page(1000, 5, SortOrder::Asc)).await.is_empty());
    let asc = expect(&|_, _| true, SortOrder::Asc);
    assert_eq!(ids(&query(page(4, 3, SortOrder::Asc)).await), asc[4..7]);
    provider.close().await;
}

pub async fn concurrent_publishers_while_consuming_skip_nothing(backend: &Backend) {
    const PUBLISHERS: usize = 8;
    const PER_PUBLISHER: usize = 50;
    let provider = backend.connect().await;
    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let received = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u32>::new()));
    let reader = {
        let consumer = consumer.clone();
        let received = received.clone();
        tokio::spawn(async move {
            loop {
                let batch = consumer.fetch(16).await.expect("fetch");
                if batch.is_empty() {
                    return;
                }
                for delivery in batch {
                    consumer
                        .complete(&delivery, &completed(&delivery.event))
                        .await
                        .expect("complete");
                    *received
                        .lock()
                        .expect("lock")
                        .entry(delivery.event.id.clone())
                        .or_default() += 1;
                }
            }
        })
    };
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let provider = provider.clone();
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..PER_PUBLISHER {
                let event = simple_event(&format!("race.p{p}.n{}", n % 3));
                provider.publish(&event).await.expect("publish");
                ids.push(event.id);
                if n % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            ids
        }));
    }
    let mut published = BTreeSet::new();
    for publisher in publishers {
        published.extend(publisher.await.expect("publisher"));
    }
    wait_for("every event to be consumed", || {
        let received = received.clone();
        let want = published.len();
        async move { (received.lock().expect("lock").len() >= want).then_some(()) }
    })
    .await;
    consumer.close().await;
    reader.await.expect("reader");
    let received = received.lock().expect("lock").clone();
    let got: BTreeSet<String> = received.keys().cloned().collect();
    assert_eq!(got, published, "no event skipped");
    assert!(
        received.values().all(|&count| count == 1),
        "no event delivered twice"
    );
    provider.close().await;
}

pub async fn requeue_makes_a_finished_event_deliverable_again(backend: &Backend) {
    let provider = backend.connect().await;
    let event = simple_event("requeue.test");
    provider.publish(&event).await.expect("publish");
    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let first = fetch_n(&consumer, 1).await.remove(0);
    let failed = finished(EventStatus::Failed, &first.event);
    consumer.complete(&first, &failed).await.expect("complete");
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Failed)
    );
    let dead = provider
        .list(&EventFilter::status(EventStatus::Failed))
        .await
        .expect("list");
    assert!(
        dead.iter().any(|e| e.id == event.id),
        "failed events are listable"
    );

    let rerun = rerun();
    provider.requeue(&event.id, &rerun).await.expect("requeue");
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Pending)
    );
    let again = fetch_within(&consumer, PATIENCE)
        .await
        .expect("a requeued event is delivered again");
    assert_eq!(again.event.id, event.id);
    assert_eq!(again.event.status, claimed_status(&again));
    // Requeueing an unfinished event is refused.
    assert!(matches!(
        provider.requeue(&event.id, &rerun).await,
        Err(ProviderError::InvalidState { .. })
    ));
    consumer
        .complete(&again, &completed(&again.event))
        .await
        .expect("complete");
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Completed)
    );
    assert!(matches!(
        provider
            .requeue(&uuid::Uuid::new_v4().to_string(), &rerun)
            .await,
        Err(ProviderError::NotFound(_))
    ));
    provider.close().await;
}

pub async fn close_is_idempotent_and_ends_streams_and_consumers(backend: &Backend) {
    let provider = backend.connect().await;
    let mut watcher = provider
        .stream(&Pattern::new("*").expect("pattern"))
        .await
        .expect("stream");
    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let pending_fetch = {
        let consumer = consumer.clone();
        tokio::spawn(async move { consumer.fetch(10).await })
    };
    provider.close().await;
    provider.close().await;
    let batch = tokio::time::timeout(PATIENCE, pending_fetch)
        .await
        .expect("a pending fetch returns when the provider closes")
        .expect("task");
    assert!(
        batch.map(|b| b.is_empty()).unwrap_or(true),
        "fetch after close returns nothing"
    );
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match watcher.next().await {
                None => return,
                Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "watcher streams end when the provider closes");
    assert!(
        provider
            .publish(&simple_event("after.close"))
            .await
            .is_err(),
        "publishing to a closed provider fails"
    );
    consumer.close().await;
    consumer.close().await;
}

pub async fn duplicate_ids_are_rejected(backend: &Backend) {
    let provider = backend.connect().await;
    let event = simple_event("dup.test");
    provider.publish(&event).await.expect("publish");
    let mut again = simple_event("dup.other");
    again.id = event.id.clone();
    assert!(matches!(
        provider.publish(&again).await,
        Err(ProviderError::Duplicate(id)) if id == event.id
    ));
    let stored = provider.get(&event.id).await.expect("get").expect("stored");
    assert_eq!(stored.event_type, "dup.test", "the first event is kept");
    provider.close().await;
}

pub async fn stats_count_events_by_status(backend: &Backend) {
    let provider = backend.connect().await;
    let before = provider.stats().await.expect("stats");
    for status in EventStatus::ALL {
        assert!(
            before.by_status.contains_key(status.as_str()),
            "stats report status {status}"
        );
    }
    let events: Vec<Event> = (0..3).map(|_| simple_event("stats.test")).collect();
    publish_all(&provider, &events).await;
    provider
        .update_status(&events[0].id, &completed(&events[0]))
        .await
        .expect("update");
    let after = provider.stats().await.expect("stats");
    assert_eq!(after.provider, provider.name());
    let grew = |status: EventStatus| {
        after.by_status[status.as_str()] as i64 - before.by_status[status.as_str()] as i64
    };
    // Each case has a namespace of its own, so the counts are exact.
    assert_eq!(grew(EventStatus::Pending), 2);
    assert_eq!(grew(EventStatus::Completed), 1);
    assert!(after.published >= before.published + 3);
    provider.close().await;
}

pub async fn a_new_provider_instance_sees_everything_of_a_closed_one(backend: &Backend) {
    let first = backend.connect().await;
    if !first.features().durable {
        eprintln!(
            "{}: not durable; restart case skipped (nothing survives the process)",
            backend.name
        );
        first.close().await;
        return;
    }
    let events: Vec<Event> = (0..30).map(|n| full_event("restart.test", n)).collect();
    publish_all(&first, &events).await;
    let consumer = first
        .consume(options(OWN_GROUP, SHORT_LEASE))
        .await
        .expect("consume");
    // Finish ten, hold five unacknowledged as the host "dies".
    let taken = fetch_n(&consumer, 15).await;
    for delivery in &taken[..10] {
        consumer
            .complete(delivery, &completed(&delivery.event))
            .await
            .expect("complete");
    }
    let done: BTreeSet<String> = taken[..10].iter().map(|d| d.event.id.clone()).collect();
    drop(consumer);
    first.close().await;

    let second = backend.connect().await;
    for event in &events {
        let stored = second.get(&event.id).await.expect("get").expect("durable");
        assert_same_event(&stored, event);
    }
    let consumer = second
        .consume(options(OWN_GROUP, SHORT_LEASE))
        .await
        .expect("consume");
    let rest = fetch_n(&consumer, events.len() - done.len()).await;
    for delivery in &rest {
        assert!(
            !done.contains(&delivery.event.id),
            "a completed event was redelivered"
        );
        consumer
            .complete(delivery, &completed(&delivery.event))
            .await
            .expect("complete");
    }
    for event in &events {
        assert_eq!(
            status_of(&second, &event.id).await,
            Some(EventStatus::Completed)
        );
    }
    second.close().await;
}

pub async fn hosts_sharing_the_backend_share_work_and_watch_each_other(backend: &Backend) {
    let host_a = backend.connect().await;
    if !host_a.features().shared {
        eprintln!("{}: not shared between hosts; case skipped", backend.name);
        host_a.close().await;
        return;
    }
    let host_b = backend.connect().await;
    let mut watch_b = host_b
        .stream(&Pattern::new("shared.>").expect("pattern"))
        .await
        .expect("stream");
    let consumer_a = host_a
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let consumer_b = host_b
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let events: Vec<Event> = (0..40)
        .map(|n| simple_event(&format!("shared.n{}", n % 4)))
        .collect();
    for (n, event) in events.iter().enumerate() {
        let host = if n % 2 == 0 { &host_a } else { &host_b };
        host.publish(event).await.expect("publish");
    }
    let want: BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    // The watcher on host B sees events published on host A too.
    let mut watched = BTreeSet::new();
    tokio::time::timeout(PATIENCE, async {
        while watched != want {
            let event = watch_b.next().await.expect("open").expect("no error");
            watched.insert(event.id);
        }
    })
    .await
    .expect("a watcher sees events published on every host");

    let seen = Arc::new(std::sync::Mutex::new(Vec::<(char, String)>::new()));
    let mut readers = Vec::new();
    for (name, consumer) in [('a', consumer_a.clone()), ('b', consumer_b.clone())] {
        let seen = seen.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let batch = consumer.fetch(4).await.expect("fetch");
                if batch.is_empty() {
                    return;
                }
                for delivery in batch {
                    consumer
                        .complete(&delivery, &completed(&delivery.event))
                        .await
                        .expect("complete");
                    seen.lock()
                        .expect("lock")
                        .push((name, delivery.event.id.clone()));
                }
            }
        }));
    }
    wait_for("both hosts to finish every event", || {
        let seen = seen.clone();
        let want = want.len();
        async move { (seen.lock().expect("lock").len() >= want).then_some(()) }
    })
    .await;
    consumer_a.close().await;
    consumer_b.close().await;
    for reader in readers {
        reader.await.expect("reader");
    }
    let seen = seen.lock().expect("lock").clone();
    let ids: BTreeSet<String> = seen.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids, want, "every event handled");
    assert_eq!(seen.len(), want.len(), "no event handled twice");
    host_a.close().await;
    host_b.close().await;
}

pub async fn ping_answers_until_closed(backend: &Backend) {
    let provider = backend.connect().await;
    provider.ping().await.expect("a connected provider answers");
    provider.close().await;
    assert!(
        matches!(provider.ping().await, Err(ProviderError::Closed)),
        "a closed provider says so"
    );
}

/// The update a handler named `handler` produces in a group: `completed` with it succeeded, or
/// `failed` with its error.
fn outcome_of(handler: &str, status: EventStatus, error: &str) -> StatusUpdate {
    let failed = status == EventStatus::Failed;
    StatusUpdate {
        status,
        error: failed.then(|| error.to_owned()),
        retry_count: 0,
        handlers: vec![HandlerOutcome {
            handler: handler.to_owned(),
            version: None,
            state: if failed {
                OutcomeState::Failed
            } else {
                OutcomeState::Succeeded
            },
            attempts: 1,
            last_error: failed.then(|| Failure::new(FailureKind::Fail, error)),
            finished_at: now_micros(),
        }],
        processed_at: Some(now_micros()),
        completed_at: Some(now_micros()),
    }
}

/// Asserts `event` is in the state `update` left it in.
fn assert_state(event: &Event, update: &StatusUpdate, what: &str) {
    assert_eq!(
        event.status, update.status,
        "{what}: status of {}",
        event.id
    );
    assert_eq!(event.error, update.error, "{what}: error of {}", event.id);
    assert_eq!(event.retry_count, update.retry_count, "{what}: retries");
    assert_eq!(event.handlers, update.handlers, "{what}: handler outcomes");
    assert_eq!(
        event.completed_at, update.completed_at,
        "{what}: completed_at"
    );
}

/// Reads `watcher` until it shows `until` (an event id) in `status`, returning every item
/// seen before it.
pub async fn watch_until(
    watcher: &mut eventbroker::provider::EventStream,
    until: &str,
    status: EventStatus,
) -> Vec<Event> {
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            let event = watcher
                .next()
                .await
                .expect("the stream stays open")
                .expect("no error");
            if event.id == until && event.status == status {
                return;
            }
            seen.push(event);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {until} to be {status}"));
    seen
}

/// A group created after another group finished the events still receives every one of them,
/// with a state of its own: the same handler name runs again in it, and what either group
/// records (`get`, `list` by status, `stats`, watchers) never changes the other's view.
pub async fn a_group_created_later_receives_every_event_with_its_own_state(backend: &Backend) {
    const N: usize = 6;
    let host_a = backend.connect_in_group("group-a").await;
    if !host_a.features().consumer_groups {
        eprintln!("{}: no consumer groups claimed; skipped", backend.name);
        host_a.close().await;
        return;
    }
    let consumer_a = host_a
        .consume(options("group-a", LONG_LEASE))
        .await
        .expect("consume");
    let events: Vec<Event> = (0..N).map(|n| full_event("groups.late", n)).collect();
    publish_all(&host_a, &events).await;
    let marker = simple_event("groups.marker");
    host_a.publish(&marker).await.expect("publish");
    let mut done_in_a = HashMap::new();
    for delivery in fetch_n(&consumer_a, N + 1).await {
        let update = outcome_of("same-handler", EventStatus::Completed, "");
        consumer_a
            .complete(&delivery, &update)
            .await
            .expect("complete");
        done_in_a.insert(delivery.event.id.clone(), update);
    }
    for event in &events {
        let seen = host_a.get(&event.id).await.expect("get").expect("stored");
        assert_state(&seen, &done_in_a[&event.id], "group-a after finishing");
    }

    // A host of a new group starts afterwards.
    let host_b = backend.connect_in_group("group-b").await;
    let mut watch_a = host_a
        .stream(&Pattern::new("groups.>").expect("pattern"))
        .await
        .expect("stream");
    let mut watch_b = host_b
        .stream(&Pattern::new("groups.>").expect("pattern"))
        .await
        .expect("stream");
    let consumer_b = host_b
        .consume(options("group-b", LONG_LEASE))
        .await
        .expect("consume");
    let mut got_b: Vec<Delivery> = fetch_n(&consumer_b, N + 1).await;
    got_b.retain(|d| d.event.id != marker.id);
    let ids: BTreeSet<String> = got_b.iter().map(|d| d.event.id.clone()).collect();
    let want: BTreeSet<String> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, want, "the late group receives every event");
    for delivery in &got_b {
        let fresh = &delivery.event;
        assert_ne!(fresh.status, EventStatus::Completed, "group-b starts fresh");
        assert_eq!(fresh.error, None, "group-b starts without an error");
        assert_eq!(fresh.retry_count, 0, "group-b starts without retries");
        assert!(
            fresh.handlers.is_empty(),
            "group-b does not see group-a's handler outcomes: {:?}",
            fresh.handlers
        );
        assert_eq!(fresh.completed_at, None);
        let seen = host_b.get(&fresh.id).await.expect("get").expect("stored");
        assert!(!seen.status.is_finished(), "group-b's view is unfinished");
    }

    // Group-b's handler of the same name runs: it succeeds for some, fails for others.
    let mut done_in_b = HashMap::new();
    for (n, delivery) in got_b.iter().enumerate() {
        let status = if n % 2 == 0 {
            EventStatus::Completed
        } else {
            EventStatus::Failed
        };
        let update = outcome_of("same-handler", status, "group-b cannot");
        consumer_b
            .complete(delivery, &update)
            .await
            .expect("complete");
        done_in_b.insert(delivery.event.id.clone(), update);
    }
    for event in &events {
        let in_a = host_a.get(&event.id).await.expect("get").expect("stored");
        assert_state(
            &in_a,
            &done_in_a[&event.id],
            "group-a after group-b finished",
        );
        assert_same_event(&in_a, event);
        let in_b = host_b.get(&event.id).await.expect("get").expect("stored");
        assert_state(&in_b, &done_in_b[&event.id], "group-b");
        assert_same_event(&in_b, event);
    }
    let failed_in_b: BTreeSet<String> = done_in_b
        .iter()
        .filter(|(_, u)| u.status == EventStatus::Failed)
        .map(|(id, _)| id.clone())
        .collect();
    let listed = |provider: Arc<dyn Provider>| async move {
        provider
            .list(&EventFilter {
                status: Some(EventStatus::Failed),
                type_pattern: Some(Pattern::new("groups.late").expect("pattern")),
                ..EventFilter::default()
            })
            .await
            .expect("list")
            .into_iter()
            .map(|e| e.id)
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        listed(host_b.clone()).await,
        failed_in_b,
        "group-b's dead letters"
    );
    assert!(
        listed(host_a.clone()).await.is_empty(),
        "group-a has no dead letters"
    );
    let stats_a = host_a.stats().await.expect("stats");
    let stats_b = host_b.stats().await.expect("stats");
    assert_eq!(stats_a.by_status["completed"], N as u64 + 1, "{stats_a:?}");
    assert_eq!(stats_a.by_status["failed"], 0, "{stats_a:?}");
    assert_eq!(
        stats_b.by_status["failed"],
        failed_in_b.len() as u64,
        "{stats_b:?}"
    );
    assert_eq!(
        stats_b.by_status["completed"],
        (N - failed_in_b.len()) as u64,
        "{stats_b:?}"
    );

    // Watchers show their own group: group-b's watcher saw group-b's outcomes; group-a's saw
    // none of them before group-a's next change (a re-run of the marker).
    let last_b = got_b.last().expect("deliveries").event.id.clone();
    let before = watch_until(&mut watch_b, &last_b, done_in_b[&last_b].status).await;
    for event in before.iter().filter(|e| want.contains(&e.id)) {
        assert!(
            !event.status.is_finished() || event.handlers == done_in_b[&event.id].handlers,
            "group-b's watcher showed another group's state: {event:?}"
        );
    }
    host_a
        .requeue(
            &marker.id,
            &outcome_of("same-handler", EventStatus::Pending, ""),
        )
        .await
        .expect("requeue");
    let before = watch_until(&mut watch_a, &marker.id, EventStatus::Pending).await;
    for event in before.iter().filter(|e| want.contains(&e.id)) {
        assert_state(event, &done_in_a[&event.id], "group-a's watcher");
    }
    let again = fetch_n(&consumer_a, 1).await.remove(0);
    assert_eq!(
        again.event.id, marker.id,
        "group-a's re-run goes to group-a"
    );
    consumer_a
        .complete(&again, &completed(&again.event))
        .await
        .expect("complete");
    host_a.close().await;
    host_b.close().await;
}

/// The same event retried, failed and re-run in one group stays completed in the other, and a
/// failure in the other leaves the first one's completion alone.
pub async fn a_retry_or_failure_in_one_group_leaves_the_other_completed(backend: &Backend) {
    let host_a = backend.connect_in_group("group-a").await;
    if !host_a.features().consumer_groups {
        eprintln!("{}: no consumer groups claimed; skipped", backend.name);
        host_a.close().await;
        return;
    }
    let host_b = backend.connect_in_group("group-b").await;
    let consumer_a = host_a
        .consume(options("group-a", LONG_LEASE))
        .await
        .expect("consume");
    let consumer_b = host_b
        .consume(options("group-b", LONG_LEASE))
        .await
        .expect("consume");
    let first = simple_event("groups.retry.first");
    let second = simple_event("groups.retry.second");
    publish_all(&host_a, &[first.clone(), second.clone()]).await;
    let by_id = |deliveries: Vec<Delivery>| -> HashMap<String, Delivery> {
        deliveries
            .into_iter()
            .map(|d| (d.event.id.clone(), d))
            .collect()
    };
    let in_a = by_id(fetch_n(&consumer_a, 2).await);
    let in_b = by_id(fetch_n(&consumer_b, 2).await);

    // First event: completed in group-a; retried, failed and re-run in group-b.
    let a_done = outcome_of("h", EventStatus::Completed, "");
    consumer_a
        .complete(&in_a[&first.id], &a_done)
        .await
        .expect("complete");
    let retry = StatusUpdate {
        status: EventStatus::Pending,
        error: Some("transient".into()),
        retry_count: 1,
        handlers: outcome_of("h", EventStatus::Failed, "transient").handlers,
        processed_at: Some(now_micros()),
        completed_at: None,
    };
    consumer_b
        .retry(&in_b[&first.id], &retry, Duration::ZERO)
        .await
        .expect("retry");
    let seen_a = host_a.get(&first.id).await.expect("get").expect("stored");
    assert_state(&seen_a, &a_done, "group-a while group-b retries");
    let seen_b = host_b.get(&first.id).await.expect("get").expect("stored");
    assert_state(&seen_b, &retry, "group-b retrying");
    let again = fetch_within(&consumer_b, PATIENCE)
        .await
        .expect("group-b's retry is redelivered to group-b");
    assert_eq!(again.event.id, first.id);
    assert_eq!(
        again.event.retry_count, 1,
        "the redelivery carries group-b's state"
    );
    let b_failed = StatusUpdate {
        retry_count: 1,
        ..outcome_of("h", EventStatus::Failed, "gave up")
    };
    consumer_b
        .complete(&again, &b_failed)
        .await
        .expect("complete");
    let seen_a = host_a.get(&first.id).await.expect("get").expect("stored");
    assert_state(&seen_a, &a_done, "group-a after group-b failed");
    host_b
        .requeue(&first.id, &outcome_of("h", EventStatus::Pending, ""))
        .await
        .expect("group-b re-runs its dead letter");
    let rerun = fetch_within(&consumer_b, PATIENCE)
        .await
        .expect("group-b's re-run is delivered to group-b");
    assert_eq!(rerun.event.id, first.id);
    let seen_a = host_a.get(&first.id).await.expect("get").expect("stored");
    assert_state(&seen_a, &a_done, "group-a while group-b re-runs");
    let b_done = outcome_of("h", EventStatus::Completed, "");
    consumer_b
        .complete(&rerun, &b_done)
        .await
        .expect("complete");

    // Second event: failed in group-a, completed in group-b.
    let a_failed = outcome_of("h", EventStatus::Failed, "group-a cannot");
    consumer_a
        .complete(&in_a[&second.id], &a_failed)
        .await
        .expect("complete");
    consumer_b
        .complete(&in_b[&second.id], &b_done)
        .await
        .expect("complete");
    for (host, id, want, what) in [
        (&host_a, &first.id, &a_done, "group-a, first"),
        (&host_b, &first.id, &b_done, "group-b, first"),
        (&host_a, &second.id, &a_failed, "group-a, second"),
        (&host_b, &second.id, &b_done, "group-b, second"),
    ] {
        let seen = host.get(id).await.expect("get").expect("stored");
        assert_state(&seen, want, what);
    }
    // Group-a's re-run of its failure leaves group-b's completion alone.
    host_a
        .requeue(&second.id, &outcome_of("h", EventStatus::Pending, ""))
        .await
        .expect("requeue");
    let rerun = fetch_within(&consumer_a, PATIENCE)
        .await
        .expect("group-a's re-run is delivered to group-a");
    assert_eq!(rerun.event.id, second.id);
    let seen_b = host_b.get(&second.id).await.expect("get").expect("stored");
    assert_state(&seen_b, &b_done, "group-b while group-a re-runs");
    consumer_a
        .complete(&rerun, &a_done)
        .await
        .expect("complete");
    host_a.close().await;
    host_b.close().await;
}

/// `requeue` (HTTP retry) also takes an event of the own group whose processing is provably
/// abandoned: its lease expired and no consumer took it again, or it was never handed out.
/// It is refused while a lease is live, the abandoned lease is revoked (its holder can no
/// longer acknowledge), and the event is delivered once, at once.
pub async fn requeue_accepts_an_event_whose_processing_was_abandoned(backend: &Backend) {
    let provider = backend.connect().await;
    let rerun = rerun();
    let held = simple_event("abandoned.lease");
    let never = simple_event("abandoned.never");
    publish_all(&provider, &[held.clone(), never.clone()]).await;

    // A consumer takes the first event, marks it processing, then dies without a word.
    let dying = provider
        .consume(options(OWN_GROUP, SHORT_LEASE))
        .await
        .expect("consume");
    let taken = fetch_n(&dying, 1).await.remove(0);
    assert_eq!(taken.event.id, held.id);
    provider
        .update_status(&held.id, &StatusUpdate::processing(&taken.event))
        .await
        .expect("processing");
    assert!(
        matches!(
            provider.requeue(&held.id, &rerun).await,
            Err(ProviderError::InvalidState { .. })
        ),
        "a live lease is not taken away"
    );
    // The second event was never handed out, yet it is marked processing (as the old sync
    // path left events).
    let stored = provider.get(&never.id).await.expect("get").expect("stored");
    provider
        .update_status(&never.id, &StatusUpdate::processing(&stored))
        .await
        .expect("processing");
    provider
        .requeue(&never.id, &rerun)
        .await
        .expect("an event nobody holds is re-run");
    assert_eq!(
        status_of(&provider, &never.id).await,
        Some(EventStatus::Pending)
    );
    wait_for("the expired lease to make the event re-runnable", || {
        let provider = provider.clone();
        let id = held.id.clone();
        let rerun = rerun.clone();
        async move {
            match provider.requeue(&id, &rerun).await {
                Ok(()) => Some(()),
                Err(ProviderError::InvalidState { .. }) => None,
                Err(error) => panic!("requeue failed: {error}"),
            }
        }
    })
    .await;
    assert!(
        dying
            .complete(&taken, &completed(&taken.event))
            .await
            .is_err(),
        "the abandoned delivery's holder can no longer acknowledge it"
    );
    assert_eq!(
        status_of(&provider, &held.id).await,
        Some(EventStatus::Pending)
    );

    // Both are delivered once: a marker published last arrives after them, with no copy of
    // either in between.
    let marker = simple_event("abandoned.marker");
    provider.publish(&marker).await.expect("publish");
    let survivor = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let mut counts: HashMap<String, usize> = HashMap::new();
    tokio::time::timeout(PATIENCE, async {
        while !counts.contains_key(&marker.id) {
            for delivery in survivor.fetch(8).await.expect("fetch") {
                survivor
                    .complete(&delivery, &completed(&delivery.event))
                    .await
                    .expect("complete");
                *counts.entry(delivery.event.id.clone()).or_default() += 1;
            }
        }
    })
    .await
    .expect("the marker arrives");
    assert_eq!(counts.get(&held.id), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&never.id), Some(&1), "{counts:?}");
    for id in [&held.id, &never.id] {
        assert_eq!(status_of(&provider, id).await, Some(EventStatus::Completed));
    }
    drop(dying);
    provider.close().await;
}

/// A delivery given back unprocessed never undoes a finished outcome: the group's state was
/// finished (here by a write outside the delivery) while a consumer held the delivery, and its
/// release leaves it finished. The rule is the core's (`release_keeps`), the same on every
/// backend.
pub async fn a_release_never_undoes_a_finished_state(backend: &Backend) {
    let provider = backend.connect().await;
    let event = simple_event("release.finished");
    provider.publish(&event).await.expect("publish");
    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let delivery = fetch_n(&consumer, 1).await.remove(0);
    assert_eq!(delivery.event.id, event.id);
    provider
        .update_status(&event.id, &completed(&event))
        .await
        .expect("finished outside the delivery");
    // A backend may refuse the release as stale; either way the outcome stays.
    let _ = consumer.release(&delivery).await;
    assert_eq!(
        status_of(&provider, &event.id).await,
        Some(EventStatus::Completed),
        "{}: a release undid a finished outcome",
        backend.name
    );
    consumer.close().await;
    provider.close().await;
}

/// A provider that records `processing` with the claim (`Delivery::processing_recorded`)
/// hands out the event in that state, shows it to queries and watchers' readers, and a
/// release returns it to `pending`; one that does not leaves the stored state alone.
pub async fn a_claim_that_records_processing_shows_it(backend: &Backend) {
    let provider = backend.connect().await;
    let mut watcher = provider
        .stream(&Pattern::new("claim.>").expect("pattern"))
        .await
        .expect("stream");
    let event = simple_event("claim.processing");
    provider.publish(&event).await.expect("publish");
    let consumer = provider
        .consume(options(OWN_GROUP, LONG_LEASE))
        .await
        .expect("consume");
    let delivery = fetch_n(&consumer, 1).await.remove(0);
    assert_eq!(delivery.event.id, event.id);
    let stored = status_of(&provider, &event.id).await;
    if delivery.processing_recorded {
        assert_eq!(
            delivery.event.status,
            EventStatus::Processing,
            "{}: the delivery shows the mark it claims to have recorded",
            backend.name
        );
        assert!(delivery.event.processed_at.is_some(), "{}", backend.name);
        assert_eq!(stored, Some(EventStatus::Processing), "{}", backend.name);
        // Watchers see the mark like any other status change.
        watch_until(&mut watcher, &event.id, EventStatus::Processing).await;
        consumer.release(&delivery).await.expect("release");
        assert_eq!(
            status_of(&provider, &event.id).await,
            Some(EventStatus::Pending),
            "{}: a released claim goes back to pending",
            backend.name
        );
    } else {
        assert_eq!(
            delivery.event.status,
            EventStatus::Pending,
            "{}",
            backend.name
        );
        assert_eq!(stored, Some(EventStatus::Pending), "{}", backend.name);
    }
    consumer.close().await;
    provider.close().await;
}
