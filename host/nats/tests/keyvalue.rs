//! The key-value conformance suite on NATS JetStream (skipped loudly without the server; the
//! namespace, key-value bucket included, is deleted when each test is done).

mod common;

eventbroker_testkit::keyvalue_conformance!(nats, common::backend());

/// `NatsProvider::destroy` deletes the key-value bucket with the rest of the namespace; a
/// store never used (no bucket) is destroyed without error.
#[tokio::test]
async fn destroy_deletes_the_keyvalue_bucket() {
    use eventbroker::Provider;
    use eventbroker::keyvalue::{Namespace, Quota};
    use eventbroker_testkit::{backends::base_config, services, unique_suffix};

    if !services::available("NATS", common::NATS_ADDR) {
        return;
    }
    let nats = common::nats_section(&unique_suffix());
    let broker = base_config();
    let unused = eventbroker_nats::NatsProvider::connect(&nats, &broker)
        .await
        .expect("connect");
    unused.destroy().await.expect("destroy without a bucket");

    let provider = eventbroker_nats::NatsProvider::connect(&nats, &broker)
        .await
        .expect("connect");
    let store = provider.keyvalue().expect("a key-value store");
    let quota = Quota {
        max_keys: 10,
        max_bytes: 1000,
    };
    store
        .set(&Namespace::new("g", "h", "b"), "k", b"v", &quota)
        .await
        .expect("set");
    provider.destroy().await.expect("destroy");

    let client = async_nats::connect(common::NATS_ADDR)
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let bucket = format!("KV_{}", nats.keyvalue_bucket());
    let left = js.get_stream(&bucket).await.is_ok();
    if left {
        let _ = js.delete_stream(&bucket).await;
    }
    assert!(!left, "{bucket} left behind");
}
