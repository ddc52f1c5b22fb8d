//! `eventbroker events watch [PATTERN]`: follows `GET /v1/stream` (Server-Sent Events) and
//! prints one line per event change, or one JSON object per line with `--json`.

use std::process::ExitCode;

use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::Method;

use eventbroker::event::Event;

use super::exit::{Exit, fail};
use super::remote::Remote;
use super::render;

/// Prints events matching `pattern` as they change, until the stream ends or Ctrl-C.
///
/// # Errors
/// When the host cannot be reached or refuses; when the host cuts the stream because this
/// client fell behind (`event: error`), with its reason (exit 1).
pub async fn watch(
    remote: &Remote,
    json: bool,
    pattern: Option<String>,
) -> anyhow::Result<ExitCode> {
    let mut request = remote
        .request(Method::GET, "v1/stream")
        .header(reqwest::header::ACCEPT, "text/event-stream");
    if let Some(pattern) = &pattern {
        request = request.query(&[("pattern", pattern)]);
    }
    let response = remote.send(request).await?;
    if !response.status().is_success() {
        return Err(remote.refused(response).await);
    }
    if !json {
        eprintln!(
            "watching {} on {} (Ctrl-C to stop)",
            pattern.as_deref().unwrap_or("all events"),
            remote.base()
        );
    }
    let mut stream = response.bytes_stream().eventsource();
    while let Some(message) = stream.next().await {
        let message = message.map_err(|e| {
            fail(
                Exit::Unreachable,
                format!("the stream from {} broke: {e}", remote.base()),
            )
        })?;
        if message.event == "error" {
            return Err(fail(
                Exit::Failed,
                format!(
                    "the host ended the stream: {}; run the command again to continue",
                    message.data
                ),
            ));
        }
        if json {
            println!("{}", message.data);
            continue;
        }
        match serde_json::from_str::<Event>(&message.data) {
            Ok(event) => println!(
                "{}  {:<10}  {}  {}{}",
                render::time(&chrono::Utc::now()),
                event.status.as_str(),
                event.event_type,
                event.id,
                event
                    .error
                    .as_deref()
                    .map(|e| format!("  {}", render::clip(e, 80)))
                    .unwrap_or_default()
            ),
            Err(_) => println!(
                "{}  {}  {}",
                render::time(&chrono::Utc::now()),
                message.event,
                message.data
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
