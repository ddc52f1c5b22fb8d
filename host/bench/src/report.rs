//! The results table.

use std::fmt::Write as _;
use std::time::Duration;

use crate::harness::Latency;

/// One measured path: the bare operation it is built on and the broker on top of it.
#[derive(Debug, Clone)]
pub struct Row {
    /// The path (`memory`, `wasm fresh`, `postgres`, …).
    pub path: String,
    /// What the bare baseline does.
    pub baseline: String,
    /// Bare operations per second.
    pub bare: f64,
    /// Broker events per second (publish → final state recorded).
    pub broker: f64,
    /// End-to-end latency at half the broker's peak.
    pub latency: Option<Latency>,
    /// CPU time per event of each side, where measured.
    pub cpu: Option<CpuRow>,
}

/// CPU microseconds per event, of this process (host) and of the backend server, for the bare
/// loop and for the broker: where the work of each event is done.
#[derive(Debug, Clone, Copy)]
pub struct CpuRow {
    /// The bare loop: (host, server).
    pub bare: (f64, f64),
    /// The broker: (host, server).
    pub broker: (f64, f64),
}

impl Row {
    /// Broker throughput as a share of the bare baseline.
    pub fn ratio(&self) -> f64 {
        self.broker / self.bare
    }
}

/// A path that could not run, and why (a service that is not reachable).
#[derive(Debug, Clone)]
pub struct Skipped {
    /// The path.
    pub path: String,
    /// Why it did not run.
    pub reason: String,
}

fn micros(duration: Duration) -> String {
    let us = duration.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// The table of `rows` (Markdown, so that the README can carry it as printed).
pub fn table(rows: &[Row], skipped: &[Skipped]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| path | bare baseline | bare /s | broker events/s | ratio | p50 | p99 |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for row in rows {
        let (p50, p99) = row
            .latency
            .map_or(("-".into(), "-".into()), |l| (micros(l.p50), micros(l.p99)));
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {:.2} | {p50} | {p99} |",
            row.path,
            row.baseline,
            row.bare,
            row.broker,
            row.ratio()
        );
    }
    for skip in skipped {
        let _ = writeln!(
            out,
            "| {} | SKIPPED: {} | | | | | |",
            skip.path, skip.reason
        );
    }
    out
}

/// The CPU table of the rows that measured it (Markdown): microseconds of CPU per event on
/// each side, bare and broker.
pub fn cpu_table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| path | host µs/event bare | host µs/event broker | server µs/event bare | server µs/event broker |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for row in rows {
        if let Some(cpu) = row.cpu {
            let _ = writeln!(
                out,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                row.path, cpu.bare.0, cpu.broker.0, cpu.bare.1, cpu.broker.1
            );
        }
    }
    out
}
