//! The handler store conformance suite on Redis.

mod common;

eventbroker_testkit::handler_store_conformance!(redis, common::backend());
