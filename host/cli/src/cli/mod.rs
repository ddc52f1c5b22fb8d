//! Command line: `serve` runs the host; the other commands talk to a running host over HTTP
//! (`--server`, default `http://127.0.0.1:8080`, or `EVENTBROKER_SERVER_URL`).

mod capture;
mod client;
mod guest;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use eventbroker_server::config::Config;

/// An event broker host that runs event handlers as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "eventbroker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the host: broker, handlers and HTTP API.
    Serve(ServeArgs),
    /// Publish an event to a running host.
    Publish(client::PublishArgs),
    /// Query events on a running host.
    #[command(subcommand)]
    Events(client::EventsCommand),
    /// Deploy a handler component to a running host (persisted in its handlers directory).
    Deploy(client::DeployArgs),
    /// List or remove the handlers of a running host.
    #[command(subcommand)]
    Handlers(client::HandlersCommand),
    /// Run a handler component locally on sample events, in the service's sandbox.
    Run(guest::RunArgs),
    /// Check a component against the handler contract and the host's imports.
    Check(guest::CheckArgs),
    /// Install or remove PostgreSQL change capture (the config's `capture` section).
    #[command(subcommand)]
    Capture(capture::CaptureCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Config file (YAML or TOML, by extension). Without one, built-in defaults apply.
    #[arg(long, short, env = "EVENTBROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding `server.listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Handlers directory, overriding `handlers.dir`.
    #[arg(long)]
    handlers: Option<PathBuf>,
}

/// Parses arguments and runs the command; the process exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Both rustls crypto backends can end up linked; pick one before any TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Publish(args) => client::publish(args).await,
            Command::Events(command) => client::events(command).await,
            Command::Deploy(args) => client::deploy(args).await,
            Command::Handlers(command) => client::handlers(command).await,
            Command::Run(args) => guest::run_command(args).await,
            Command::Check(args) => guest::check_command(args).await,
            Command::Capture(command) => capture::capture(command).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(dir) = args.handlers {
        config.handlers.dir = dir;
    }
    config.validate()?;
    eventbroker_server::telemetry::init(&config.log);
    eventbroker_server::run(config, shutdown_signal())
        .await
        .context("eventbroker serve failed")?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("received SIGINT"),
        _ = terminate => tracing::info!("received SIGTERM"),
    }
}
