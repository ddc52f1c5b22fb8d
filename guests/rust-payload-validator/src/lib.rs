//! Payload validator: checks that an order payload has a positive integer `quantity` and a
//! non-empty `sku`. Invalid payloads fail for good (`fail`); a payload with
//! `"simulate": "transient"` reports a transient error (`retry`), as a handler whose database
//! is briefly unreachable would. Config: `max_quantity` (default 1000).
//!
//! Build: `cargo build --release` in `guests/`; try it:
//! `eventbroker run target/wasm32-wasip2/release/rust_payload_validator.wasm --event rust-payload-validator/sample-events.jsonl`

wit_bindgen::generate!({ path: "../../wit", world: "event-handler" });

use exports::resolvespec::eventbroker::handler::Guest;
use exports::resolvespec::eventbroker::subscriptions::Guest as Subscriptions;
use resolvespec::eventbroker::host::{config, log};
use resolvespec::eventbroker::types::{Context, Event, HandlerError, LogLevel};
use serde_json::Value;

struct PayloadValidator;

impl Guest for PayloadValidator {
    fn handle(event: Event, context: Context) -> Result<(), HandlerError> {
        let payload: Value = serde_json::from_str(&event.payload)
            .map_err(|e| HandlerError::Fail(format!("payload is not JSON: {e}")))?;
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
        match payload.get("quantity").and_then(Value::as_i64) {
            Some(q) if q > 0 && q <= max_quantity => {
                log(LogLevel::Info, &format!("order line {sku} x{q} is valid"));
                Ok(())
            }
            Some(q) => Err(HandlerError::Fail(format!(
                "\"quantity\" {q} is outside 1..={max_quantity}"
            ))),
            None => Err(HandlerError::Fail(
                "\"quantity\" is missing or not an integer".to_owned(),
            )),
        }
    }
}

impl Subscriptions for PayloadValidator {
    fn patterns() -> Vec<String> {
        vec!["shop.orders.*".to_owned()]
    }
}

export!(PayloadValidator);
