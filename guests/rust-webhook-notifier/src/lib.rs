//! Webhook notifier: POSTs every event it receives to the URL in its `[config] webhook_url`,
//! as `{"id": …, "type": …, "source": …, "payload": …}` with `content-type: application/json`,
//! through `wasi:http/outgoing-handler` (the `waki` client). The manifest's `[http] allow` must
//! admit that URL.
//!
//! A 2xx answer is success; a 5xx answer or a transport error is transient (`retry`); any other
//! answer (4xx, or a 3xx, since redirects are not followed) is `fail`.
//!
//! Build: `cargo build --release` in `guests/`; try it:
//! `eventbroker run target/wasm32-wasip2/release/rust_webhook_notifier.wasm --event rust-webhook-notifier/sample-event.json`

wit_bindgen::generate!({ path: "../../wit", world: "handler-only" });

use exports::resolvespec::eventbroker::handler::Guest;
use resolvespec::eventbroker::host::{config, log};
use resolvespec::eventbroker::types::{Context, Event, HandlerError, LogLevel, Source};
use serde_json::{Value, json};
use waki::Client;

struct WebhookNotifier;

impl Guest for WebhookNotifier {
    fn handle(event: Event, context: Context) -> Result<(), HandlerError> {
        let Some(url) = config("webhook_url") else {
            return Err(HandlerError::Fail(
                "config has no \"webhook_url\"".to_owned(),
            ));
        };
        // The payload is JSON text; keep it as a string if it somehow is not.
        let payload = serde_json::from_str(&event.payload)
            .unwrap_or_else(|_| Value::String(event.payload.clone()));
        let body = json!({
            "id": event.id,
            "type": event.event_type,
            "source": source_name(event.source),
            "payload": payload,
        });

        let response = Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .map_err(|e| {
                log(
                    LogLevel::Warn,
                    &format!(
                        "webhook {url} unreachable (attempt {}): {e}",
                        context.attempt
                    ),
                );
                HandlerError::Retry(format!("webhook unreachable: {e}"))
            })?;
        let status = response.status_code();
        match status {
            200..=299 => {
                log(
                    LogLevel::Info,
                    &format!(
                        "delivered {} {} to {url}: {status}",
                        event.event_type, event.id
                    ),
                );
                Ok(())
            }
            500..=599 => {
                log(
                    LogLevel::Warn,
                    &format!(
                        "webhook {url} answered {status} (attempt {})",
                        context.attempt
                    ),
                );
                Err(HandlerError::Retry(format!("webhook answered {status}")))
            }
            _ => Err(HandlerError::Fail(format!("webhook answered {status}"))),
        }
    }
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Database => "database",
        Source::Websocket => "websocket",
        Source::Frontend => "frontend",
        Source::System => "system",
        Source::Internal => "internal",
    }
}

export!(WebhookNotifier);
