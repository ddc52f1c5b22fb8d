//! How the client commands print for a person: aligned tables and short detail views. Every
//! command prints the API's JSON instead with `--json`.

use chrono::{DateTime, SecondsFormat, Utc};
use comfy_table::{ContentArrangement, Table, presets};
use serde_json::Value;

use eventbroker::event::{Event, HandlerOutcome, OutcomeState};

/// A borderless table with a header row, wrapped to the terminal's width when there is one.
pub fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    table
}

/// Prints a table: columns two spaces apart, no margin on the left.
pub fn print_table(mut table: Table) {
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    for line in table.lines() {
        println!("{}", line.trim_end());
    }
}

/// A timestamp to the second, UTC.
pub fn time(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Cuts `text` to `max` characters, marking the cut.
pub fn clip(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn outcome_word(outcome: &HandlerOutcome) -> &'static str {
    match outcome.state {
        OutcomeState::Succeeded => "ok",
        OutcomeState::Retrying => "retrying",
        OutcomeState::Failed => "failed",
    }
}

/// `2 ok, 1 failed` for an event's handlers; `-` when none ran.
pub fn outcome_summary(event: &Event) -> String {
    if event.handlers.is_empty() {
        return "-".into();
    }
    let count = |state: OutcomeState| event.handlers.iter().filter(|h| h.state == state).count();
    let parts: Vec<String> = [
        (OutcomeState::Succeeded, "ok"),
        (OutcomeState::Retrying, "retrying"),
        (OutcomeState::Failed, "failed"),
    ]
    .into_iter()
    .filter_map(|(state, word)| match count(state) {
        0 => None,
        n => Some(format!("{n} {word}")),
    })
    .collect();
    parts.join(", ")
}

/// The events table of `events list`.
pub fn events_table(events: &[Event]) -> Table {
    let mut table = table([
        "ID", "TYPE", "STATUS", "SOURCE", "CREATED", "RETRIES", "HANDLERS", "ERROR",
    ]);
    for event in events {
        table.add_row([
            event.id.clone(),
            event.event_type.clone(),
            event.status.as_str().to_owned(),
            event.source.as_str().to_owned(),
            time(&event.created_at),
            event.retry_count.to_string(),
            outcome_summary(event),
            clip(event.error.as_deref().unwrap_or(""), 60),
        ]);
    }
    table
}

/// The detail view of `events get` and `publish --sync`.
pub fn print_event(event: &Event) {
    let field = |name: &str, value: &str| {
        if !value.is_empty() {
            println!("{name:<12} {value}");
        }
    };
    field("id", &event.id);
    field("type", &event.event_type);
    field("status", event.status.as_str());
    field("source", event.source.as_str());
    field("created", &time(&event.created_at));
    field(
        "processed",
        &event.processed_at.as_ref().map(time).unwrap_or_default(),
    );
    field(
        "completed",
        &event.completed_at.as_ref().map(time).unwrap_or_default(),
    );
    field(
        "user",
        &event.user_id.map(|u| u.to_string()).unwrap_or_default(),
    );
    field("session", &event.session_id);
    field("instance", &event.instance_id);
    let crud = [&event.schema, &event.entity, &event.operation]
        .into_iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" / ");
    field("crud", &crud);
    field("retries", &event.retry_count.to_string());
    field("error", event.error.as_deref().unwrap_or(""));
    if let Some(Value::String(cause)) = event.metadata.get("caused_by") {
        field("caused by", cause);
    }
    if !event.metadata.is_empty() {
        field(
            "metadata",
            &serde_json::to_string(&event.metadata).unwrap_or_default(),
        );
    }
    field(
        "payload",
        &serde_json::to_string(&event.payload).unwrap_or_default(),
    );
    if event.handlers.is_empty() {
        return;
    }
    println!();
    let mut outcomes = table(["HANDLER", "OUTCOME", "ATTEMPTS", "VERSION", "FINISHED"]);
    for outcome in &event.handlers {
        outcomes.add_row([
            outcome.handler.clone(),
            outcome_word(outcome).to_owned(),
            outcome.attempts.to_string(),
            outcome
                .version
                .as_deref()
                .map(|v| clip(v, 12))
                .unwrap_or_else(|| "-".into()),
            time(&outcome.finished_at),
        ]);
    }
    print_table(outcomes);
    for outcome in &event.handlers {
        let Some(failure) = &outcome.last_error else {
            continue;
        };
        println!();
        println!(
            "{}: {} ({}): {}",
            outcome.handler,
            failure.kind,
            if failure.retryable {
                "retryable"
            } else {
                "not retried"
            },
            failure.message
        );
        if let Some(fuel) = failure.fuel_used {
            println!("  fuel used {fuel}");
        }
        for line in &failure.log_tail {
            println!("  | {line}");
        }
    }
}

/// The handlers table of `handlers list`, from `GET /v1/handlers`.
pub fn handlers_table(handlers: &[Value]) -> Table {
    let mut table = table([
        "NAME",
        "STATE",
        "VERSION",
        "PATTERNS",
        "LOADED",
        "INVOCATIONS",
        "FAILURES",
        "LAST REJECTION",
    ]);
    for handler in handlers {
        let current = &handler["current"];
        let patterns = current["patterns"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let invocations = handler["invocations"].as_object();
        let total: u64 = invocations
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0);
        let failures: Vec<String> = invocations
            .map(|m| {
                m.iter()
                    .filter(|(kind, n)| *kind != "ok" && n.as_u64().unwrap_or(0) > 0)
                    .map(|(kind, n)| format!("{kind} {}", n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        let rejection = handler["last_rejection"]["reason"]
            .as_str()
            .map(|r| clip(r, 60))
            .unwrap_or_default();
        table.add_row([
            text(&handler["name"]),
            text(&handler["state"]),
            current["version"]
                .as_str()
                .map(|v| clip(v, 12))
                .unwrap_or_else(|| "-".into()),
            patterns,
            current["loaded_at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| time(&t.with_timezone(&Utc)))
                .unwrap_or_default(),
            total.to_string(),
            if failures.is_empty() {
                "-".into()
            } else {
                failures.join(", ")
            },
            rejection,
        ]);
    }
    table
}

/// The cluster view of handlers (`None` when no handler has one: a host without a cluster
/// handler store): desired release, canary, what each host runs, the last canary decision.
pub fn cluster_table(handlers: &[Value]) -> Option<Table> {
    let clustered: Vec<&Value> = handlers
        .iter()
        .filter(|h| h["cluster"].is_object())
        .collect();
    if clustered.is_empty() {
        return None;
    }
    let mut table = table([
        "NAME",
        "DESIRED",
        "CANARY",
        "HOSTS",
        "CONVERGED",
        "LAST DECISION",
    ]);
    for handler in clustered {
        let cluster = &handler["cluster"];
        let desired = &cluster["desired"];
        let canary = &cluster["canary"];
        let hosts: Vec<String> = cluster["hosts"]
            .as_array()
            .map(|hosts| {
                hosts
                    .iter()
                    .map(|h| {
                        let mut line = format!("{} #{}", text(&h["host"]), text(&h["stable"]));
                        if !h["canary"].is_null() {
                            line.push_str(&format!("+#{}", text(&h["canary"])));
                        }
                        if h["state"] != "converged" {
                            line.push_str(&format!(" ({})", text(&h["state"])));
                        }
                        line
                    })
                    .collect()
            })
            .unwrap_or_default();
        let decision = cluster["decisions"]
            .as_array()
            .and_then(|d| d.last())
            .map(|d| {
                clip(
                    &format!(
                        "#{} {}: {}",
                        text(&d["release"]),
                        text(&d["outcome"]),
                        text(&d["reason"])
                    ),
                    70,
                )
            })
            .unwrap_or_else(|| "-".into());
        table.add_row([
            text(&handler["name"]),
            format!(
                "#{} {}",
                text(&desired["number"]),
                clip(&text(&desired["component"]), 12)
            ),
            if canary.is_object() {
                format!(
                    "#{} on {}%",
                    text(&canary["release"]),
                    text(&canary["percent"])
                )
            } else {
                "-".into()
            },
            hosts.join(", "),
            if cluster["converged"] == true {
                "yes".into()
            } else {
                "no".into()
            },
            decision,
        ]);
    }
    Some(table)
}

/// A JSON string value as text, other values as JSON, null as empty.
pub fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_marks_the_cut_and_keeps_one_line() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("a\nb", 10), "a b");
        assert_eq!(clip("ünïcödé text", 5), "ünïc…");
    }
}
