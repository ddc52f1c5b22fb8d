//! `eventbroker capture install|uninstall`: manage PostgreSQL change capture in the
//! database named by the config's `capture` section.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use eventbroker_server::capture;
use eventbroker_server::config::Config;

/// Change capture commands.
#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Create or update the outbox, trigger function and triggers (idempotent; `serve` does
    /// this at start unless `capture.install` is false).
    Install(CaptureArgs),
    /// Drop the triggers, trigger function, outbox and (if empty) its schema.
    Uninstall(UninstallArgs),
}

/// Where the capture section comes from.
#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// Config file (YAML or TOML) with a `capture` section.
    #[arg(long, short, env = "EVENTBROKER_CONFIG")]
    config: Option<PathBuf>,
}

/// Arguments of `capture uninstall`.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    common: CaptureArgs,
    /// Drop changes still waiting in the outbox (they are never published).
    #[arg(long)]
    force: bool,
}

fn load(args: &CaptureArgs) -> anyhow::Result<eventbroker_server::config::CaptureConfig> {
    let config = Config::load(args.config.as_deref())?;
    if config.capture.url.is_empty() {
        anyhow::bail!("the config has no capture.url: nothing to manage");
    }
    Ok(config.capture)
}

/// Runs a capture command.
pub async fn capture(command: CaptureCommand) -> anyhow::Result<ExitCode> {
    match command {
        CaptureCommand::Install(args) => {
            let config = load(&args)?;
            let pool = capture::connect(&config)
                .await
                .context("cannot connect to capture.url")?;
            let report = capture::install(&pool, &config).await?;
            println!(
                "change capture installed in schema {:?}: triggers on {}",
                config.schema,
                if report.tables.is_empty() {
                    "no tables".to_owned()
                } else {
                    report.tables.join(", ")
                }
            );
            if !report.removed.is_empty() {
                println!("triggers removed from {}", report.removed.join(", "));
            }
            println!("{} changes waiting in the outbox", report.pending);
        }
        CaptureCommand::Uninstall(args) => {
            let config = load(&args.common)?;
            let pool = capture::connect(&config)
                .await
                .context("cannot connect to capture.url")?;
            let report = capture::uninstall(&pool, &config, args.force).await?;
            println!(
                "change capture removed: triggers dropped from {}; outbox and trigger function dropped; schema {:?} {}",
                if report.tables.is_empty() {
                    "no tables".to_owned()
                } else {
                    report.tables.join(", ")
                },
                config.schema,
                if report.schema_dropped {
                    "dropped"
                } else {
                    "kept (not empty)"
                }
            );
            if report.dropped_changes > 0 {
                println!(
                    "{} unpublished changes were dropped (--force)",
                    report.dropped_changes
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
