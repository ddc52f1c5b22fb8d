//! `GET /v1/ws` with a real WebSocket client: publish, subscribe, authentication, bad
//! messages, limits, and a slow client being disconnected without slowing the broker.

use std::time::Instant;

use eventbroker_tests::PATIENCE;
use eventbroker_tests::host::TestHost;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn ws_url(host: &TestHost, query: &str) -> String {
    format!("{}/v1/ws{query}", host.url.replacen("http://", "ws://", 1))
}

async fn connect(host: &TestHost, query: &str) -> (Client, Value) {
    let (mut client, _) = tokio_tungstenite::connect_async(ws_url(host, query))
        .await
        .expect("WebSocket connects");
    let welcome = recv(&mut client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (client, welcome)
}

/// The next JSON text message (panics on close or after PATIENCE).
async fn recv(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("a message within PATIENCE")
            .expect("connection open")
            .expect("message");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON from the host"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// The next message that is not an event.
async fn reply(client: &mut Client) -> Value {
    loop {
        let message = recv(client).await;
        if message["type"] != "event" {
            return message;
        }
    }
}

async fn send(client: &mut Client, message: Value) {
    client
        .send(Message::Text(message.to_string().into()))
        .await
        .expect("send");
}

/// Reads until the host closes the connection; returns its close frame.
async fn close_frame(client: &mut Client) -> Option<CloseFrame> {
    loop {
        let next = tokio::time::timeout(PATIENCE, client.next())
            .await
            .expect("the host closes within PATIENCE");
        match next {
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(_)) => continue,
            Some(Err(error)) => panic!("connection failed instead of closing cleanly: {error}"),
            None => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe() {
    let host = TestHost::start(|_, _| {}).await;
    let (mut client, welcome) = connect(&host, "").await;
    let session = welcome["session_id"]
        .as_str()
        .expect("session id")
        .to_owned();
    assert_eq!(welcome["authenticated"], false);

    send(
        &mut client,
        json!({"op": "subscribe", "pattern": "chat.*", "ref": 1}),
    )
    .await;
    let ack = reply(&mut client).await;
    assert_eq!(
        ack,
        json!({"type": "ack", "op": "subscribe", "ref": 1, "pattern": "chat.*"})
    );

    // Without a token, a client cannot claim a user id.
    send(
        &mut client,
        json!({"op": "publish", "ref": 2, "event": {"type": "chat.message", "user_id": 5}}),
    )
    .await;
    let error = reply(&mut client).await;
    assert_eq!(
        (
            error["type"].as_str(),
            error["code"].as_str(),
            &error["ref"]
        ),
        (Some("error"), Some("unauthorized"), &json!(2)),
        "{error}"
    );

    send(
        &mut client,
        json!({"op": "publish", "ref": 3, "event": {"type": "other.thing"}}),
    )
    .await;
    let other = reply(&mut client).await;
    assert_eq!(other["type"], "ack", "{other}");
    send(&mut client, json!({"op": "publish", "ref": 4, "event": {"type": "chat.message", "payload": {"text": "hi"}}})).await;
    // The event's first status messages may arrive before the ack: keep them.
    let mut events = Vec::new();
    let ack = loop {
        let message = recv(&mut client).await;
        if message["type"] == "event" {
            events.push(message);
        } else {
            break message;
        }
    };
    assert_eq!(
        (ack["op"].as_str(), &ack["ref"]),
        (Some("publish"), &json!(4)),
        "{ack}"
    );
    let id = ack["id"].as_str().expect("event id").to_owned();

    // The subscription sees the matching event (never the other one) until it completes.
    let mut index = 0;
    loop {
        if index == events.len() {
            let message = recv(&mut client).await;
            if message["type"] != "event" {
                panic!("unexpected message {message}");
            }
            events.push(message);
        }
        let message = &events[index];
        index += 1;
        assert_eq!(message["subscription"], "chat.*");
        let event = &message["event"];
        assert_eq!(
            event["id"],
            id.as_str(),
            "only chat.* events arrive: {message}"
        );
        assert_eq!(event["source"], "websocket");
        assert_eq!(event["session_id"], session.as_str());
        assert_eq!(event["payload"]["text"], "hi");
        if event["status"] == "completed" {
            break;
        }
    }
    let stored = host.finished(&id).await;
    assert_eq!(stored["source"], "websocket");
    assert_eq!(stored["session_id"], session.as_str());

    send(
        &mut client,
        json!({"op": "unsubscribe", "pattern": "chat.*", "ref": 5}),
    )
    .await;
    assert_eq!(reply(&mut client).await["op"], "unsubscribe");
    send(
        &mut client,
        json!({"op": "unsubscribe", "pattern": "chat.*", "ref": 6}),
    )
    .await;
    assert_eq!(reply(&mut client).await["code"], "not_subscribed");
    send(&mut client, json!({"op": "ping", "ref": 7})).await;
    assert_eq!(reply(&mut client).await, json!({"type": "pong", "ref": 7}));
    client.close(None).await.expect("close");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_clear_errors_and_the_connection_stays_usable() {
    let host = TestHost::start(|_, _| {}).await;
    let (mut client, _) = connect(&host, "").await;
    let cases: Vec<(Message, &str, &str)> = vec![
        (
            Message::Text("{not json".into()),
            "bad_message",
            "not valid JSON",
        ),
        (Message::Text("[1,2]".into()), "bad_message", "\"op\""),
        (
            Message::Text(r#"{"op":"dance","ref":"x"}"#.into()),
            "bad_message",
            "unknown variant",
        ),
        (
            Message::Text(r#"{"op":"subscribe"}"#.into()),
            "bad_message",
            "pattern",
        ),
        (
            Message::Text(r#"{"op":"subscribe","pattern":"a..b"}"#.into()),
            "invalid_pattern",
            "a..b",
        ),
        (
            Message::Text(r#"{"op":"publish","event":{"type":"a.b","source":"system"}}"#.into()),
            "invalid_event",
            "websocket or frontend",
        ),
        (
            Message::Text(r#"{"op":"publish","event":{"type":"bad..type"}}"#.into()),
            "invalid_event",
            "type",
        ),
        (
            Message::Text(r#"{"op":"publish","event":{"type":"a.b","bogus":1}}"#.into()),
            "bad_message",
            "bogus",
        ),
        (
            Message::Binary(vec![1, 2, 3].into()),
            "bad_message",
            "binary",
        ),
    ];
    for (message, code, needle) in cases {
        let shown = format!("{message:?}");
        client.send(message).await.expect("send");
        let error = reply(&mut client).await;
        assert_eq!(error["type"], "error", "{shown}: {error}");
        assert_eq!(error["code"], code, "{shown}: {error}");
        let text = error["message"].as_str().unwrap_or("");
        assert!(
            text.contains(needle),
            "{shown}: {text:?} should mention {needle:?}"
        );
    }
    send(&mut client, json!({"op": "ping", "ref": 1})).await;
    assert_eq!(reply(&mut client).await["type"], "pong");

    // The page at / is served (and speaks to this endpoint).
    let page = host
        .http
        .get(format!("{}/", host.url))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/html")
    );
    assert!(page.text().await.expect("html").contains("/v1/ws"));

    // Not a WebSocket request at all.
    let (status, body) = host.get("/v1/ws").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "not_websocket");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_by_query_or_subprotocol_and_user_ids() {
    let host = TestHost::start(|config, _| {
        config.server.admin_token = Some("adm".into());
        config.server.publish_token = Some("pub".into());
    })
    .await;
    let refused = tokio_tungstenite::connect_async(ws_url(&host, "")).await;
    match refused {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("connecting without a token must be refused, got {other:?}"),
    }
    let refused = tokio_tungstenite::connect_async(ws_url(&host, "?token=wrong")).await;
    assert!(
        matches!(refused, Err(WsError::Http(ref r)) if r.status() == 401),
        "{refused:?}"
    );

    let (mut client, welcome) = connect(&host, "?token=pub").await;
    assert_eq!(
        (
            welcome["authenticated"].as_bool(),
            welcome["can_publish"].as_bool()
        ),
        (Some(true), Some(true))
    );
    send(
        &mut client,
        json!({"op": "publish", "ref": 1, "event": {"type": "app.login", "user_id": 7}}),
    )
    .await;
    let ack = reply(&mut client).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["id"].as_str().expect("id").to_owned();
    let (_, event) = host
        .http
        .get(format!("{}/v1/events/{id}", host.url))
        .bearer_auth("pub")
        .send()
        .await
        .map(|r| ((), r))
        .expect("get");
    let event: Value = event.json().await.expect("json");
    assert_eq!(event["user_id"], 7);
    assert_eq!(event["source"], "websocket");

    // Browsers offer the token as a subprotocol; the host answers with its own protocol.
    let mut request = ws_url(&host, "").into_client_request().expect("request");
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "eventbroker, bearer.pub".parse().expect("header"),
    );
    let (mut client, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connects");
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("eventbroker")
    );
    assert_eq!(recv(&mut client).await["authenticated"], true);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_size_limits() {
    let host = TestHost::start(|config, _| {
        config.server.websocket.publish_rate = 1;
        config.server.websocket.publish_burst = 1;
        config.server.websocket.max_message_size = bytesize::ByteSize::kib(1);
    })
    .await;
    let (mut client, _) = connect(&host, "").await;
    let started = Instant::now();
    let sent = 20;
    for n in 0..sent {
        send(
            &mut client,
            json!({"op": "publish", "ref": n, "event": {"type": "rate.test"}}),
        )
        .await;
    }
    let (mut accepted, mut limited) = (0u64, 0u64);
    for _ in 0..sent {
        let answer = reply(&mut client).await;
        match (answer["type"].as_str(), answer["code"].as_str()) {
            (Some("ack"), _) => accepted += 1,
            (Some("error"), Some("rate_limited")) => {
                limited += 1;
                assert!(
                    answer["message"].as_str().unwrap_or("").contains("1/s"),
                    "{answer}"
                );
            }
            _ => panic!("unexpected answer {answer}"),
        }
    }
    let elapsed = started.elapsed().as_secs() + 1;
    assert!(accepted >= 1, "the first publish passes");
    assert!(
        accepted <= 1 + elapsed,
        "{accepted} publishes passed in {elapsed}s at 1/s"
    );
    assert_eq!(accepted + limited, sent);

    // An oversized message closes the connection with 1009 and the reason.
    let big =
        json!({"op": "publish", "event": {"type": "big.one", "payload": {"x": "y".repeat(2048)}}});
    send(&mut client, big).await;
    let frame = close_frame(&mut client).await.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1009);
    assert!(
        frame.reason.contains("exceeds the limit of 1024 bytes"),
        "{}",
        frame.reason
    );
    let metrics = host.metrics().await;
    assert!(
        metrics.contains("eventbroker_websocket_disconnects_total{reason=\"message_too_big\"} 1"),
        "{metrics}"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_disconnected_with_a_reason_without_slowing_the_broker() {
    let host = TestHost::start(|config, _| {
        config.server.websocket.outbound_buffer = 8;
        config.event_broker.memory.max_events = 200;
    })
    .await;
    let (mut slow, _) = connect(&host, "").await;
    send(
        &mut slow,
        json!({"op": "subscribe", "pattern": "*", "ref": 1}),
    )
    .await;
    assert_eq!(reply(&mut slow).await["type"], "ack");
    // A well-behaved client on the same host keeps working throughout.
    let (mut healthy, _) = connect(&host, "").await;

    // The slow client stops reading; events keep flowing (each publish is accepted at once)
    // until its queue overflows and the host cuts it off.
    let payload = json!({"blob": "z".repeat(64 * 1024)});
    let metrics_url = format!("{}/metrics", host.url);
    let mut published = 0;
    loop {
        let (status, body) = host
            .publish(json!({"type": "load.tick", "payload": payload}), "")
            .await;
        assert_eq!(
            status, 202,
            "publishing never waits for a WebSocket client: {body}"
        );
        published += 1;
        let metrics = host
            .http
            .get(&metrics_url)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if metrics.contains("eventbroker_websocket_disconnects_total{reason=\"slow_client\"} 1") {
            break;
        }
        assert!(published < 5000, "the slow client was never disconnected");
    }
    let frame = close_frame(&mut slow)
        .await
        .expect("a close frame with the reason");
    assert_eq!(u16::from(frame.code), 1008);
    assert!(frame.reason.contains("too slow"), "{}", frame.reason);

    send(&mut healthy, json!({"op": "ping", "ref": 1})).await;
    assert_eq!(reply(&mut healthy).await["type"], "pong");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_origins_and_foreign_hosts_cannot_open_a_websocket() {
    let host = TestHost::start(|_, _| {}).await;
    let port = host.service.local_addr().port();
    let refused = |name: &'static str, value: String| {
        let mut request = ws_url(&host, "").into_client_request().expect("request");
        request
            .headers_mut()
            .insert(name, value.parse().expect("header"));
        async move {
            match tokio_tungstenite::connect_async(request).await {
                Err(WsError::Http(response)) => {
                    let body: Value =
                        serde_json::from_slice(response.body().as_deref().expect("an error body"))
                            .expect("JSON error");
                    (response.status().as_u16(), body)
                }
                other => panic!("{name}: {value} must be refused, got {other:?}"),
            }
        }
    };
    for origin in [
        "http://evil.example".to_owned(),
        "null".to_owned(),
        format!("http://localhost:{port}"),
    ] {
        let (status, body) = refused("origin", origin.clone()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden_origin")),
            "{origin}: {body}"
        );
    }
    let (status, body) = refused("host", "attacker.example".to_owned()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (421, Some("invalid_host")),
        "{body}"
    );
    // The host's own page (same origin) connects, and so do clients that send no Origin.
    let mut request = ws_url(&host, "").into_client_request().expect("request");
    request.headers_mut().insert(
        "origin",
        format!("http://127.0.0.1:{port}").parse().expect("header"),
    );
    let (mut client, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("same origin connects");
    assert_eq!(recv(&mut client).await["type"], "welcome");
    let (_client, welcome) = connect(&host, "").await;
    assert_eq!(welcome["type"], "welcome");
    host.stop().await;
}
