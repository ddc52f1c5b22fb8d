//! User notifier: on `public.users.create`, publishes a derived `notify.users.welcome` event
//! addressed to the new user. Config: `channel` (default `email`).
//!
//! Build: `cargo build --release` in `guests/`; try it:
//! `eventbroker run target/wasm32-wasip2/release/rust_user_notifier.wasm --event rust-user-notifier/sample-event.json`

wit_bindgen::generate!({ path: "../../wit", world: "event-handler" });

use exports::resolvespec::eventbroker::handler::Guest;
use exports::resolvespec::eventbroker::subscriptions::Guest as Subscriptions;
use resolvespec::eventbroker::host::{config, log, publish};
use resolvespec::eventbroker::types::{
    Context, Event, EventDraft, HandlerError, LogLevel, Source,
};
use serde_json::{Value, json};

struct UserNotifier;

impl Guest for UserNotifier {
    fn handle(event: Event, _context: Context) -> Result<(), HandlerError> {
        let user: Value = serde_json::from_str(&event.payload)
            .map_err(|e| HandlerError::Fail(format!("payload is not JSON: {e}")))?;
        let Some(email) = user.get("email").and_then(Value::as_str) else {
            return Err(HandlerError::Fail("payload has no \"email\"".to_owned()));
        };
        let channel = config("channel").unwrap_or_else(|| "email".to_owned());
        let payload = json!({
            "to": email,
            "channel": channel,
            "template": "welcome",
            "name": user.get("name").cloned().unwrap_or(Value::Null),
        });
        let draft = EventDraft {
            event_type: "notify.users.welcome".to_owned(),
            source: Some(Source::Internal),
            payload: Some(payload.to_string()),
            user_id: event.user_id,
            session_id: None,
            schema: None,
            entity: None,
            operation: None,
            metadata: None,
        };
        // A refused publish is transient from this handler's point of view: retry later.
        let id = publish(&draft).map_err(HandlerError::Retry)?;
        log(
            LogLevel::Info,
            &format!("queued welcome notification {id} for {email} via {channel}"),
        );
        Ok(())
    }
}

impl Subscriptions for UserNotifier {
    fn patterns() -> Vec<String> {
        vec!["public.users.create".to_owned()]
    }
}

export!(UserNotifier);
