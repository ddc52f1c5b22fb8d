//! Dedupe counter: counts events per type, counting each value of a payload field (its
//! `[config] dedupe_key`, default `id`) once, however often it is delivered or published
//! again, on any host of a cluster. State lives in two `wasi:keyvalue` buckets its manifest
//! grants: `dedupe` (one key per value seen) and `counts` (one counter per event type).
//!
//! The duplicate check is one atomic `increment` of the value's key in `dedupe`: the first
//! delivery anywhere gets 1, every later one more, with no read-then-write race between hosts.
//! An event without the field is counted every time. Each counted event publishes
//! `stats.counted` with `{"type": <event type>, "count": <the new count>}`; a duplicate
//! publishes nothing (the log says why).
//!
//! Build: `cargo build --release` in `guests/`; try it (the state kept in `kv.json`):
//! `eventbroker run target/wasm32-wasip2/release/rust_dedupe_counter.wasm --manifest rust-dedupe-counter/manifest.toml --event rust-dedupe-counter/sample-event.json --kv kv.json`

wit_bindgen::generate!({
    path: "../../wit",
    world: "stateful-handler",
    // The standard wasi:keyvalue interfaces are generated here too.
    generate_all,
});

use exports::resolvespec::eventbroker::handler::Guest;
use exports::resolvespec::eventbroker::subscriptions::Guest as Subscriptions;
use resolvespec::eventbroker::host::{config, log, publish};
use resolvespec::eventbroker::types::{Context, Event, EventDraft, HandlerError, LogLevel};
use serde_json::{Value, json};
use wasi::keyvalue::{atomics, store};

struct DedupeCounter;

/// A key-value failure: the store was out of reach or refused (quota): worth a retry.
fn retry(what: &str, error: store::Error) -> HandlerError {
    let reason = match error {
        store::Error::NoSuchStore => "no such store".to_owned(),
        store::Error::AccessDenied => {
            "access denied (is the bucket in [keyvalue] buckets?)".to_owned()
        }
        store::Error::Other(message) => message,
    };
    HandlerError::Retry(format!("{what}: {reason}"))
}

/// The dedupe key of an event: `type:value` of its payload field, when it has one.
fn dedupe_key(event: &Event) -> Option<String> {
    let field = config("dedupe_key").unwrap_or_else(|| "id".to_owned());
    let payload: Value = serde_json::from_str(&event.payload).ok()?;
    let value = match payload.get(&field)? {
        Value::String(text) => text.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    Some(format!("{}:{value}", event.event_type))
}

impl Guest for DedupeCounter {
    fn handle(event: Event, _context: Context) -> Result<(), HandlerError> {
        let dedupe_key = dedupe_key(&event);
        if let Some(key) = &dedupe_key {
            let seen = store::open("dedupe").map_err(|e| retry("open dedupe", e))?;
            let deliveries =
                atomics::increment(&seen, key, 1).map_err(|e| retry("mark as seen", e))?;
            if deliveries > 1 {
                log(
                    LogLevel::Info,
                    &format!("duplicate {key} (seen {deliveries} times): not counted"),
                );
                return Ok(());
            }
        }
        let counts = store::open("counts").map_err(|e| retry("open counts", e))?;
        match atomics::increment(&counts, &event.event_type, 1) {
            Ok(count) => {
                log(
                    LogLevel::Info,
                    &format!("{} counted: {count}", event.event_type),
                );
                let draft = EventDraft {
                    event_type: "stats.counted".to_owned(),
                    source: None,
                    payload: Some(json!({"type": event.event_type, "count": count}).to_string()),
                    user_id: None,
                    session_id: None,
                    schema: None,
                    entity: None,
                    operation: None,
                    metadata: None,
                };
                // The count is kept already: a refused publish is logged, not retried (a retry
                // would see the event as a duplicate).
                if let Err(reason) = publish(&draft) {
                    log(
                        LogLevel::Warn,
                        &format!("stats.counted not published: {reason}"),
                    );
                }
                Ok(())
            }
            Err(error) => {
                // Not counted: forget the mark so that the retry counts it.
                if let Some(key) = &dedupe_key
                    && let Ok(seen) = store::open("dedupe")
                {
                    let _ = seen.delete(key);
                }
                Err(retry("count", error))
            }
        }
    }
}

impl Subscriptions for DedupeCounter {
    fn patterns() -> Vec<String> {
        vec!["public.orders.>".to_owned()]
    }
}

export!(DedupeCounter);
