//! The `[keyvalue]` grant of a manifest: which buckets a handler may open, its quota per
//! bucket and its operation budget per invocation. Parsing only; no I/O.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::WasmError;
use eventbroker::keyvalue::Quota;

/// Keys per bucket when the manifest does not say.
pub const DEFAULT_MAX_KEYS: u64 = 10_000;
/// Bytes per bucket (keys and values) when the manifest does not say.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024;
/// Operations per invocation when the manifest does not say.
pub const DEFAULT_MAX_OPERATIONS: u32 = 1_000;
/// The longest bucket name.
pub const MAX_BUCKET_NAME: usize = 64;

/// `[keyvalue]` as written in a manifest.
///
/// ```toml
/// [keyvalue]
/// buckets = ["dedupe", "counts"]
/// max_keys = 10_000        # per bucket
/// max_bytes = "1MiB"       # per bucket, keys and values together
/// max_operations = 1000    # per invocation
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValueManifest {
    /// Buckets the handler may open (`wasi:keyvalue/store.open`). Letters, digits, `-`, `_`.
    pub buckets: Vec<String>,
    /// Keys one bucket may hold.
    pub max_keys: Option<u64>,
    /// Bytes one bucket may hold (keys and values together).
    #[serde(default, with = "eventbroker::size::serde::option")]
    pub max_bytes: Option<ByteSize>,
    /// Key-value operations per invocation (batch operations count one per key).
    pub max_operations: Option<u32>,
}

/// A resolved `[keyvalue]` grant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyValueGrant {
    /// Buckets the handler may open.
    pub buckets: Vec<String>,
    /// Keys one bucket may hold.
    pub max_keys: u64,
    /// Bytes one bucket may hold.
    pub max_bytes: u64,
    /// Operations per invocation.
    pub max_operations: u32,
}

impl KeyValueGrant {
    /// The quota of each bucket.
    pub fn quota(&self) -> Quota {
        Quota {
            max_keys: self.max_keys,
            max_bytes: self.max_bytes,
        }
    }

    /// Whether the handler may open `bucket`.
    pub fn grants(&self, bucket: &str) -> bool {
        self.buckets.iter().any(|b| b == bucket)
    }
}

impl KeyValueManifest {
    /// Checks the section and fills in defaults.
    ///
    /// # Errors
    /// [`WasmError::Manifest`] saying which field is wrong and why.
    pub fn resolve(self) -> Result<KeyValueGrant, WasmError> {
        let bad = |message: String| WasmError::Manifest(format!("keyvalue.{message}"));
        if self.buckets.is_empty() {
            return Err(bad(
                "buckets is empty: list the buckets the handler may open, e.g. buckets = [\"dedupe\"]"
                    .into(),
            ));
        }
        for bucket in &self.buckets {
            let valid = !bucket.is_empty()
                && bucket.len() <= MAX_BUCKET_NAME
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return Err(bad(format!(
                    "buckets entry {bucket:?} is not a bucket name: use 1 to {MAX_BUCKET_NAME} letters, digits, '-' or '_'"
                )));
            }
        }
        let max_keys = self.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
        if max_keys == 0 {
            return Err(bad("max_keys must be at least 1".into()));
        }
        let max_bytes = self.max_bytes.map_or(DEFAULT_MAX_BYTES, |b| b.as_u64());
        if max_bytes == 0 {
            return Err(bad("max_bytes must be at least 1 byte".into()));
        }
        let max_operations = self.max_operations.unwrap_or(DEFAULT_MAX_OPERATIONS);
        if max_operations == 0 {
            return Err(bad("max_operations must be at least 1".into()));
        }
        let mut buckets = self.buckets;
        buckets.sort();
        buckets.dedup();
        Ok(KeyValueGrant {
            buckets,
            max_keys,
            max_bytes,
            max_operations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<KeyValueGrant, WasmError> {
        toml::from_str::<KeyValueManifest>(text)
            .map_err(|e| WasmError::Manifest(e.to_string()))?
            .resolve()
    }

    #[test]
    fn defaults_fill_what_the_manifest_leaves_out() {
        let grant = parse(r#"buckets = ["dedupe", "counts", "dedupe"]"#).expect("valid");
        assert_eq!(grant.buckets, ["counts", "dedupe"]);
        assert_eq!(grant.max_keys, DEFAULT_MAX_KEYS);
        assert_eq!(grant.max_bytes, DEFAULT_MAX_BYTES);
        assert_eq!(grant.max_operations, DEFAULT_MAX_OPERATIONS);
        assert!(grant.grants("dedupe") && !grant.grants("other"));
        let tight = parse(
            r#"buckets = ["a"]
max_keys = 3
max_bytes = "2KiB"
max_operations = 5"#,
        )
        .expect("valid");
        assert_eq!(
            (tight.max_keys, tight.max_bytes, tight.max_operations),
            (3, 2048, 5)
        );
    }

    #[test]
    fn bad_sections_say_what_is_wrong() {
        for (text, expected) in [
            ("buckets = []", "buckets is empty"),
            (r#"buckets = ["a/b"]"#, "not a bucket name"),
            (r#"buckets = [""]"#, "not a bucket name"),
            ("buckets = [\"a\"]\nmax_keys = 0", "max_keys"),
            ("buckets = [\"a\"]\nmax_operations = 0", "max_operations"),
            ("buckets = [\"a\"]\nmax_bytes = \"0B\"", "max_bytes"),
        ] {
            let error = parse(text).expect_err(text).to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
        assert!(
            parse("buckets = [\"a\"]\nttl = 3").is_err(),
            "unknown field"
        );
    }
}
