//! Commands that talk to a running host over HTTP.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use eventbroker::event::{EventDraft, EventSource};

/// Where the host is, and how to authenticate.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// Base URL of the host.
    #[arg(
        long,
        env = "EVENTBROKER_SERVER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Bearer token (the admin token for deploy/remove/retry, the publish token to publish).
    #[arg(long, env = "EVENTBROKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `eventbroker deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The component.
    wasm: PathBuf,
    /// Handler name (default: the manifest's `name`, else the file name).
    #[arg(long, short)]
    name: Option<String>,
    /// Subscription pattern (repeatable); overrides the manifest's and the component's.
    #[arg(long = "pattern", short = 'p')]
    patterns: Vec<String>,
    /// Manifest file (TOML).
    #[arg(long, short)]
    manifest: Option<PathBuf>,
}

/// `eventbroker handlers …`.
#[derive(Debug, Subcommand)]
pub enum HandlersCommand {
    /// List deployed handlers with their versions, limits, counters and rejections.
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove a handler (after its running invocations finish) and delete its files.
    Remove {
        #[command(flatten)]
        server: ServerArg,
        /// Handler name.
        name: String,
    },
}

/// `eventbroker publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    server: ServerArg,
    /// A JSON file with the event (`-` for stdin); fields as in `POST /v1/events`.
    #[arg(conflicts_with_all = ["event_type", "payload"])]
    file: Option<PathBuf>,
    /// Event type, e.g. `public.users.create`.
    #[arg(long = "type", short = 't')]
    event_type: Option<String>,
    /// JSON payload.
    #[arg(long, short = 'p')]
    payload: Option<String>,
    /// Source: database, websocket, frontend, system, internal.
    #[arg(long, short = 's')]
    source: Option<EventSource>,
    /// Wait for the handlers and print the final event.
    #[arg(long)]
    sync: bool,
}

/// `eventbroker events …`.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print one event.
    Get {
        #[command(flatten)]
        server: ServerArg,
        /// Event id.
        id: String,
    },
    /// List events; filters as `GET /v1/events` query parameters.
    List {
        #[command(flatten)]
        server: ServerArg,
        /// Filters such as `status=failed`, `type=public.>`, `limit=10` (repeatable).
        #[arg(value_name = "KEY=VALUE")]
        filters: Vec<String>,
    },
    /// Re-run a finished (failed) event; handlers that succeeded are not run again.
    Retry {
        #[command(flatten)]
        server: ServerArg,
        /// Event id.
        id: String,
    },
}

fn client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("eventbroker-cli/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("cannot build HTTP client")
}

fn url(server: &ServerArg, path: &str) -> String {
    format!("{}{path}", server.server.trim_end_matches('/'))
}

fn authorized(request: reqwest::RequestBuilder, server: &ServerArg) -> reqwest::RequestBuilder {
    match &server.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

async fn send(
    request: reqwest::RequestBuilder,
    server: &ServerArg,
) -> anyhow::Result<reqwest::Response> {
    authorized(request, server)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", server.server))
}

/// Prints the response body; fails with the API's error message on non-2xx.
async fn print_response(response: reqwest::Response) -> anyhow::Result<ExitCode> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("server answered {status} with a body that is not JSON"))?;
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("unknown error");
        let code = body["error"]["code"].as_str().unwrap_or("unknown");
        bail!("server answered {status} ({code}): {message}");
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(ExitCode::SUCCESS)
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let draft: EventDraft = match (&args.file, &args.event_type) {
        (Some(path), _) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
            };
            serde_json::from_str(&text).context("the event file is not a valid event")?
        }
        (None, Some(event_type)) => {
            let mut draft = EventDraft::new(event_type.clone());
            draft.source = args.source;
            if let Some(payload) = &args.payload {
                draft.payload =
                    Some(serde_json::from_str(payload).context("--payload is not valid JSON")?);
            }
            draft
        }
        (None, None) => bail!("give an event file or --type"),
    };
    let mode = if args.sync { "sync" } else { "async" };
    let request = client()?
        .post(url(&args.server, &format!("/v1/events?mode={mode}")))
        .json(&draft);
    print_response(send(request, &args.server).await?).await
}

pub async fn events(command: EventsCommand) -> anyhow::Result<ExitCode> {
    let client = client()?;
    let response = match command {
        EventsCommand::Get { server, id } => {
            send(
                client.get(url(&server, &format!("/v1/events/{id}"))),
                &server,
            )
            .await?
        }
        EventsCommand::List { server, filters } => {
            let mut query = Vec::new();
            for filter in &filters {
                let Some((key, value)) = filter.split_once('=') else {
                    bail!("filter {filter:?} is not KEY=VALUE");
                };
                query.push((key.to_owned(), value.to_owned()));
            }
            send(
                client.get(url(&server, "/v1/events")).query(&query),
                &server,
            )
            .await?
        }
        EventsCommand::Retry { server, id } => {
            send(
                client.post(url(&server, &format!("/v1/events/{id}/retry"))),
                &server,
            )
            .await?
        }
    };
    print_response(response).await
}

pub async fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let component = std::fs::read(&args.wasm)
        .with_context(|| format!("cannot read {}", args.wasm.display()))?;
    let mut manifest: toml::Table = match &args.manifest {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .parse()
            .with_context(|| format!("{} is not valid TOML", path.display()))?,
        None => toml::Table::new(),
    };
    if !args.patterns.is_empty() {
        manifest.insert(
            "patterns".into(),
            toml::Value::Array(
                args.patterns
                    .iter()
                    .cloned()
                    .map(toml::Value::String)
                    .collect(),
            ),
        );
    }
    let name = match (&args.name, manifest.get("name").and_then(|v| v.as_str())) {
        (Some(name), _) => name.clone(),
        (None, Some(name)) => name.to_owned(),
        (None, None) => args
            .wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| s.replace('_', "-"))
            .context("cannot derive a handler name from the file name; use --name")?,
    };
    manifest.insert("name".into(), toml::Value::String(name.clone()));
    let form = reqwest::multipart::Form::new()
        .part(
            "component",
            reqwest::multipart::Part::bytes(component)
                .file_name(format!("{name}.wasm"))
                .mime_str("application/wasm")?,
        )
        .text("manifest", toml::to_string(&manifest)?);
    let request = client()?
        .put(url(&args.server, &format!("/v1/handlers/{name}")))
        .multipart(form);
    print_response(send(request, &args.server).await?).await
}

pub async fn handlers(command: HandlersCommand) -> anyhow::Result<ExitCode> {
    let client = client()?;
    match command {
        HandlersCommand::List { server } => {
            print_response(send(client.get(url(&server, "/v1/handlers")), &server).await?).await
        }
        HandlersCommand::Remove { server, name } => {
            let response = send(
                client.delete(url(&server, &format!("/v1/handlers/{name}"))),
                &server,
            )
            .await?;
            if response.status() == reqwest::StatusCode::NO_CONTENT {
                println!("removed {name}");
                return Ok(ExitCode::SUCCESS);
            }
            print_response(response).await
        }
    }
}
