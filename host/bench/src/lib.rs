//! The eventbroker's benchmarks, in one harness: every dispatch path (memory provider, CRUD
//! hooks, WebAssembly guests, SQLite, PostgreSQL, Redis Streams, NATS JetStream) against the
//! bare operation it is built on, measured in the same process run, and how cost grows with
//! the number of handlers and of stored events.
//!
//! Run it with `cargo bench -p eventbroker-bench --bench all` (see `benches/all.rs` for the
//! options). Speed is never asserted: the benchmark prints ratios to baselines measured in
//! the same run, so that a noisy machine shifts both sides alike.

pub mod cpu;
pub mod harness;
pub mod paths;
pub mod report;

pub use report::{CpuRow, Row, Skipped};
