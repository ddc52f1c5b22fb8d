//! Guest tooling: `eventbroker run` and `eventbroker check`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use eventbroker_wasm::check::{CheckReport, check};
use eventbroker_wasm::config::default_cache_dir;
use eventbroker_wasm::keyvalue::file::KvFile;
use eventbroker_wasm::runner::{Overrides, RunReport, parse_events, run};
use eventbroker_wasm::{WasmEngine, WasmError};

use super::exit::{Exit, fail, usage};
use super::spinner::Spinner;

/// `eventbroker run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The component to run.
    pub(super) wasm: PathBuf,
    /// Sample event file (JSON, or JSON lines for several events run in order); `-` for stdin.
    #[arg(long, short, required_unless_present = "from", conflicts_with = "from")]
    event: Option<PathBuf>,
    /// Instead of sample events: run the host's stored events (a dry run of this version
    /// against real history; nothing is published) and show what the deployed version
    /// recorded for each, side by side. HOST as for --server; the token is --token.
    #[arg(long, value_name = "HOST", value_parser = super::remote::parse_server)]
    from: Option<reqwest::Url>,
    /// With --from: only events whose type matches this pattern, e.g. 'shop.>'.
    #[arg(long = "type", short = 't', requires = "from")]
    pub(super) type_pattern: Option<String>,
    /// With --from: how many of the newest matching events (run oldest first).
    #[arg(long, default_value_t = 10, requires = "from")]
    pub(super) last: usize,
    /// With --from: the deployed handler to compare with (default: the manifest's name, else
    /// the file name, as `deploy` names it).
    #[arg(long, requires = "from")]
    pub(super) handler: Option<String>,
    /// Handler manifest (limits and `[config]`).
    #[arg(long, short)]
    manifest: Option<PathBuf>,
    /// Fuel per invocation (overrides the manifest).
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory limit with a unit, e.g. 32MiB (overrides the manifest).
    #[arg(long, value_parser = parse_size)]
    memory: Option<bytesize::ByteSize>,
    /// Deadline per invocation, e.g. 2s (overrides the manifest).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Compiled-component cache (default: the user cache directory).
    #[arg(long, env = "EVENTBROKER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Refuse every outbound HTTP request, even those the manifest's `[http]` grants (the
    /// guest sees the refusal as an error, as on a host).
    #[arg(long)]
    deny_net: bool,
    /// A JSON file as the key-value store of the handler's `[keyvalue]` buckets
    /// (`{"bucket": {"key": "value"}}`; created if missing), written back when the run ends.
    /// Without it, the buckets start empty and are discarded.
    #[arg(long, value_name = "FILE")]
    kv: Option<PathBuf>,
}

/// `eventbroker check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The component to check.
    wasm: PathBuf,
    /// Handler manifest to check with it, as the service would load them together.
    #[arg(long, short)]
    manifest: Option<PathBuf>,
    /// Compiled-component cache (default: the user cache directory).
    #[arg(long, env = "EVENTBROKER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

fn engine(cache_dir: Option<PathBuf>) -> anyhow::Result<WasmEngine> {
    let pool = eventbroker_wasm::config::PoolConfig {
        instances: 16,
        ..Default::default()
    };
    Ok(WasmEngine::new(
        &pool,
        cache_dir.or_else(default_cache_dir),
    )?)
}

fn read_manifest(path: Option<&PathBuf>) -> anyhow::Result<Option<String>> {
    path.map(|path| {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(usage)
    })
    .transpose()
}

fn read_component(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .with_context(|| format!("cannot read {}", path.display()))
        .map_err(usage)
}

/// What the spinner says while a component loads: compiling a large one (an interpreter
/// inside) takes a minute or more the first time; later runs read the compiled cache.
fn loading_message(path: &std::path::Path, size: usize) -> String {
    format!(
        "loading {} ({}; the first compile of a large component takes a minute or more, later runs use the cache)",
        path.display(),
        bytesize::ByteSize::b(size as u64)
    )
}

/// `--memory`: a size with a unit.
fn parse_size(text: &str) -> Result<bytesize::ByteSize, String> {
    eventbroker::size::parse_size(text).map_err(|e| e.to_string())
}

pub async fn run_command(
    json: bool,
    token: Option<String>,
    args: RunArgs,
) -> anyhow::Result<ExitCode> {
    let bytes = read_component(&args.wasm)?;
    let manifest = read_manifest(args.manifest.as_ref())?;
    if let Some(from) = args.from.clone() {
        return super::replay::replay(json, token, from, args, bytes, manifest).await;
    }
    let Some(event_path) = args.event.clone() else {
        return Err(fail(Exit::Usage, "give --event FILE or --from HOST"));
    };
    let text = if event_path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read events from stdin")
            .map_err(usage)?;
        text
    } else {
        std::fs::read_to_string(&event_path)
            .with_context(|| format!("cannot read {}", event_path.display()))
            .map_err(usage)?
    };
    let events = parse_events(&text).map_err(|e| usage(e.into()))?;
    let report = run_events(&args, &bytes, manifest.as_deref(), events).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_run(&report);
    }
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Loads the component as `serve` would and runs `events` in order, with a spinner while it
/// compiles.
pub(super) async fn run_events(
    args: &RunArgs,
    bytes: &[u8],
    manifest: Option<&str>,
    events: Vec<eventbroker::event::Event>,
) -> anyhow::Result<RunReport> {
    let engine = engine(args.cache_dir.clone())?;
    let keyvalue = match &args.kv {
        Some(path) => KvFile::open(path).map_err(|e| usage(e.into()))?,
        None => KvFile::discarded(),
    };
    engine.set_keyvalue(keyvalue.binding())?;
    let overrides = Overrides {
        fuel: args.fuel,
        memory: args.memory,
        timeout: args.timeout,
        deny_net: args.deny_net,
        keyvalue: Some(keyvalue.clone()),
    };
    let spinner = Spinner::start(loading_message(&args.wasm, bytes.len()));
    let report = run(&engine, bytes, manifest, &overrides, events).await;
    spinner.finish();
    let report = report.map_err(|error| fail(Exit::Usage, error.to_string()))?;
    keyvalue
        .save()
        .map_err(|error| fail(Exit::Usage, error.to_string()))?;
    Ok(report)
}

fn print_run(report: &RunReport) {
    let handler = &report.handler;
    let spec = &handler.spec;
    let patterns = if handler.patterns.is_empty() {
        "none (the component exports no defaults; a manifest for the service must give `patterns`)"
            .to_owned()
    } else {
        handler.patterns.join(", ")
    };
    println!("handler  version {}  patterns {patterns}", handler.version);
    println!(
        "loaded   {} in {} ({} bytes)",
        if handler.compiled_from_cache {
            "from cache"
        } else {
            "compiled"
        },
        humantime::format_duration(round(handler.compile_time)),
        handler.size
    );
    println!(
        "limits   fuel {}, memory {}, timeout {}, instances {:?}",
        spec.fuel,
        bytesize::ByteSize::b(spec.memory),
        humantime::format_duration(spec.timeout),
        spec.instances
    );
    println!(
        "first invocation latency {}",
        humantime::format_duration(round(report.first_invocation_latency))
    );
    for (index, (result, matched)) in report.results.iter().zip(&report.matched).enumerate() {
        let invocation = &result.invocation;
        println!();
        println!(
            "event {}  {}  (id {}){}",
            index + 1,
            result.event.event_type,
            result.event.id,
            if *matched {
                ""
            } else {
                "  [type does not match the handler's patterns; the service would not deliver it]"
            }
        );
        match &invocation.result {
            Ok(()) => println!("  outcome   ok"),
            Err(failure) => println!(
                "  outcome   {} ({}): {}",
                failure.kind,
                if failure.retryable {
                    "would be retried"
                } else {
                    "not retried"
                },
                failure.message
            ),
        }
        println!(
            "  fuel      {}   duration {}",
            invocation.fuel_used,
            humantime::format_duration(round(invocation.duration))
        );
        if !invocation.logs.is_empty() || invocation.logs_dropped > 0 {
            println!("  log");
            for line in &invocation.logs {
                println!("    {:<6} {}", line.level, line.message);
            }
            if invocation.logs_dropped > 0 {
                println!(
                    "    ({} lines over the log budget dropped)",
                    invocation.logs_dropped
                );
            }
        }
        for event in &invocation.published {
            println!("  published {} {}", event.event_type, event.payload);
        }
    }
}

fn round(duration: Duration) -> Duration {
    if duration > Duration::from_millis(10) {
        Duration::from_millis(duration.as_millis() as u64)
    } else {
        Duration::from_micros(duration.as_micros() as u64)
    }
}

pub async fn check_command(json: bool, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let bytes = read_component(&args.wasm)?;
    let manifest = read_manifest(args.manifest.as_ref())?;
    let engine = engine(args.cache_dir)?;
    // Loaded as on a host with a key-value store, so a component granted buckets is checked
    // whole; nothing is kept.
    engine.set_keyvalue(KvFile::discarded().binding())?;
    let spinner = Spinner::start(loading_message(&args.wasm, bytes.len()));
    let report = check(&engine, &bytes, manifest.as_deref()).await;
    spinner.finish();
    let report = match report {
        Ok(report) => report,
        Err(
            error @ (WasmError::NotWasm
            | WasmError::UnknownWasm(_)
            | WasmError::NotComponent
            | WasmError::Compile(_)),
        ) => {
            eprintln!("{}: {error}", args.wasm.display());
            return Ok(ExitCode::FAILURE);
        }
        Err(error) => return Err(error.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_check(&args.wasm, &report);
    }
    Ok(if report.compatible {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_check(path: &std::path::Path, report: &CheckReport) {
    println!("{} ({} bytes)", path.display(), report.size);
    println!("exports");
    for export in &report.exports {
        println!("  {export}");
    }
    println!("imports");
    for import in &report.imports {
        println!(
            "  {} {}  — {}",
            if import.satisfied {
                "ok     "
            } else {
                "MISSING"
            },
            import.name,
            import.note
        );
    }
    match &report.default_patterns {
        Some(patterns) => println!("default patterns: {}", patterns.join(", ")),
        None => println!("default patterns: none (the manifest must give `patterns`)"),
    }
    if report.compatible {
        println!("compatible: yes");
    } else {
        println!("compatible: no");
        for problem in &report.problems {
            println!("  - {problem}");
        }
    }
}
