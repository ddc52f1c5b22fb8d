//! Test harness of the end-to-end suite: starts hosts in-process on a free port and talks to
//! them over HTTP ([`host`]). The example guests, services and waiting on conditions come from
//! `eventbroker-testkit`, re-exported here.

pub mod host;

pub use eventbroker_testkit::{PATIENCE, guests, services, toolchains, variant, wait_for};
