//! Payload validator: validates an order line and publishes a derived `shop.orders.validated`
//! event for each valid one. It is the reference behaviour that the Python, JavaScript, C and
//! Go guests reproduce (the cross-language test in `tests/tests/languages.rs` runs
//! `sample-events.jsonl` through all of them and compares the results with this one).
//!
//! For each event:
//! 1. The payload must be a JSON object, else `fail("payload is not a JSON object")`.
//! 2. `"simulate": "transient"` stands for a briefly unreachable dependency: log a warning and
//!    return `retry("inventory service unavailable")`.
//! 3. `sku` must be a non-empty string, else `fail("\"sku\" is missing or empty")`.
//! 4. `quantity` must be a number with an integral value, else
//!    `fail("\"quantity\" is missing or not an integer")`, and lie in `1..=max_quantity`
//!    (config `max_quantity`, default 1000), else `fail("\"quantity\" Q is outside 1..=MAX")`.
//! 5. A valid line is logged and published as `shop.orders.validated` with payload
//!    `{"sku": SKU, "quantity": Q}` and the order's `user_id`; a refused publish is transient
//!    (`retry`).
//!
//! Build: `cargo build --release` in `guests/`; try it:
//! `eventbroker run target/wasm32-wasip2/release/rust_payload_validator.wasm --event rust-payload-validator/sample-events.jsonl --manifest rust-payload-validator/manifest.toml`

wit_bindgen::generate!({ path: "../../wit", world: "event-handler" });

use exports::resolvespec::eventbroker::handler::Guest;
use exports::resolvespec::eventbroker::subscriptions::Guest as Subscriptions;
use resolvespec::eventbroker::host::{config, log, publish};
use resolvespec::eventbroker::types::{
    Context, Event, EventDraft, HandlerError, LogLevel, Source,
};
use serde_json::{Map, Value, json};

/// The largest integral `f64` that converts to `i64` exactly (2^53).
const MAX_EXACT_INTEGER: f64 = 9_007_199_254_740_992.0;

struct PayloadValidator;

impl Guest for PayloadValidator {
    fn handle(event: Event, context: Context) -> Result<(), HandlerError> {
        let payload: Map<String, Value> = match serde_json::from_str(&event.payload) {
            Ok(Value::Object(object)) => object,
            _ => return Err(HandlerError::Fail("payload is not a JSON object".to_owned())),
        };
        if payload.get("simulate").and_then(Value::as_str) == Some("transient") {
            log(
                LogLevel::Warn,
                &format!("inventory service unavailable (attempt {})", context.attempt),
            );
            return Err(HandlerError::Retry(
                "inventory service unavailable".to_owned(),
            ));
        }
        let max_quantity = config("max_quantity")
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(1000);
        let sku = payload.get("sku").and_then(Value::as_str).unwrap_or("");
        if sku.is_empty() {
            return Err(HandlerError::Fail("\"sku\" is missing or empty".to_owned()));
        }
        let Some(quantity) = payload.get("quantity").and_then(integer) else {
            return Err(HandlerError::Fail(
                "\"quantity\" is missing or not an integer".to_owned(),
            ));
        };
        if !(1..=max_quantity).contains(&quantity) {
            return Err(HandlerError::Fail(format!(
                "\"quantity\" {quantity} is outside 1..={max_quantity}"
            )));
        }
        log(LogLevel::Info, &format!("order line {sku} x{quantity} is valid"));
        let draft = EventDraft {
            event_type: "shop.orders.validated".to_owned(),
            source: Some(Source::Internal),
            payload: Some(json!({ "sku": sku, "quantity": quantity }).to_string()),
            user_id: event.user_id,
            session_id: None,
            schema: None,
            entity: None,
            operation: None,
            metadata: None,
        };
        // A refused publish (budget used up, broker stopping) is transient: retry later.
        let id = publish(&draft).map_err(|e| {
            HandlerError::Retry(format!("could not publish shop.orders.validated: {e}"))
        })?;
        log(LogLevel::Info, &format!("published shop.orders.validated {id}"));
        Ok(())
    }
}

/// A JSON number with an integral value (`2` and `2.0` alike), as every language reads it.
fn integer(value: &Value) -> Option<i64> {
    if let Some(n) = value.as_i64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    (f.fract() == 0.0 && f.abs() <= MAX_EXACT_INTEGER).then_some(f as i64)
}

impl Subscriptions for PayloadValidator {
    fn patterns() -> Vec<String> {
        vec![
            "shop.orders.create".to_owned(),
            "shop.orders.update".to_owned(),
        ]
    }
}

export!(PayloadValidator);
