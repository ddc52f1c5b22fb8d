//! `eventbroker run GUEST.wasm --from HOST [--type PATTERN] [--last N]`: a dry run of a new
//! version against a running host's stored events. The events are fetched, run locally in the
//! service's sandbox (derived events are recorded, never published), and each outcome is shown
//! beside what the deployed version of the same handler recorded for that event.
//!
//! Exit status: 0 when no event that the deployed version handled successfully fails locally,
//! 1 when at least one does (a regression), as for any failed command.

use std::process::ExitCode;

use reqwest::{Method, Url};
use serde::Serialize;

use eventbroker::event::{Event, OutcomeState};

use super::client::{EventPage, handler_name};
use super::exit::{Exit, fail};
use super::guest::{RunArgs, run_events};
use super::remote::Remote;
use super::render;

/// What one side did with one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
enum Side {
    /// The handler succeeded.
    Ok,
    /// The handler failed (its kind and message).
    Failed { kind: String, message: String },
    /// The handler is retrying the event (deployed side only).
    Retrying { kind: String, message: String },
    /// The deployed handler has no outcome for this event (it did not match, or it was
    /// deployed later).
    NotRun,
}

impl Side {
    fn succeeded(&self) -> bool {
        matches!(self, Side::Ok)
    }

    fn text(&self) -> String {
        match self {
            Side::Ok => "ok".into(),
            Side::Failed { kind, message } => format!("{kind}: {message}"),
            Side::Retrying { kind, message } => format!("retrying after {kind}: {message}"),
            Side::NotRun => "-".into(),
        }
    }
}

/// One row of the comparison.
#[derive(Debug, Serialize)]
struct Compared {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    /// The deployed version that recorded `recorded`, if any.
    recorded_version: Option<String>,
    recorded: Side,
    local: Side,
}

/// Runs the dry run.
///
/// # Errors
/// When the host cannot be reached or refuses, or the component cannot be loaded.
pub async fn replay(
    json: bool,
    token: Option<String>,
    from: Url,
    args: RunArgs,
    bytes: Vec<u8>,
    manifest: Option<String>,
) -> anyhow::Result<ExitCode> {
    let (type_pattern, last, handler) = (
        args.type_pattern.as_deref(),
        args.last,
        args.handler.as_deref(),
    );
    if last == 0 || last > 1000 {
        return Err(fail(Exit::Usage, "--last takes 1 to 1000 events"));
    }
    let handler = match handler {
        Some(name) => name.to_owned(),
        None => deployed_name(manifest.as_deref(), &args.wasm)?,
    };
    let remote = Remote::new(from, token)?;
    let mut query = vec![("limit", last.to_string())];
    if let Some(pattern) = type_pattern {
        query.push(("type", pattern.to_owned()));
    }
    let page: EventPage = remote
        .call(remote.request(Method::GET, "v1/events").query(&query))
        .await?;
    if page.events.is_empty() {
        return Err(fail(
            Exit::Failed,
            format!(
                "{} has no stored events{}: nothing to run",
                remote.base(),
                type_pattern
                    .map(|p| format!(" matching {p:?}"))
                    .unwrap_or_default()
            ),
        ));
    }
    // Newest first from the API; run them in the order they happened.
    let mut events = page.events;
    events.reverse();
    let recorded: Vec<(Option<String>, Side)> =
        events.iter().map(|e| recorded_side(e, &handler)).collect();
    let report = run_events(&args, &bytes, manifest.as_deref(), events).await?;
    let rows: Vec<Compared> = report
        .results
        .iter()
        .zip(recorded)
        .map(|(result, (recorded_version, recorded))| Compared {
            id: result.event.id.clone(),
            event_type: result.event.event_type.clone(),
            recorded_version,
            recorded,
            local: match &result.invocation.result {
                Ok(()) => Side::Ok,
                Err(failure) => Side::Failed {
                    kind: failure.kind.to_string(),
                    message: failure.message.clone(),
                },
            },
        })
        .collect();
    let regressions = rows
        .iter()
        .filter(|row| row.recorded.succeeded() && !row.local.succeeded())
        .count();
    let differ = rows.iter().filter(|row| !agree(row)).count();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "handler": handler,
                "version": report.handler.version,
                "events": rows,
                "differ": differ,
                "regressions": regressions,
            }))?
        );
    } else {
        println!(
            "dry run of {} (version {}) against {} events from {}; compared with handler {handler:?}; nothing was published",
            &args.wasm.display(),
            render::clip(&report.handler.version, 12),
            rows.len(),
            remote.base()
        );
        println!();
        let mut table = render::table(["ID", "TYPE", "DEPLOYED", "THIS VERSION", "SAME"]);
        for row in &rows {
            table.add_row([
                row.id.clone(),
                row.event_type.clone(),
                render::clip(
                    &match &row.recorded_version {
                        Some(version) => {
                            format!("{} ({})", row.recorded.text(), render::clip(version, 8))
                        }
                        None => row.recorded.text(),
                    },
                    50,
                ),
                render::clip(&row.local.text(), 50),
                if agree(row) { "yes" } else { "NO" }.to_owned(),
            ]);
        }
        render::print_table(table);
        println!();
        println!(
            "{} events: {} as deployed, {differ} different, {regressions} failing here that succeeded deployed",
            rows.len(),
            rows.len() - differ
        );
    }
    Ok(if regressions == 0 {
        ExitCode::SUCCESS
    } else {
        Exit::Failed.code()
    })
}

/// Whether both sides did the same: both succeeded, or both failed with the same kind.
fn agree(row: &Compared) -> bool {
    match (&row.recorded, &row.local) {
        (Side::Ok, Side::Ok) | (Side::NotRun, _) => true,
        (
            Side::Failed { kind: a, .. } | Side::Retrying { kind: a, .. },
            Side::Failed { kind: b, .. },
        ) => a == b,
        _ => false,
    }
}

/// What the deployed handler `name` recorded for `event`.
fn recorded_side(event: &Event, name: &str) -> (Option<String>, Side) {
    let Some(outcome) = event.handlers.iter().find(|h| h.handler == name) else {
        return (None, Side::NotRun);
    };
    let (kind, message) = outcome
        .last_error
        .as_ref()
        .map(|f| (f.kind.to_string(), f.message.clone()))
        .unwrap_or_default();
    let side = match outcome.state {
        OutcomeState::Succeeded => Side::Ok,
        OutcomeState::Failed => Side::Failed { kind, message },
        OutcomeState::Retrying => Side::Retrying { kind, message },
    };
    (outcome.version.clone(), side)
}

/// The handler name `deploy` would use for this component and manifest.
fn deployed_name(manifest: Option<&str>, wasm: &std::path::Path) -> anyhow::Result<String> {
    let declared = match manifest {
        Some(text) => {
            eventbroker_wasm::Manifest::parse(text)
                .map_err(|e| fail(Exit::Usage, e.to_string()))?
                .name
        }
        None => None,
    };
    handler_name(declared.as_deref(), wasm)
}
