//! Commands that talk to a running host over HTTP: publish, events, deploy, handlers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;

use eventbroker::event::{Event, EventDraft, EventSource, EventStatus};

use super::exit::{Exit, fail, usage};
use super::remote::Remote;
use super::render;
use super::spinner::Spinner;

/// `eventbroker deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The component.
    wasm: PathBuf,
    /// Handler name (default: the manifest's `name`, else the file name). If the manifest
    /// names the handler too, both must agree (the host refuses the deploy otherwise).
    #[arg(long)]
    name: Option<String>,
    /// Subscription pattern (repeatable); overrides the manifest's and the component's.
    #[arg(long = "pattern", short = 'p')]
    patterns: Vec<String>,
    /// Manifest file (TOML).
    #[arg(long, short)]
    manifest: Option<PathBuf>,
    /// Deploy as a canary on this share of the handler's events (e.g. `10%`), judged against
    /// the stable release and promoted or rolled back automatically (cluster hosts only).
    #[arg(long, value_name = "PERCENT")]
    canary: Option<String>,
}

/// `eventbroker handlers …`.
#[derive(Debug, Subcommand)]
pub enum HandlersCommand {
    /// List deployed handlers with their versions, patterns, counters and rejections.
    List,
    /// Show one handler: version, limits, counters, last rejection.
    Get {
        /// Handler name.
        name: String,
    },
    /// Remove a handler (after its running invocations finish) and delete its files; in a
    /// cluster, from every host.
    Remove {
        /// Handler name.
        name: String,
    },
    /// Make an earlier release stable again on every host of the cluster (ends a canary).
    Rollback {
        /// Handler name.
        name: String,
        /// The release: `#N`, `N` or a component hash prefix (default: the one before the
        /// stable release).
        #[arg(long)]
        to: Option<String>,
    },
    /// Promote the running canary to stable now.
    Promote {
        /// Handler name.
        name: String,
    },
    /// Abort the running canary: the stable release serves every event again.
    Abort {
        /// Handler name.
        name: String,
    },
}

/// `eventbroker publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// A JSON file with the event (`-` for stdin); fields as in `POST /v1/events`.
    #[arg(conflicts_with_all = ["event_type", "payload"])]
    file: Option<PathBuf>,
    /// Event type, e.g. `public.users.create`.
    #[arg(long = "type", short = 't')]
    event_type: Option<String>,
    /// JSON payload (`-d` as in curl's data).
    #[arg(long, short = 'd')]
    payload: Option<String>,
    /// Source: database, websocket, frontend, system, internal.
    #[arg(long)]
    source: Option<EventSource>,
    /// Wait for the handlers and print the final event (exit 1 if it failed).
    #[arg(long)]
    sync: bool,
}

/// `eventbroker events …`.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Print one event: fields, payload, each handler's outcome with its failure and log lines.
    Get {
        /// Event id.
        id: String,
    },
    /// List stored events, newest first.
    List(ListArgs),
    /// Follow events as they are published and as their status changes (Ctrl-C to stop).
    Watch {
        /// Event types to follow, e.g. 'shop.>' (default: all). Quote patterns with `>`.
        pattern: Option<String>,
    },
    /// Re-run failed events; handlers that already succeeded are not run again.
    Retry(RetryArgs),
}

/// Filters of `events list` (and of `events retry --failed`).
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only events in this status: pending, processing, completed, failed.
    #[arg(long)]
    status: Option<EventStatus>,
    /// Only events whose type matches this pattern, e.g. 'shop.>'.
    #[arg(long = "type", short = 't')]
    type_pattern: Option<String>,
    /// Only events from this source.
    #[arg(long)]
    source: Option<EventSource>,
    /// Only events this handler ran on.
    #[arg(long)]
    handler: Option<String>,
    /// Only events created at or after this time: RFC 3339, or an age such as `15m` or `2h`.
    #[arg(long)]
    since: Option<String>,
    /// How many events (at most 1000).
    #[arg(long, short = 'n', default_value_t = 20)]
    limit: usize,
    /// Skip this many matching events (paging).
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// More filters as `GET /v1/events` query parameters, e.g. `user_id=42 entity=orders`.
    #[arg(value_name = "KEY=VALUE")]
    filters: Vec<String>,
}

/// `events retry`.
#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Event ids to retry.
    #[arg(required_unless_present = "failed")]
    ids: Vec<String>,
    /// Retry every failed event matching `--type`/`--source`/`--handler`/`--since` instead (the host
    /// retries them a page at a time, `POST /v1/events/retry`).
    #[arg(long, conflicts_with = "ids")]
    failed: bool,
    /// With `--failed`: only events whose type matches this pattern.
    #[arg(long = "type", short = 't', requires = "failed")]
    type_pattern: Option<String>,
    /// With `--failed`: only events from this source.
    #[arg(long, requires = "failed")]
    source: Option<EventSource>,
    /// With `--failed`: only events this handler ran on.
    #[arg(long, requires = "failed")]
    handler: Option<String>,
    /// With `--failed`: only events created at or after this time (RFC 3339 or an age).
    #[arg(long, requires = "failed")]
    since: Option<String>,
}

/// The answer of `GET /v1/events`.
#[derive(Debug, Deserialize)]
pub(super) struct EventPage {
    pub count: usize,
    pub events: Vec<Event>,
}

/// The handler name `deploy` uses: the manifest's `name`, else the file name (`_` as `-`).
pub(super) fn handler_name(
    declared: Option<&str>,
    wasm: &std::path::Path,
) -> anyhow::Result<String> {
    if let Some(name) = declared {
        return Ok(name.to_owned());
    }
    wasm.file_stem()
        .and_then(|s| s.to_str())
        .map(|s| s.replace('_', "-"))
        .ok_or_else(|| {
            fail(
                Exit::Usage,
                "cannot derive a handler name from the file name; give it (--name or --handler)",
            )
        })
}

/// Turns `--since` (RFC 3339 or an age like `15m`) into RFC 3339.
fn since(text: &str) -> anyhow::Result<String> {
    if chrono::DateTime::parse_from_rfc3339(text).is_ok() {
        return Ok(text.to_owned());
    }
    let age = humantime::parse_duration(text).map_err(|_| {
        fail(
            Exit::Usage,
            format!("--since {text:?} is neither an RFC 3339 time nor an age such as 15m or 2h"),
        )
    })?;
    let age = chrono::Duration::from_std(age)
        .map_err(|_| fail(Exit::Usage, format!("--since {text:?} is too long ago")))?;
    Ok(render::time(&(chrono::Utc::now() - age)))
}

fn list_query(args: &ListArgs) -> anyhow::Result<Vec<(String, String)>> {
    let mut query = vec![
        ("limit".to_owned(), args.limit.to_string()),
        ("offset".to_owned(), args.offset.to_string()),
    ];
    if let Some(status) = args.status {
        query.push(("status".into(), status.as_str().into()));
    }
    if let Some(pattern) = &args.type_pattern {
        query.push(("type".into(), pattern.clone()));
    }
    if let Some(source) = args.source {
        query.push(("source".into(), source.as_str().into()));
    }
    if let Some(handler) = &args.handler {
        query.push(("handler".into(), handler.clone()));
    }
    if let Some(at) = &args.since {
        query.push(("created_after".into(), since(at)?));
    }
    for filter in &args.filters {
        let Some((key, value)) = filter.split_once('=') else {
            return Err(fail(
                Exit::Usage,
                format!("filter {filter:?} is not KEY=VALUE (e.g. user_id=42)"),
            ));
        };
        query.push((key.to_owned(), value.to_owned()));
    }
    Ok(query)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `eventbroker publish`.
pub async fn publish(remote: &Remote, json: bool, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let draft: EventDraft = match (&args.file, &args.event_type) {
        (Some(path), _) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("cannot read stdin")
                    .map_err(usage)?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))
                    .map_err(usage)?
            };
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a valid event", path.display()))
                .map_err(usage)?
        }
        (None, Some(event_type)) => {
            let mut draft = EventDraft::new(event_type.clone());
            draft.source = args.source;
            if let Some(payload) = &args.payload {
                draft.payload = Some(
                    serde_json::from_str(payload)
                        .context("--payload is not valid JSON")
                        .map_err(usage)?,
                );
            }
            draft
        }
        (None, None) => {
            return Err(fail(
                Exit::Usage,
                "give an event file (or - for stdin) or --type TYPE [--payload JSON]",
            ));
        }
    };
    let mode = if args.sync { "sync" } else { "async" };
    let request = remote
        .request(Method::POST, &format!("v1/events?mode={mode}"))
        .json(&draft);
    if !args.sync {
        let accepted: Value = remote.call(request).await?;
        if json {
            print_json(&accepted)?;
        } else {
            println!(
                "published {} ({})",
                render::text(&accepted["id"]),
                render::text(&accepted["status"])
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let event: Event = remote.call(request).await?;
    if json {
        print_json(&event)?;
    } else {
        render::print_event(&event);
    }
    Ok(finished_code(&event))
}

fn finished_code(event: &Event) -> ExitCode {
    if event.status == EventStatus::Failed {
        Exit::Failed.code()
    } else {
        ExitCode::SUCCESS
    }
}

/// `eventbroker events …`.
pub async fn events(
    remote: &Remote,
    json: bool,
    command: EventsCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        EventsCommand::Get { id } => {
            let event: Event = remote
                .call(remote.request(Method::GET, &format!("v1/events/{}", encode(&id))))
                .await?;
            if json {
                print_json(&event)?;
            } else {
                render::print_event(&event);
            }
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::List(args) => {
            let query = list_query(&args)?;
            let response: Value = remote
                .call(remote.request(Method::GET, "v1/events").query(&query))
                .await?;
            if json {
                print_json(&response)?;
                return Ok(ExitCode::SUCCESS);
            }
            let page: EventPage = serde_json::from_value(response)
                .context("the host's event list is not in the format this CLI knows")?;
            if page.events.is_empty() {
                println!("no events match");
            } else {
                render::print_table(render::events_table(&page.events));
                if page.count == args.limit {
                    println!(
                        "\n{} shown; next page: --offset {}",
                        page.count,
                        args.offset + args.limit
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        EventsCommand::Watch { pattern } => super::watch::watch(remote, json, pattern).await,
        EventsCommand::Retry(args) => retry(remote, json, args).await,
    }
}

async fn retry(remote: &Remote, json: bool, args: RetryArgs) -> anyhow::Result<ExitCode> {
    let mut results: Vec<Value> = Vec::new();
    if args.failed {
        // The host retries the matching failed events a page at a time; retried events leave
        // `failed`, so the same filter gives the next page until none is left.
        let list = ListArgs {
            status: None,
            type_pattern: args.type_pattern,
            source: args.source,
            handler: args.handler,
            since: args.since,
            limit: 1000,
            offset: 0,
            filters: Vec::new(),
        };
        let query: Vec<(String, String)> = list_query(&list)?
            .into_iter()
            .filter(|(key, _)| key != "offset")
            .collect();
        loop {
            let page: Value = remote
                .call(
                    remote
                        .request(Method::POST, "v1/events/retry")
                        .query(&query),
                )
                .await?;
            let retried = page["retried"].as_u64().unwrap_or(0);
            results.extend(page["results"].as_array().cloned().unwrap_or_default());
            // Stop when the page was not full, or when nothing on it could be retried (the
            // same events would come back).
            if page["more"] != Value::Bool(true) || retried == 0 {
                break;
            }
        }
    } else {
        for id in &args.ids {
            let request = remote.request(Method::POST, &format!("v1/events/{}/retry", encode(id)));
            match remote.call::<Value>(request).await {
                Ok(answer) => {
                    results.push(serde_json::json!({"id": id, "status": answer["status"]}))
                }
                Err(error) => {
                    // Authentication and transport problems apply to every id: stop at once.
                    if let Some(failure) = error.downcast_ref::<super::exit::Failure>()
                        && failure.exit != Exit::Failed
                    {
                        return Err(error);
                    }
                    results.push(serde_json::json!({"id": id, "error": format!("{error:#}")}));
                }
            }
        }
    }
    let refused = results.iter().filter(|r| r.get("error").is_some()).count();
    if json {
        print_json(&serde_json::json!({"retried": results}))?;
    } else if results.is_empty() {
        println!("no failed events match");
    } else {
        for result in &results {
            match result.get("error") {
                Some(error) => {
                    let reason = error["message"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| render::text(error));
                    println!("not retried {}: {reason}", render::text(&result["id"]));
                }
                None => println!(
                    "retrying {} ({})",
                    render::text(&result["id"]),
                    render::text(&result["status"])
                ),
            }
        }
    }
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        Exit::Failed.code()
    })
}

/// Percent-encodes a path segment (event ids are chosen by publishers).
fn encode(segment: &str) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("a constant URL parses");
    url.path_segments_mut()
        .expect("an http URL has path segments")
        .push(segment);
    url.path().trim_start_matches('/').to_owned()
}

/// `eventbroker deploy`.
pub async fn deploy(remote: &Remote, json: bool, args: DeployArgs) -> anyhow::Result<ExitCode> {
    let component = std::fs::read(&args.wasm)
        .with_context(|| format!("cannot read {}", args.wasm.display()))
        .map_err(usage)?;
    let manifest_text = match &args.manifest {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(usage)?,
        ),
        None => None,
    };
    let mut manifest: toml::Table = match &manifest_text {
        Some(text) => text
            .parse()
            .with_context(|| {
                format!(
                    "{} is not valid TOML",
                    args.manifest
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            })
            .map_err(usage)?,
        None => toml::Table::new(),
    };
    let declared = manifest
        .get("name")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let name = match &args.name {
        Some(name) => name.clone(),
        None => handler_name(declared.as_deref(), &args.wasm)?,
    };
    // The manifest goes as written (a `name` in it that disagrees with --name is refused by
    // the host, the same answer as over HTTP); only --pattern rewrites it.
    let manifest_text = if args.patterns.is_empty() {
        manifest_text
    } else {
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
        Some(toml::to_string(&manifest)?)
    };
    let mut form = reqwest::multipart::Form::new().part(
        "component",
        reqwest::multipart::Part::bytes(component)
            .file_name(format!("{name}.wasm"))
            .mime_str("application/wasm")?,
    );
    if let Some(text) = manifest_text {
        form = form.text("manifest", text);
    }
    let mut request = remote
        .request(Method::PUT, &format!("v1/handlers/{}", encode(&name)))
        .multipart(form);
    if let Some(canary) = &args.canary {
        request = request.query(&[("canary", canary.as_str())]);
    }
    let spinner = Spinner::start(format!(
        "deploying {name}: the host compiles and checks it (Python and JavaScript components take a minute or more)"
    ));
    let answer = remote.call::<Value>(request).await;
    let elapsed = spinner.finish();
    let info = answer?;
    if json {
        print_json(&info)?;
    } else {
        let current = &info["current"];
        let cluster = &info["cluster"];
        let took = humantime::format_duration(Duration::from_millis(elapsed.as_millis() as u64));
        match (&cluster["canary"], cluster["desired"]["number"].as_u64()) {
            (canary, _) if canary.is_object() && args.canary.is_some() => println!(
                "deployed {} release #{} as a canary on {}% of its events in {took}; the stable release #{} serves the rest",
                render::text(&info["name"]),
                render::text(&canary["release"]),
                render::text(&canary["percent"]),
                render::text(&cluster["desired"]["number"]),
            ),
            (_, Some(release)) => println!(
                "deployed {} release #{release} (version {}) to the cluster in {took}; every host follows",
                render::text(&info["name"]),
                render::clip(&render::text(&cluster["desired"]["component"]), 12),
            ),
            _ => println!(
                "deployed {} version {} in {took}",
                render::text(&info["name"]),
                render::clip(&render::text(&current["version"]), 12),
            ),
        }
        let patterns: Vec<&str> = current["patterns"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!("patterns {}", patterns.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `eventbroker handlers …`.
pub async fn handlers(
    remote: &Remote,
    json: bool,
    command: HandlersCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        HandlersCommand::List => {
            let answer: Value = remote
                .call(remote.request(Method::GET, "v1/handlers"))
                .await?;
            if json {
                print_json(&answer)?;
                return Ok(ExitCode::SUCCESS);
            }
            match answer["handlers"].as_array() {
                Some(list) if !list.is_empty() => {
                    render::print_table(render::handlers_table(list));
                    if let Some(cluster) = render::cluster_table(list) {
                        println!();
                        render::print_table(cluster);
                    }
                }
                _ => println!("no handlers deployed"),
            }
            Ok(ExitCode::SUCCESS)
        }
        HandlersCommand::Get { name } => {
            let info: Value = remote
                .call(remote.request(Method::GET, &format!("v1/handlers/{}", encode(&name))))
                .await?;
            if json {
                print_json(&info)?;
            } else {
                render::print_table(render::handlers_table(std::slice::from_ref(&info)));
                let spec = &info["current"]["spec"];
                if !spec.is_null() {
                    println!();
                    println!(
                        "limits  fuel {}, memory {}, timeout {}, concurrency {}, instances {}",
                        render::text(&spec["fuel"]),
                        spec["memory"]
                            .as_u64()
                            .map(|b| bytesize::ByteSize::b(b).to_string())
                            .unwrap_or_default(),
                        render::text(&spec["timeout"]),
                        render::text(&spec["concurrency"]),
                        render::text(&spec["instances"]),
                    );
                }
                println!(
                    "busy    {}, fuel used {}",
                    render::text(&info["busy_time"]),
                    render::text(&info["fuel_used"])
                );
                if let Some(reason) = info["last_rejection"]["reason"].as_str() {
                    println!("last rejection: {reason}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        HandlersCommand::Rollback { name, to } => {
            let body = serde_json::json!({ "to": to });
            let request = remote
                .request(
                    Method::POST,
                    &format!("v1/handlers/{}/rollback", encode(&name)),
                )
                .json(&body);
            let info: Value = remote.call(request).await?;
            print_change(json, &info, "rolled back")
        }
        HandlersCommand::Promote { name } => {
            let request = remote.request(
                Method::POST,
                &format!("v1/handlers/{}/promote", encode(&name)),
            );
            let info: Value = remote.call(request).await?;
            print_change(json, &info, "promoted its canary")
        }
        HandlersCommand::Abort { name } => {
            let request = remote.request(
                Method::POST,
                &format!("v1/handlers/{}/abort", encode(&name)),
            );
            let info: Value = remote.call(request).await?;
            print_change(json, &info, "aborted its canary")
        }
        HandlersCommand::Remove { name } => {
            let response = remote
                .send(remote.request(Method::DELETE, &format!("v1/handlers/{}", encode(&name))))
                .await?;
            if !response.status().is_success() {
                return Err(remote.refused(response).await);
            }
            if json {
                print_json(&serde_json::json!({"removed": name}))?;
            } else {
                println!("removed {name}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints a handler after a cluster change: `NAME rolled back: release #N (version) is stable`.
fn print_change(json: bool, info: &Value, what: &str) -> anyhow::Result<ExitCode> {
    if json {
        print_json(info)?;
    } else {
        let desired = &info["cluster"]["desired"];
        println!(
            "{} {what}: release #{} (version {}) is stable on every host",
            render::text(&info["name"]),
            render::text(&desired["number"]),
            render::clip(&render::text(&desired["component"]), 12),
        );
    }
    Ok(ExitCode::SUCCESS)
}
