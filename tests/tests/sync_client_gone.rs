//! A sync publish over HTTP whose client goes away while the handler runs (issue 13 A1): the
//! work of an accepted event does not depend on the request that carried it.

use eventbroker_testkit::gates::{gated, wait_for_status, wait_started};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use eventbroker::{EventStatus, OutcomeState};
use eventbroker_tests::PATIENCE;
use serde_json::json;
use tokio::sync::Semaphore;

/// Issue 13 A1 over HTTP: `POST /v1/events?mode=sync` whose client gives up (closes its
/// connection, as a client timeout does) while the handler runs; the event still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sync_publish_whose_client_gives_up_still_completes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = eventbroker_server::Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.handlers.dir = dir.path().join("handlers");
    config.handlers.cache_dir = Some(dir.path().join("cache"));
    config.handlers.watch = false;
    config.event_broker.instance_id = "test-host".into();
    std::fs::create_dir_all(&config.handlers.dir).expect("handlers dir");
    let service = eventbroker_server::Service::start(config)
        .await
        .expect("host starts");
    let (started, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let calls = Arc::new(AtomicUsize::new(0));
    service
        .broker()
        .subscribe(
            "slow.op",
            gated(started.clone(), gate.clone(), calls.clone()),
        )
        .unwrap();
    let mut client = tokio::net::TcpStream::connect(service.local_addr())
        .await
        .expect("connect");
    let body = json!({"type": "slow.op", "id": "http-sync"}).to_string();
    let request = format!(
        "POST /v1/events?mode=sync HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    wait_started(&started).await;
    // The client gives up: it closes its side and waits until the server closed the
    // connection, i.e. the server noticed and dropped the request.
    client.shutdown().await.expect("close the client side");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection")
        .expect("read");
    assert!(answer.is_empty(), "no answer was sent: {answer:?}");
    gate.add_permits(1);
    let done = wait_for_status(service.broker(), "http-sync", EventStatus::Completed).await;
    assert_eq!(done.handlers[0].state, OutcomeState::Succeeded);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let report = service.stop().await.expect("stop");
    assert!(report.drained, "{report:?}");
}
