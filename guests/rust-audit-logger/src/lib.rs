//! Audit logger: subscribes to every event (`*`) and writes one log line per event with its
//! type, source, user and payload size. Config: `prefix` (default `audit`).
//!
//! Build: `cargo build --release` in `guests/`; try it:
//! `eventbroker run target/wasm32-wasip2/release/rust_audit_logger.wasm --event rust-audit-logger/sample-event.json`

wit_bindgen::generate!({ path: "../../wit", world: "event-handler" });

use exports::resolvespec::eventbroker::handler::Guest;
use exports::resolvespec::eventbroker::subscriptions::Guest as Subscriptions;
use resolvespec::eventbroker::host::{config, log};
use resolvespec::eventbroker::types::{Context, Event, HandlerError, LogLevel};

struct AuditLogger;

impl Guest for AuditLogger {
    fn handle(event: Event, context: Context) -> Result<(), HandlerError> {
        let prefix = config("prefix").unwrap_or_else(|| "audit".to_owned());
        let user = event
            .user_id
            .map_or_else(|| "anonymous".to_owned(), |id| format!("user {id}"));
        log(
            LogLevel::Info,
            &format!(
                "{prefix}: {} from {:?} by {user}, {} payload bytes (attempt {})",
                event.event_type,
                event.source,
                event.payload.len(),
                context.attempt
            ),
        );
        Ok(())
    }
}

impl Subscriptions for AuditLogger {
    fn patterns() -> Vec<String> {
        vec!["*".to_owned()]
    }
}

export!(AuditLogger);
