//! The provider conformance suite on Redis Streams.

mod common;

eventbroker_testkit::conformance!(redis, common::backend());
