//! The provider conformance suite on NATS JetStream.

mod common;

eventbroker_testkit::conformance!(nats, common::backend());
