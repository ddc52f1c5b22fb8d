//! Commands that talk to a running host over HTTP.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;

use eventbroker::event::{EventDraft, EventSource};

/// Where the host is.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// Base URL of the host.
    #[arg(
        long,
        env = "EVENTBROKER_SERVER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
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
    let response = client()?
        .post(url(&args.server, &format!("/v1/events?mode={mode}")))
        .json(&draft)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", args.server.server))?;
    print_response(response).await
}

pub async fn events(command: EventsCommand) -> anyhow::Result<ExitCode> {
    let client = client()?;
    let response = match command {
        EventsCommand::Get { server, id } => client
            .get(url(&server, &format!("/v1/events/{id}")))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", server.server))?,
        EventsCommand::List { server, filters } => {
            let mut query = Vec::new();
            for filter in &filters {
                let Some((key, value)) = filter.split_once('=') else {
                    bail!("filter {filter:?} is not KEY=VALUE");
                };
                query.push((key.to_owned(), value.to_owned()));
            }
            client
                .get(url(&server, "/v1/events"))
                .query(&query)
                .send()
                .await
                .with_context(|| format!("cannot reach {}", server.server))?
        }
    };
    print_response(response).await
}
