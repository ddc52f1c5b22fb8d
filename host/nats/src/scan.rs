//! Reading every live entry of a key-value bucket (or of one subject filter in it): the one
//! scan loop behind event listings ([`crate::store`]), the handler store's record and report
//! listings ([`crate::handler_store`]) and key listings of handlers' key-value state
//! ([`crate::keyvalue`]).

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use async_nats::jetstream::{Message, kv};
use futures::StreamExt;

/// Messages asked for per fetch.
const BATCH: usize = 1000;

/// How a scan reads its bucket.
pub(crate) struct Scan<'a> {
    /// What is scanned, for the consumer's description and error messages.
    pub what: &'a str,
    /// The subject filter, under the bucket's prefix (`{prefix}>` for every key).
    pub filter: String,
    /// Read headers only: the visitor sees keys and revisions, never values.
    pub headers_only: bool,
}

/// Hands every key of `kv` under `scan.filter` whose latest entry is a value (not a delete or
/// purge marker) to `visit`, with the key (without the bucket's prefix) and its message. It
/// reads through one ephemeral pull consumer (`last_per_subject`, no acknowledgements), one
/// batch at a time, so it never holds more than a batch; the consumer is deleted afterwards
/// (the server drops it when idle if that fails).
///
/// # Errors
/// What failed, in words naming `scan.what`; or the visitor's error, which ends the scan.
pub(crate) async fn scan(
    kv: &kv::Store,
    scan: Scan<'_>,
    mut visit: impl FnMut(&str, &Message) -> Result<(), String>,
) -> Result<(), String> {
    let stream = &kv.stream;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            description: Some(format!("eventbroker {} scan", scan.what)),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            filter_subject: scan.filter,
            headers_only: scan.headers_only,
            inactive_threshold: Duration::from_secs(60),
            memory_storage: true,
            ..consumer::pull::Config::default()
        })
        .await
        .map_err(|e| format!("cannot list {}: {e}", scan.what))?;
    let result = drain(kv, &consumer, scan.what, &mut visit).await;
    let name = consumer.cached_info().name.clone();
    if let Err(error) = stream.delete_consumer(&name).await {
        tracing::debug!(%error, "could not delete a scan consumer; the server removes it when idle");
    }
    result
}

async fn drain(
    kv: &kv::Store,
    consumer: &consumer::PullConsumer,
    what: &str,
    visit: &mut impl FnMut(&str, &Message) -> Result<(), String>,
) -> Result<(), String> {
    // What the consumer had to deliver when it was created: asking for exactly what is left
    // lets the server answer the last request at once, instead of holding it open until it
    // expires (a scan cost five seconds at any size).
    let mut left = usize::try_from(consumer.cached_info().num_pending).unwrap_or(usize::MAX);
    while left > 0 {
        let wanted = left.min(BATCH);
        let mut batch = consumer
            .fetch()
            .max_messages(wanted)
            .expires(Duration::from_secs(5))
            .messages()
            .await
            .map_err(|e| format!("cannot list {what}: {e}"))?;
        let mut received = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| format!("listing {what} failed: {e}"))?;
            received += 1;
            let deleted = message
                .headers
                .as_ref()
                .and_then(|h| h.get("KV-Operation"))
                .is_some_and(|op| op.as_str() != "PUT");
            if deleted {
                continue;
            }
            if let Some(key) = message.subject.as_str().strip_prefix(kv.prefix.as_str()) {
                visit(key, &message)?;
            }
        }
        if received < wanted {
            break;
        }
        left -= received;
    }
    Ok(())
}
