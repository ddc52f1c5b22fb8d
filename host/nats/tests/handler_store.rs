//! The handler store conformance suite on NATS JetStream (skipped loudly without the server;
//! the namespace, handler store buckets included, is deleted when each test is done).

mod common;

eventbroker_testkit::handler_store_conformance!(nats, common::backend());

/// `NatsProvider::destroy` deletes the handler store's buckets and the key-value state bucket
/// with the rest of the namespace; a store never used (no buckets) is destroyed without error.
#[tokio::test]
async fn destroy_deletes_the_handler_store_and_key_value_buckets() {
    use eventbroker::Provider;
    use eventbroker_testkit::{backends::base_config, services, unique_suffix};
    use futures::StreamExt;

    if !services::available("NATS", common::NATS_ADDR) {
        return;
    }
    let nats = common::nats_section(&unique_suffix());
    let broker = base_config();
    let unused = eventbroker_nats::NatsProvider::connect(&nats, &broker)
        .await
        .expect("connect");
    unused
        .destroy()
        .await
        .expect("destroy without handler buckets");

    let provider = eventbroker_nats::NatsProvider::connect(&nats, &broker)
        .await
        .expect("connect");
    let store = provider.handler_store().expect("a handler store");
    store.put_component("v1", b"bytes").await.expect("put");
    store.write_record("h", "{}", None).await.expect("write");
    store
        .put_report("host", "{}", std::time::Duration::from_secs(60))
        .await
        .expect("report");
    provider
        .keyvalue()
        .expect("a key-value store")
        .set(
            &eventbroker::keyvalue::Namespace::new("g", "h", "b"),
            "k",
            b"v",
            &eventbroker::keyvalue::Quota {
                max_keys: 10,
                max_bytes: 1000,
            },
        )
        .await
        .expect("key-value state");
    provider.destroy().await.expect("destroy");

    let client = async_nats::connect(common::NATS_ADDR)
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let left: Vec<String> = js
        .stream_names()
        .filter_map(|name| async move { name.ok() })
        .filter(|name| futures::future::ready(name.contains(&nats.stream_name)))
        .collect()
        .await;
    for name in &left {
        let _ = js.delete_stream(name).await;
    }
    assert!(left.is_empty(), "left behind: {left:?}");
}
