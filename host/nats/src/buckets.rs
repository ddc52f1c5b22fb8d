//! Creating and deleting the key-value buckets of a namespace (event states, the handler
//! store's records and reports, handlers' key-value state): the one place that knows their
//! stream settings.

use std::time::Duration;

use async_nats::jetstream::context::DeleteStreamErrorKind;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, ErrorCode, kv};

/// Creates the key-value bucket `bucket` (history 1), or updates its settings if it exists,
/// and opens it.
///
/// The bucket's stream (`KV_{bucket}`) is written with the settings the client library uses
/// for buckets (one value per key, roll-ups allowed, direct gets), directly rather than
/// through the library's bucket creation, which needs an account query that servers before
/// 2.10 answer in a form the library cannot read. `max_age` zero keeps entries forever.
///
/// # Errors
/// What failed, in words naming the bucket.
pub(crate) async fn open_kv(
    context: &jetstream::Context,
    bucket: &str,
    description: &str,
    storage: StorageType,
    max_age: Duration,
) -> Result<kv::Store, String> {
    context
        .create_or_update_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(description.into()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage,
            allow_rollup: true,
            deny_delete: true,
            deny_purge: false,
            allow_direct: true,
            num_replicas: 1,
            discard: stream::DiscardPolicy::New,
            ..stream::Config::default()
        })
        .await
        .map_err(|e| format!("cannot create or update key-value bucket {bucket:?}: {e}"))?;
    context
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("cannot open key-value bucket {bucket:?}: {e}"))
}

/// Deletes the stream `name` with everything in it; a missing stream is fine (tear-down).
///
/// # Errors
/// What failed, in words naming the stream.
pub(crate) async fn delete_stream(context: &jetstream::Context, name: &str) -> Result<(), String> {
    match context.delete_stream(name).await {
        Ok(_) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                DeleteStreamErrorKind::JetStream(e)
                    if e.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(format!("cannot delete stream {name:?}: {error}")),
    }
}
