//! Command line: `serve` runs the host; the client commands talk to a running host over HTTP
//! (global `--server`/`-s`, default `127.0.0.1:8080`, or `EVENTBROKER_SERVER`); `run`,
//! `check` and `new` work on a component locally.

mod capture;
mod client;
mod exit;
mod guest;
mod remote;
mod render;
mod replay;
mod scaffold;
mod spinner;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use reqwest::Url;

use eventbroker_server::config::Config;

/// An event broker host that runs event handlers as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "eventbroker", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
struct Global {
    /// The host to talk to: host:port, a port, or a URL.
    #[arg(
        long,
        short = 's',
        global = true,
        env = "EVENTBROKER_SERVER",
        default_value = remote::DEFAULT_SERVER,
        value_parser = remote::parse_server,
    )]
    server: Url,
    /// Bearer token: the admin token for deploy, remove and retry; the publish token to publish.
    #[arg(long, global = true, env = "EVENTBROKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON (the API's own documents) instead of tables, for scripts.
    #[arg(long, global = true)]
    json: bool,
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
    /// Create a new handler project in NAME/ that builds with one command and runs on the
    /// sample event it contains.
    New(scaffold::NewArgs),
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
    /// Print a shell completion script, e.g. `eventbroker completions bash > /etc/bash_completion.d/eventbroker`.
    Completions {
        /// bash, zsh, fish, powershell or elvish.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Config file (YAML or TOML, by extension). Without one, built-in defaults apply.
    #[arg(long, short, env = "EVENTBROKER_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, overriding `server.listen`.
    #[arg(long, short)]
    listen: Option<String>,
    /// Handlers directory, overriding `handlers.dir`.
    #[arg(long)]
    handlers: Option<PathBuf>,
}

/// Parses arguments and runs the command; the process exit code says how it went.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("EVENTBROKER_SERVER_URL").is_some()
        && std::env::var_os("EVENTBROKER_SERVER").is_none()
    {
        eprintln!(
            "warning: EVENTBROKER_SERVER_URL is no longer read; set EVENTBROKER_SERVER (host:port or a URL) instead"
        );
    }
    // Both rustls crypto backends can end up linked; pick one before any TLS connection.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let Global {
        server,
        token,
        json,
    } = cli.global;
    let result = runtime.block_on(async move {
        let remote = || remote::Remote::new(server.clone(), token.clone());
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Publish(args) => client::publish(&remote()?, json, args).await,
            Command::Events(command) => client::events(&remote()?, json, command).await,
            Command::Deploy(args) => client::deploy(&remote()?, json, args).await,
            Command::Handlers(command) => client::handlers(&remote()?, json, command).await,
            Command::Run(args) => guest::run_command(json, token.clone(), args).await,
            Command::Check(args) => guest::check_command(json, args).await,
            Command::New(args) => scaffold::new_command(json, args),
            Command::Capture(command) => capture::capture(command).await,
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "eventbroker",
                    &mut std::io::stdout(),
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            exit::code_of(&error)
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
    // The OTLP exporter's HTTP client blocks: build and drop it off the async workers.
    let log = config.log.clone();
    let telemetry = tokio::task::spawn_blocking(move || eventbroker_server::telemetry::init(&log))
        .await
        .context("setting up logging")??;
    let served = eventbroker_server::run(config, shutdown_signal()).await;
    let _ = tokio::task::spawn_blocking(move || drop(telemetry)).await;
    served.context("eventbroker serve failed")?;
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
