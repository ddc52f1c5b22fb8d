//! What the suite does to a host over the network: publish (async, sync), publish and hang
//! up mid-request, follow events without ever reading (SSE and WebSocket), deploy and remove
//! a handler, and read an event's stored state.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use eventbroker_testkit::PATIENCE;

/// How an event was handed to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/events`, waiting for the answer.
    Async,
    /// `POST /v1/events?mode=sync`, waiting for the answer.
    Sync,
    /// `POST /v1/events`, the client hanging up before the answer.
    AsyncHangUp,
    /// `POST /v1/events?mode=sync`, the client hanging up while the handlers run.
    SyncHangUp,
    /// A marker the suite publishes to see that the hosts recovered from a fault.
    Marker,
}

impl Kind {
    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Async => "async",
            Kind::Sync => "sync",
            Kind::AsyncHangUp => "async-hang-up",
            Kind::SyncHangUp => "sync-hang-up",
            Kind::Marker => "marker",
        }
    }
}

/// What the publishing client learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 202 (async) or 200 with the processed event (sync): the host accepted the event.
    Accepted,
    /// The host refused it (status and error code).
    Refused(String),
    /// No answer: the client hung up, or the connection failed.
    Unanswered(String),
}

/// One event the suite tried to publish.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The event id (chosen by the suite, so that it is known even without an answer).
    pub id: String,
    /// The payload's sequence number (`n`): the trapping handler traps when it is a multiple
    /// of three.
    pub n: u64,
    /// How it was published.
    pub kind: Kind,
    /// Which host it was sent to (`<label>#<generation>`).
    pub host: String,
    /// What the client learned.
    pub answer: Answer,
    /// When the request started.
    pub started: Instant,
}

impl Attempt {
    /// True if the host accepted the event.
    pub fn accepted(&self) -> bool {
        self.answer == Answer::Accepted
    }
}

/// The payload knobs of one event.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// The guest waits this long in every handler.
    pub sleep_ms: Option<u64>,
    /// Bytes of padding in the payload.
    pub pad: usize,
}

/// The JSON body of an event.
pub fn body(id: &str, event_type: &str, n: u64, shape: Shape) -> Value {
    let mut payload = json!({ "n": n });
    if let Some(ms) = shape.sleep_ms {
        payload["sleep_ms"] = json!(ms);
    }
    if shape.pad > 0 {
        payload["pad"] = json!("p".repeat(shape.pad));
    }
    json!({ "id": id, "type": event_type, "source": "frontend", "payload": payload })
}

/// An HTTP client with the suite's patience.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("http client")
}

/// Publishes `body` to `url` and waits for the answer.
pub async fn publish(client: &reqwest::Client, url: &str, body: &Value, sync: bool) -> Answer {
    let query = if sync { "?mode=sync" } else { "" };
    let response = match client
        .post(format!("{url}/v1/events{query}"))
        .json(body)
        .send()
        .await
    {
        Ok(response) => response,
        Err(error) => return Answer::Unanswered(format!("request failed: {error}")),
    };
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    match (status, sync) {
        (202, false) | (200, true) => Answer::Accepted,
        _ => Answer::Refused(format!(
            "{status} {}",
            answer["error"]["code"]
                .as_str()
                .unwrap_or("(no error code)")
        )),
    }
}

/// Sends a publish request and hangs up without reading the answer: after `linger` if the
/// whole body was sent, or at once after half the body when `truncate` is set.
pub async fn publish_and_hang_up(
    url: &str,
    body: &Value,
    sync: bool,
    truncate: bool,
    linger: Duration,
) -> Answer {
    let addr = url.trim_start_matches("http://");
    let text = body.to_string();
    let query = if sync { "?mode=sync" } else { "" };
    let head = format!(
        "POST /v1/events{query} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        text.len()
    );
    let sent = if truncate {
        &text.as_bytes()[..text.len() / 2]
    } else {
        text.as_bytes()
    };
    let result = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(sent).await?;
        stream.flush().await?;
        tokio::time::sleep(linger).await;
        Ok::<_, std::io::Error>(())
    }
    .await;
    match result {
        Ok(()) if truncate => Answer::Unanswered("hung up halfway through the body".into()),
        Ok(()) => Answer::Unanswered(format!("hung up {linger:?} after sending the request")),
        Err(error) => Answer::Unanswered(format!("connection failed: {error}")),
    }
}

/// Clients that follow every event and never read: one `GET /v1/stream` (SSE) and one
/// `GET /v1/ws` subscribed to `*`. They hold their connections until dropped.
pub struct Stalled {
    _sse: std::net::TcpStream,
    _ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
}

impl Stalled {
    /// Connects both clients to the host at `url` (blocking).
    ///
    /// # Panics
    /// If a connection or the WebSocket handshake fails.
    pub fn connect(url: &str) -> Stalled {
        let addr = url.trim_start_matches("http://");
        let mut sse = std::net::TcpStream::connect(addr).expect("connect the SSE client");
        write!(
            sse,
            "GET /v1/stream?pattern=* HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .expect("send the SSE request");
        let (mut ws, _) =
            tungstenite::connect(format!("ws://{addr}/v1/ws")).expect("WebSocket handshake");
        ws.send(tungstenite::Message::text(
            json!({"op": "subscribe", "pattern": "*", "ref": 1}).to_string(),
        ))
        .expect("send the WebSocket subscription");
        ws.flush().expect("flush the WebSocket subscription");
        Stalled { _sse: sse, _ws: ws }
    }
}

/// Deploys the component as handler `name` with `manifest` (`PUT /v1/handlers/{name}`).
pub async fn deploy(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    component: Vec<u8>,
    manifest: &str,
) -> Result<(), String> {
    let form = reqwest::multipart::Form::new()
        .part(
            "component",
            reqwest::multipart::Part::bytes(component).file_name(format!("{name}.wasm")),
        )
        .text("manifest", manifest.to_owned());
    let response = client
        .put(format!("{url}/v1/handlers/{name}"))
        .multipart(form)
        .send()
        .await
        .map_err(|e| format!("deploy {name}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "deploy {name}: {status} {}",
            response.text().await.unwrap_or_default()
        ))
    }
}

/// Removes handler `name` (`DELETE /v1/handlers/{name}`).
pub async fn remove(client: &reqwest::Client, url: &str, name: &str) -> Result<(), String> {
    let response = client
        .delete(format!("{url}/v1/handlers/{name}"))
        .send()
        .await
        .map_err(|e| format!("remove {name}: {e}"))?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!(
            "remove {name}: {status} {}",
            response.text().await.unwrap_or_default()
        ))
    }
}

/// An event's stored state as a host reports it.
#[derive(Debug, Clone)]
pub enum Stored {
    /// `GET /v1/events/{id}` answered the event.
    Found(Value),
    /// It answered 404.
    NotFound,
    /// It could not answer.
    Unreadable(String),
}

impl Stored {
    /// True for an event in `completed` or `failed`.
    pub fn is_final(&self) -> bool {
        matches!(self, Stored::Found(event)
            if matches!(event["status"].as_str(), Some("completed" | "failed")))
    }
}

/// Reads event `id` through the host at `url`.
pub async fn fetch(client: &reqwest::Client, url: &str, id: &str) -> Stored {
    let response = match client.get(format!("{url}/v1/events/{id}")).send().await {
        Ok(response) => response,
        Err(error) => return Stored::Unreadable(error.to_string()),
    };
    match response.status().as_u16() {
        200 => match response.json::<Value>().await {
            Ok(mut event) => {
                // The padding is noise in reports.
                if let Some(pad) = event["payload"].get_mut("pad") {
                    *pad = json!("…");
                }
                Stored::Found(event)
            }
            Err(error) => Stored::Unreadable(format!("bad JSON: {error}")),
        },
        404 => Stored::NotFound,
        status => Stored::Unreadable(format!(
            "GET answered {status}: {}",
            response.text().await.unwrap_or_default()
        )),
    }
}
