//! Every path in one run, one table:
//!
//!     cargo bench -p eventbroker-bench --bench all [-- [PATH...] [--scale F] [--stored N,N,...]
//!         [--stored-on BACKEND,...]]
//!
//! PATH is any of `memory hooks wasm sqlite postgres redis nats fanout footprint stored grants`
//! (default: all). `--scale` multiplies every path's event count (default 1.0); `--stored`
//! lists the store sizes of the read-latency table (default `10000,100000`; add `1000000` for
//! the full table, which takes minutes per backend) and `--stored-on` its backends (default
//! every one). Paths whose service is not reachable are listed as skipped. Run it with
//! nothing else running on the machine.

use clap::Parser;
use eventbroker_bench::paths::{self, Outcome};
use eventbroker_bench::report::{self, Row, Skipped};

#[derive(Parser)]
#[command(about = "The eventbroker's benchmarks, every path against its bare baseline")]
struct Args {
    /// Paths to run (default: all).
    paths: Vec<String>,
    /// Multiplies every path's event count.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Store sizes of the read-latency table.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    stored: Vec<u64>,
    /// Backends of the read-latency table (default: every one).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(paths::stored::BACKENDS)
    )]
    stored_on: Vec<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const ALL: [&str; 11] = [
    "memory",
    "hooks",
    "wasm",
    "sqlite",
    "postgres",
    "redis",
    "nats",
    "fanout",
    "footprint",
    "stored",
    "grants",
];

fn main() {
    let args = Args::parse();
    for path in &args.paths {
        if !ALL.contains(&path.as_str()) {
            eprintln!("unknown path {path:?}; expected one of {}", ALL.join(" "));
            std::process::exit(2);
        }
    }
    let wanted = |path: &str| args.paths.is_empty() || args.paths.iter().any(|p| p == path);
    let events = |base: u64| ((base as f64 * args.scale) as u64).max(100);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut rows: Vec<Row> = Vec::new();
        let mut skipped: Vec<Skipped> = Vec::new();
        let mut keep = |outcome: Outcome| match outcome {
            Ok(row) => rows.push(row),
            Err(skip) => skipped.push(skip),
        };
        let mut notes = Vec::new();
        if wanted("memory") {
            keep(Ok(paths::memory::run(events(200_000)).await));
        }
        if wanted("hooks") {
            let (row, call) = paths::hooks::run(events(50_000)).await;
            keep(Ok(row));
            notes.push(format!(
                "HookRegistry::run (the CRUD layer's call): {:.2} µs per operation",
                call.as_secs_f64() * 1e6
            ));
        }
        if wanted("wasm") {
            for row in paths::wasm::run(events(20_000)).await {
                keep(Ok(row));
            }
        }
        if wanted("sqlite") {
            keep(Ok(paths::sql::sqlite(events(5_000)).await));
        }
        if wanted("postgres") {
            keep(paths::sql::postgres(events(10_000)).await);
        }
        if wanted("redis") {
            keep(paths::redis::run(events(20_000)).await);
        }
        if wanted("nats") {
            keep(paths::nats::run(events(10_000)).await);
        }
        if !rows.is_empty() || !skipped.is_empty() {
            println!("\nThroughput (publish → final state recorded) and latency at 50% of the broker's peak:\n");
            print!("{}", report::table(&rows, &skipped));
            println!("\nCPU time per event, this process (host) and the backend server, over the peak runs:\n");
            print!("{}", report::cpu_table(&rows));
        }
        for note in notes {
            println!("\n{note}");
        }
        if wanted("fanout") {
            println!("\nHandlers matching each event (memory provider, trivial native handlers):\n");
            println!("| handlers | events/s | handler invocations/s |");
            println!("|---:|---:|---:|");
            for (handlers, rate) in paths::memory::fan_out(events(50_000)).await {
                println!("| {handlers} | {rate:.0} | {:.0} |", rate * handlers as f64);
            }
        }
        if wanted("footprint") {
            let stored = events(100_000);
            match paths::memory::bytes_per_event(stored).await {
                Some(bytes) => println!(
                    "\nMemory provider: {bytes:.0} bytes of resident memory per stored event ({stored} events, payload {{\"n\": i}})"
                ),
                None => println!("\nMemory provider footprint: SKIPPED (no /proc/self/status)"),
            }
        }
        if wanted("stored") {
            println!("\nReads as the store grows (get by id; list of the newest 100):\n");
            println!("| backend | stored | fill /s | get p50 | get p99 | list p50 | list p99 |");
            println!("|---|---:|---:|---:|---:|---:|---:|");
            let chosen = |backend: &str| {
                args.stored_on.is_empty() || args.stored_on.iter().any(|b| b == backend)
            };
            for backend in paths::stored::BACKENDS.into_iter().filter(|b| chosen(b)) {
                match paths::stored::run(backend, &args.stored).await {
                    Ok(lines) => {
                        for r in lines {
                            println!(
                                "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
                                r.backend,
                                r.stored,
                                r.fill_rate,
                                r.get.0.as_secs_f64() * 1e3,
                                r.get.1.as_secs_f64() * 1e3,
                                r.list.0.as_secs_f64() * 1e3,
                                r.list.1.as_secs_f64() * 1e3,
                            );
                        }
                    }
                    Err(reason) => println!("| {backend} | SKIPPED: {reason} | | | | | |"),
                }
            }
        }
        if wanted("grants") {
            println!(
                "\nGrants: one operation made by a guest against the same operation made natively (medians; a guest's cost is its invocation with {} operations minus one with none, divided by {}):\n",
                paths::grants::OPS,
                paths::grants::OPS
            );
            println!("| operation | native baseline | native | store, called by the host | from a guest | guest / native |");
            println!("|---|---|---:|---:|---:|---:|");
            let us = |d: std::time::Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
            for row in paths::grants::run().await {
                match row {
                    Ok(r) => println!(
                        "| {} | {} | {} | {} | {} | {:.2} |",
                        r.operation,
                        r.baseline,
                        us(r.native),
                        r.host_api.map_or("-".into(), us),
                        us(r.guest),
                        r.guest.as_secs_f64() / r.native.as_secs_f64()
                    ),
                    Err((operation, reason)) => println!("| {operation} | SKIPPED: {reason} | | | | |"),
                }
            }
        }
    });
}
