//! Server-sent events on the Redis provider: a client that stops reading is cut without the
//! host holding more than `watcher_buffer` events for it (issue 13).

use std::time::Duration;

use eventbroker_tests::{PATIENCE, services};

fn uuid_suffix() -> String {
    eventbroker_testkit::unique_suffix()
}

/// Deletes every key under `prefix`.
fn delete_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(5)) else {
        return;
    };
    let keys: Vec<String> =
        match redis::Commands::scan_match::<_, String>(&mut conn, format!("{prefix}*")) {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
    for chunk in keys.chunks(500) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
    }
}

/// Reads from `socket` until `needle` has been seen; returns everything read.
async fn read_until(socket: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let read = socket.read(&mut buffer).await.expect("read");
            assert!(read > 0, "connection closed before {needle:?}");
            seen.extend_from_slice(&buffer[..read]);
        }
    })
    .await
    .expect("the host answers");
    String::from_utf8_lossy(&seen).into_owned()
}

/// One `/v1/stream` client stops reading while 200 events of 200 KB are published on Redis:
/// the host holds at most `watcher_buffer` of them for it. Its watcher is cut (the provider
/// reports no subscriber left), and when the client reads again it gets what was buffered,
/// `event: error` saying it fell behind, and the end of the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_client_is_cut_and_holds_a_bounded_buffer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PUBLISHED: usize = 200;
    let addr = std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    if !services::available("Redis", &addr) {
        return;
    }
    let stream_name = format!("eb-test:{}", uuid_suffix());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = eventbroker_server::Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.handlers.dir = dir.path().join("handlers");
    config.handlers.cache_dir = Some(dir.path().join("cache"));
    config.handlers.pool.instances = 4;
    std::fs::create_dir_all(&config.handlers.dir).expect("handlers dir");
    config.event_broker.instance_id = "redis-test".into();
    config.backend.provider = eventbroker_server::ProviderKind::Redis;
    config.backend.redis.url = Some(format!("redis://{addr}/0"));
    config.backend.redis.stream_name = stream_name.clone();
    config.backend.redis.watcher_buffer = 8;
    let service = eventbroker_server::Service::start(config)
        .await
        .expect("host starts");
    let host = service.local_addr();
    let http = &reqwest::Client::new();
    let subscribers = move || async move {
        let stats: serde_json::Value = http
            .get(format!("http://{host}/v1/stats"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        stats["provider"]["subscribers"].as_u64()
    };

    // The client: a small receive buffer, the request, the response head, then no reading.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("buffer size");
    let mut client = socket.connect(host).await.expect("connect");
    client
        .write_all(
            format!(
                "GET /v1/stream?pattern=sse.* HTTP/1.1\r\nHost: {host}\r\n\
                 Accept: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("request");
    let head = read_until(&mut client, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    wait_until(
        || async { (subscribers().await? == 1).then_some(()) },
        "the watcher",
    )
    .await;

    let blob = "x".repeat(200 * 1024);
    for n in 0..PUBLISHED {
        let response = http
            .post(format!("http://{host}/v1/events"))
            .json(&serde_json::json!({"type": format!("sse.n{n}"), "payload": {"blob": blob}}))
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), 202, "{:?}", response.text().await);
    }
    wait_until(
        || async { (subscribers().await? == 0).then_some(()) },
        "the stalled client's watcher to be cut",
    )
    .await;

    // Reading again: what was buffered on the way, the lag report, the end.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut rest))
        .await
        .expect("the response ends")
        .expect("read");
    let rest = String::from_utf8_lossy(&rest);
    let events = rest.matches("\nevent: pending").count()
        + rest.matches("\nevent: processing").count()
        + rest.matches("\nevent: completed").count();
    eprintln!(
        "stalled SSE client: {PUBLISHED} events of 200 KB published; after it was cut it \
         received {events} event messages ({} bytes) buffered on the way, then the end",
        rest.len()
    );
    let error = rest
        .split("event: error")
        .nth(1)
        .expect("the stream reports why it ends");
    assert!(error.contains("fell behind"), "{error}");
    assert!(
        events < PUBLISHED,
        "a stalled client must not be sent everything: {events} of {PUBLISHED} events buffered"
    );
    service.stop().await.expect("stop");
    delete_keys(&format!("redis://{addr}/0"), &stream_name);
}

/// Polls `check` until it returns `Some`, panicking after [`PATIENCE`] naming `what`.
async fn wait_until<T, F, Fut>(mut check: F, what: &str) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
