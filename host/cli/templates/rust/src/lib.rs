//! The {{name}} handler: greets `payload.name`; a payload that is not a JSON object fails.

wit_bindgen::generate!({ path: "wit", world: "event-handler" });

use exports::resolvespec::eventbroker::handler::Guest;
use exports::resolvespec::eventbroker::subscriptions::Guest as Subscriptions;
use resolvespec::eventbroker::host::{config, log};
use resolvespec::eventbroker::types::{Context, Event, HandlerError, LogLevel};

struct Handler;

impl Guest for Handler {
    fn handle(event: Event, context: Context) -> Result<(), HandlerError> {
        let payload: serde_json::Value = serde_json::from_str(&event.payload)
            .map_err(|_| HandlerError::Fail("payload is not JSON".into()))?;
        let Some(payload) = payload.as_object() else {
            return Err(HandlerError::Fail("payload is not a JSON object".into()));
        };
        let name = payload
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("stranger");
        let greeting = config("greeting").unwrap_or_else(|| "hello".into());
        log(
            LogLevel::Info,
            &format!(
                "{greeting}, {name} ({} attempt {})",
                event.event_type, context.attempt
            ),
        );
        Ok(())
    }
}

impl Subscriptions for Handler {
    /// Default patterns; the manifest's `patterns` override them.
    fn patterns() -> Vec<String> {
        vec!["example.greeting.*".into()]
    }
}

export!(Handler);
