//! `GET /v1/ws`: WebSocket clients publish events and follow patterns live.
//!
//! Client messages are JSON text:
//! - `{"op": "publish", "event": {…draft…}, "ref": any}` — source `websocket` (or `frontend`),
//!   the connection's session id, and `user_id` only on a connection authenticated by token;
//!   answered `{"type": "ack", "op": "publish", "ref", "id", "status"}`.
//! - `{"op": "subscribe", "pattern": "…", "ref"}` / `{"op": "unsubscribe", …}` — answered by an
//!   ack; then `{"type": "event", "subscription": pattern, "event": {…}}` as matching events are
//!   published and change status.
//! - `{"op": "ping", "ref"}` — answered `{"type": "pong"}`.
//!
//! Anything wrong is answered `{"type": "error", "code", "message", "ref"}` and the connection
//! stays open, except: a message over `max_message_size` closes it with code 1009; a client
//! that lets `outbound_buffer` messages pile up is closed with code 1008 and the reason (the
//! broker never waits for a client); when the host shuts down, 1001.
//!
//! Authentication reuses the HTTP bearer tokens: `Authorization: Bearer …`, or — because
//! browsers cannot set headers on a WebSocket — `?token=…` (never logged) or the subprotocol
//! `bearer.<token>` (offered next to `eventbroker`). Connecting needs read access; publishing
//! needs publish access. A browser may only connect from the host's own page or an origin in
//! `server.allowed_origins` (checked by the router before this handler runs).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{
    CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade,
    rejection::WebSocketUpgradeRejection,
};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::auth::{Access, Scope, authorize, bearer, challenge};
use super::config::WebSocketConfig;
use super::{ApiError, ApiQuery, AppState};
use eventbroker::broker::{BrokerError, Published};
use eventbroker::event::{EventDraft, EventSource};
use eventbroker::pattern::Pattern;
use eventbroker::provider::{EventStream, ProviderError};

/// The subprotocol the host speaks.
pub const SUBPROTOCOL: &str = "eventbroker";
/// How long a close frame may take to reach a client that stopped reading.
const CLOSE_GRACE: Duration = Duration::from_secs(30);
/// Close codes (RFC 6455).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_ERROR: u16 = 1011;

/// Per-connection limits (from `server.websocket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest client message, in bytes.
    pub max_message_size: usize,
    /// Sustained publishes per second.
    pub publish_rate: u32,
    /// Publishes allowed in a burst.
    pub publish_burst: u32,
    /// Messages queued for the client before it is disconnected as too slow.
    pub outbound_buffer: usize,
    /// Patterns one connection may follow.
    pub max_subscriptions: usize,
}

impl Default for WsLimits {
    fn default() -> Self {
        (&WebSocketConfig::default()).into()
    }
}

impl From<&WebSocketConfig> for WsLimits {
    fn from(config: &WebSocketConfig) -> Self {
        WsLimits {
            max_message_size: config.max_message_size.as_u64() as usize,
            publish_rate: config.publish_rate,
            publish_burst: config.publish_burst,
            outbound_buffer: config.outbound_buffer,
            max_subscriptions: config.max_subscriptions,
        }
    }
}

/// Query parameters of `GET /v1/ws`.
#[derive(Debug, Deserialize)]
pub struct WsQuery {
    /// A bearer token, for clients that cannot set headers (browsers).
    pub token: Option<String>,
}

/// The token offered as subprotocol `bearer.<token>`.
fn subprotocol_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|protocol| protocol.trim().strip_prefix("bearer.").map(str::to_owned))
}

/// `GET /v1/ws`: authenticates, then upgrades.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "events",
    params(("token" = Option<String>, Query, description = "Token, for browsers (prefer the subprotocol `bearer.<token>`)")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    )
)]
pub async fn ws(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<WsQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let presented = bearer(&headers)
        .map(str::to_owned)
        .or(query.token)
        .or_else(|| subprotocol_token(&headers));
    let tokens = state.tokens();
    let scope = match authorize(tokens, presented.as_deref(), Access::Read) {
        Ok(scope) => scope,
        Err(error) => return challenge(error),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "not_websocket",
                format!("GET /v1/ws is a WebSocket endpoint: {rejection}"),
            )
            .into_response();
        }
    };
    let authenticated = scope != Scope::Anonymous;
    let can_publish = authorize(tokens, presented.as_deref(), Access::Publish).is_ok();
    let limits = state.limits().websocket;
    // The protocol-level bound is a backstop; messages over the configured size get a clean
    // close with the reason (see `Connection::run`).
    let hard_limit = limits
        .max_message_size
        .saturating_mul(4)
        .saturating_add(4096);
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(hard_limit)
        .max_frame_size(hard_limit)
        .on_upgrade(move |socket| {
            let connection = Connection {
                session_id: format!("ws-{}", uuid::Uuid::new_v4()),
                authenticated,
                can_publish,
                limits,
                limiter: RateLimiter::direct(
                    Quota::per_second(
                        NonZeroU32::new(limits.publish_rate).unwrap_or(NonZeroU32::MIN),
                    )
                    .allow_burst(NonZeroU32::new(limits.publish_burst).unwrap_or(NonZeroU32::MIN)),
                ),
                state,
            };
            connection.run(socket)
        })
}

/// Why and how the host closes a connection; set once.
#[derive(Default)]
struct Closer {
    token: CancellationToken,
    frame: Mutex<Option<CloseFrame>>,
}

impl Closer {
    fn close(&self, code: u16, reason: &str) {
        let mut frame = self.frame.lock().unwrap_or_else(|p| p.into_inner());
        if frame.is_none() && !self.token.is_cancelled() {
            *frame = Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(truncate(reason, 123)),
            });
        }
        self.token.cancel();
    }
}

/// At most `max` bytes of `text`, cut at a character boundary (close reasons fit 123 bytes).
fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The sending side shared by the reader and the subscription forwarders.
#[derive(Clone)]
struct Outbound {
    tx: mpsc::Sender<Message>,
    closer: Arc<Closer>,
    state: AppState,
    capacity: usize,
}

impl Outbound {
    /// Queues a message without waiting; a full queue disconnects the client as too slow.
    /// Returns false once the connection is closing.
    fn send(&self, message: Value) -> bool {
        if self.closer.token.is_cancelled() {
            return false;
        }
        match self.tx.try_send(Message::Text(message.to_string().into())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(
                    CLOSE_POLICY,
                    "slow_client",
                    &format!(
                        "client too slow: {} messages waiting; read faster or follow fewer events",
                        self.capacity
                    ),
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn close(&self, code: u16, metric: &str, reason: &str) {
        if !self.closer.token.is_cancelled() {
            tracing::info!(code, reason, "closing WebSocket connection");
            self.state.broker().metrics().websocket_closed(metric);
        }
        self.closer.close(code, reason);
    }

    fn error(&self, r#ref: &Value, code: &str, message: impl Into<String>) {
        self.send(json!({
            "type": "error",
            "code": code,
            "message": message.into(),
            "ref": r#ref,
        }));
    }
}

/// Messages a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    Publish {
        event: Box<EventDraft>,
        #[serde(default, rename = "ref")]
        _ref: Value,
    },
    Subscribe {
        pattern: String,
        #[serde(default, rename = "ref")]
        _ref: Value,
    },
    Unsubscribe {
        pattern: String,
        #[serde(default, rename = "ref")]
        _ref: Value,
    },
    Ping {
        #[serde(default, rename = "ref")]
        _ref: Value,
    },
}

struct Connection {
    session_id: String,
    authenticated: bool,
    can_publish: bool,
    limits: WsLimits,
    limiter: DefaultDirectRateLimiter,
    state: AppState,
}

impl Connection {
    async fn run(self, socket: WebSocket) {
        let (sink, mut incoming) = socket.split();
        let (tx, rx) = mpsc::channel(self.limits.outbound_buffer);
        let closer = Arc::new(Closer::default());
        let writer = tokio::spawn(write_loop(sink, rx, closer.clone()));
        let out = Outbound {
            tx,
            closer: closer.clone(),
            state: self.state.clone(),
            capacity: self.limits.outbound_buffer,
        };
        tracing::debug!(session_id = %self.session_id, "WebSocket client connected");
        out.send(json!({
            "type": "welcome",
            "session_id": self.session_id,
            "authenticated": self.authenticated,
            "can_publish": self.can_publish,
            "limits": {
                "max_message_size": self.limits.max_message_size,
                "publish_rate": self.limits.publish_rate,
                "publish_burst": self.limits.publish_burst,
                "outbound_buffer": self.limits.outbound_buffer,
                "max_subscriptions": self.limits.max_subscriptions,
            },
        }));
        let mut subscriptions: HashMap<String, JoinHandle<()>> = HashMap::new();
        loop {
            let message = tokio::select! {
                _ = closer.token.cancelled() => break,
                message = incoming.next() => message,
            };
            let text = match message {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Err(error)) => {
                    tracing::debug!(%error, session_id = %self.session_id, "WebSocket read failed");
                    if error.to_string().contains("too long")
                        || error.to_string().contains("too big")
                    {
                        out.close(CLOSE_TOO_BIG, "message_too_big", "message too big");
                    }
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(bytes))) => {
                    if bytes.len() > self.limits.max_message_size {
                        self.too_big(&out, bytes.len());
                        break;
                    }
                    out.error(
                        &Value::Null,
                        "bad_message",
                        "binary messages are not supported; send JSON text",
                    );
                    continue;
                }
                Some(Ok(Message::Text(text))) => text,
            };
            if text.len() > self.limits.max_message_size {
                self.too_big(&out, text.len());
                break;
            }
            self.handle(text.as_str(), &out, &mut subscriptions).await;
        }
        for (_, forwarder) in subscriptions.drain() {
            forwarder.abort();
        }
        drop(out);
        if tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), writer)
            .await
            .is_err()
        {
            tracing::debug!(session_id = %self.session_id, "WebSocket writer did not finish");
        }
        tracing::debug!(session_id = %self.session_id, "WebSocket client disconnected");
    }

    fn too_big(&self, out: &Outbound, size: usize) {
        out.close(
            CLOSE_TOO_BIG,
            "message_too_big",
            &format!(
                "message of {size} bytes exceeds the limit of {} bytes",
                self.limits.max_message_size
            ),
        );
    }

    async fn handle(
        &self,
        text: &str,
        out: &Outbound,
        subscriptions: &mut HashMap<String, JoinHandle<()>>,
    ) {
        let value: Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(error) => {
                out.error(
                    &Value::Null,
                    "bad_message",
                    format!("message is not valid JSON: {error}"),
                );
                return;
            }
        };
        let r#ref = value.get("ref").cloned().unwrap_or(Value::Null);
        if !value.get("op").is_some_and(Value::is_string) {
            out.error(
                &r#ref,
                "bad_message",
                "a message is a JSON object with \"op\": publish, subscribe, unsubscribe or ping",
            );
            return;
        }
        let message: ClientMessage = match serde_json::from_value(value) {
            Ok(message) => message,
            Err(error) => {
                out.error(&r#ref, "bad_message", format!("malformed message: {error}"));
                return;
            }
        };
        match message {
            ClientMessage::Ping { .. } => {
                out.send(json!({"type": "pong", "ref": r#ref}));
            }
            ClientMessage::Publish { event, .. } => self.publish(*event, &r#ref, out).await,
            ClientMessage::Subscribe { pattern, .. } => {
                self.subscribe(pattern, &r#ref, out, subscriptions).await;
            }
            ClientMessage::Unsubscribe { pattern, .. } => {
                let existed = subscriptions.remove(&pattern).map(|f| f.abort()).is_some();
                if existed {
                    out.send(json!({"type": "ack", "op": "unsubscribe", "ref": r#ref, "pattern": pattern}));
                } else {
                    out.error(
                        &r#ref,
                        "not_subscribed",
                        format!("not subscribed to {pattern:?}"),
                    );
                }
            }
        }
    }

    async fn publish(&self, mut draft: EventDraft, r#ref: &Value, out: &Outbound) {
        if !self.can_publish {
            return out.error(
                r#ref,
                "unauthorized",
                "this connection's token may not publish",
            );
        }
        if !self.state.is_accepting() {
            return out.error(r#ref, "unavailable", "host is shutting down");
        }
        if self.limiter.check().is_err() {
            return out.error(
                r#ref,
                "rate_limited",
                format!(
                    "publish rate limit of {}/s (burst {}) exceeded; slow down",
                    self.limits.publish_rate, self.limits.publish_burst
                ),
            );
        }
        let source = draft.source.unwrap_or(EventSource::Websocket);
        if !matches!(source, EventSource::Websocket | EventSource::Frontend) {
            return out.error(
                r#ref,
                "invalid_event",
                format!("source must be websocket or frontend for WebSocket clients, not {source}"),
            );
        }
        if draft.user_id.is_some() && !self.authenticated {
            return out.error(
                r#ref,
                "unauthorized",
                "user_id may only be set on a connection authenticated with a token",
            );
        }
        if let Err(error) = super::events::check_addressable_id(&draft) {
            return out.error(r#ref, error.code, error.message);
        }
        draft.source = Some(source);
        draft.session_id = Some(self.session_id.clone());
        let broker = self.state.broker();
        let event = draft.into_event(broker.instance_id());
        match broker.publish(event).await {
            Ok(published) => {
                let status = match &published {
                    Published::Queued(_) => "pending",
                    Published::Processed(event) => event.status.as_str(),
                };
                out.send(json!({
                    "type": "ack",
                    "op": "publish",
                    "ref": r#ref,
                    "id": published.id(),
                    "status": status,
                }));
            }
            Err(error) => {
                let code = match &error {
                    BrokerError::Invalid(_) => "invalid_event",
                    BrokerError::QueueFull(_) => "queue_full",
                    BrokerError::NotRunning => "unavailable",
                    BrokerError::StoppedBeforeFinished(_) => "unfinished",
                    BrokerError::Provider(ProviderError::Duplicate(_)) => "duplicate",
                    _ => "internal",
                };
                if code == "internal" {
                    broker.metrics().source_publish_failed("websocket");
                    tracing::warn!(%error, session_id = %self.session_id, "WebSocket publish failed");
                }
                out.error(r#ref, code, error.to_string());
            }
        }
    }

    async fn subscribe(
        &self,
        pattern: String,
        r#ref: &Value,
        out: &Outbound,
        subscriptions: &mut HashMap<String, JoinHandle<()>>,
    ) {
        if subscriptions.contains_key(&pattern) {
            out.send(json!({"type": "ack", "op": "subscribe", "ref": r#ref, "pattern": pattern}));
            return;
        }
        if subscriptions.len() >= self.limits.max_subscriptions {
            return out.error(
                r#ref,
                "too_many_subscriptions",
                format!(
                    "at most {} subscriptions per connection; unsubscribe first",
                    self.limits.max_subscriptions
                ),
            );
        }
        let compiled = match Pattern::new(&pattern) {
            Ok(compiled) => compiled,
            Err(error) => return out.error(r#ref, "invalid_pattern", error.to_string()),
        };
        let stream = match self.state.broker().provider().stream(&compiled).await {
            Ok(stream) => stream,
            Err(error) => return out.error(r#ref, "unavailable", error.to_string()),
        };
        out.send(json!({"type": "ack", "op": "subscribe", "ref": r#ref, "pattern": pattern}));
        let forwarder = tokio::spawn(forward(stream, pattern.clone(), out.clone()));
        subscriptions.insert(pattern, forwarder);
    }
}

/// Forwards one subscription's events to the client.
async fn forward(mut stream: EventStream, pattern: String, out: Outbound) {
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if !out.send(json!({"type": "event", "subscription": pattern, "event": event})) {
                    return;
                }
            }
            Err(error) => {
                out.close(
                    CLOSE_ERROR,
                    "lagged",
                    &format!("subscription {pattern}: {error}"),
                );
                return;
            }
        }
    }
    out.close(CLOSE_GOING_AWAY, "shutdown", "host is shutting down");
}

/// Writes queued messages; on close, sends the close frame (bounded by [`CLOSE_GRACE`]).
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Message>,
    closer: Arc<Closer>,
) {
    loop {
        let message = tokio::select! {
            biased;
            _ = closer.token.cancelled() => break,
            message = rx.recv() => message,
        };
        let Some(message) = message else { break };
        tokio::select! {
            result = sink.send(message) => {
                if result.is_err() {
                    closer.token.cancel();
                    return;
                }
            }
            _ = closer.token.cancelled() => break,
        }
    }
    let frame = closer
        .frame
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or(CloseFrame {
            code: CLOSE_NORMAL,
            reason: Utf8Bytes::from_static(""),
        });
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        let _ = sink.send(Message::Close(Some(frame))).await;
        let _ = sink.close().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_fit_a_close_frame() {
        assert_eq!(truncate("abc", 123), "abc");
        let long = "é".repeat(100);
        let cut = truncate(&long, 123);
        assert!(cut.len() <= 123 && cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn subprotocol_tokens() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "eventbroker, bearer.s3cret".parse().unwrap(),
        );
        assert_eq!(subprotocol_token(&headers).as_deref(), Some("s3cret"));
        assert_eq!(subprotocol_token(&HeaderMap::new()), None);
    }

    #[test]
    fn client_messages_parse_with_clear_errors() {
        let ok: ClientMessage =
            serde_json::from_str(r#"{"op":"subscribe","pattern":"a.*","ref":1}"#).unwrap();
        assert!(matches!(ok, ClientMessage::Subscribe { pattern, .. } if pattern == "a.*"));
        let err = serde_json::from_str::<ClientMessage>(r#"{"op":"dance"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
        let err = serde_json::from_str::<ClientMessage>(r#"{"op":"publish"}"#).unwrap_err();
        assert!(err.to_string().contains("event"), "{err}");
    }
}
