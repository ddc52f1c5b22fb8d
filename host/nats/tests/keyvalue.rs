//! The key-value conformance suite on NATS JetStream (skipped loudly without the server; the
//! namespace, key-value bucket included, is deleted when each test is done). That `destroy`
//! deletes the bucket is checked in `tests/handler_store.rs`.

mod common;

eventbroker_testkit::keyvalue_conformance!(nats, common::backend());
