//! A JSON file as the key-value store of `eventbroker run --kv FILE`: read before the run,
//! written back after it, so a guest with state can be tested locally across runs.
//!
//! The file maps each bucket to its keys; a value is a JSON string when it is UTF-8 text,
//! else `{"base64": "..."}`:
//!
//! ```json
//! { "dedupe": { "order-1": "1" }, "counts": { "shop.order.created": "3" } }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::KeyValueBinding;
use crate::WasmError;
use eventbroker::MemoryKeyValue;
use eventbroker::keyvalue::Namespace;

/// The scope of every namespace of a local run.
const SCOPE: &str = "local";

/// A value as the file writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum FileValue {
    /// UTF-8 text.
    Text(String),
    /// Any bytes.
    Bytes {
        /// Standard base64 with padding.
        base64: String,
    },
}

type FileContents = BTreeMap<String, BTreeMap<String, FileValue>>;
type Decoded = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// The store of one local run, backed by a JSON file.
#[derive(Clone)]
pub struct KvFile {
    /// `None`: the store is discarded after the run.
    path: Option<PathBuf>,
    contents: Arc<Decoded>,
    store: MemoryKeyValue,
}

impl std::fmt::Debug for KvFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvFile").field("path", &self.path).finish()
    }
}

impl KvFile {
    /// Reads `path` (a missing file is an empty store, created on [`KvFile::save`]).
    ///
    /// # Errors
    /// [`WasmError::Io`] when the file cannot be read or is not a store file, saying where.
    pub fn open(path: &Path) -> Result<Self, WasmError> {
        let contents = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str::<FileContents>(&text).map_err(|e| {
                WasmError::Io(format!(
                    "{} is not a key-value file ({{\"bucket\": {{\"key\": \"value\" or {{\"base64\": \"...\"}}}}}}): {e}",
                    path.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileContents::new(),
            Err(e) => {
                return Err(WasmError::Io(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        let mut decoded = Decoded::new();
        for (bucket, entries) in contents {
            let mut values = BTreeMap::new();
            for (key, value) in entries {
                let bytes = match value {
                    FileValue::Text(text) => text.into_bytes(),
                    FileValue::Bytes { base64 } => base64::engine::general_purpose::STANDARD
                        .decode(base64)
                        .map_err(|e| {
                            WasmError::Io(format!(
                                "{}: bucket {bucket:?}, key {key:?}: invalid base64: {e}",
                                path.display()
                            ))
                        })?,
                };
                values.insert(key, bytes);
            }
            decoded.insert(bucket, values);
        }
        Ok(KvFile {
            path: Some(path.to_owned()),
            contents: Arc::new(decoded),
            store: MemoryKeyValue::new(),
        })
    }

    /// An empty store that is not written anywhere (a run without `--kv`, or `check`).
    pub fn discarded() -> Self {
        KvFile {
            path: None,
            contents: Arc::new(Decoded::new()),
            store: MemoryKeyValue::new(),
        }
    }

    /// The store as the engine's binding.
    pub fn binding(&self) -> KeyValueBinding {
        KeyValueBinding {
            store: Arc::new(self.store.clone()),
            scope: SCOPE.into(),
        }
    }

    /// Puts the file's buckets in place for `handler` (the name the run resolved).
    pub fn load(&self, handler: &str) {
        for (bucket, entries) in self.contents.iter() {
            self.store
                .import(&Namespace::new(SCOPE, handler, bucket), entries.clone());
        }
    }

    /// Writes the store back to the file (through a temporary file and a rename, so an
    /// interrupted write leaves the old file); nothing for a discarded store.
    ///
    /// # Errors
    /// [`WasmError::Io`] when the file cannot be written.
    pub fn save(&self) -> Result<(), WasmError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut contents = FileContents::new();
        for (id, entries) in self.store.export() {
            let bucket = id
                .rsplit_once('/')
                .map_or(id.as_str(), |(_, b)| b)
                .to_owned();
            let values = entries
                .into_iter()
                .map(|(key, bytes)| {
                    let value = match String::from_utf8(bytes) {
                        Ok(text) => FileValue::Text(text),
                        Err(e) => FileValue::Bytes {
                            base64: base64::engine::general_purpose::STANDARD
                                .encode(e.into_bytes()),
                        },
                    };
                    (key, value)
                })
                .collect();
            contents.insert(bucket, values);
        }
        let text = serde_json::to_string_pretty(&contents)
            .map_err(|e| WasmError::Io(format!("cannot encode the key-value file: {e}")))?;
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        std::fs::write(&temporary, text + "\n")
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(|e| WasmError::Io(format!("cannot write {}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbroker::keyvalue::Quota;

    #[tokio::test]
    async fn a_file_round_trips_text_and_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kv.json");
        std::fs::write(
            &path,
            r#"{"dedupe": {"a": "1", "raw": {"base64": "AP8="}}}"#,
        )
        .expect("write");
        let file = KvFile::open(&path).expect("open");
        file.load("h");
        let binding = file.binding();
        let ns = Namespace::new(SCOPE, "h", "dedupe");
        assert_eq!(
            binding.store.get(&ns, "raw").await.expect("get"),
            Some(vec![0, 255])
        );
        let quota = Quota {
            max_keys: 10,
            max_bytes: 100,
        };
        binding
            .store
            .increment(&ns, "a", 1, &quota)
            .await
            .expect("increment");
        binding
            .store
            .set(&Namespace::new(SCOPE, "h", "counts"), "x", b"7", &quota)
            .await
            .expect("set");
        file.save().expect("save");
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        assert_eq!(
            saved,
            serde_json::json!({"counts": {"x": "7"}, "dedupe": {"a": "2", "raw": {"base64": "AP8="}}})
        );
    }

    #[test]
    fn a_missing_file_is_empty_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(KvFile::open(&dir.path().join("new.json")).is_ok());
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"b": {"k": 3}}"#).expect("write");
        let error = KvFile::open(&bad).expect_err("number value").to_string();
        assert!(error.contains("not a key-value file"), "{error}");
        std::fs::write(&bad, r#"{"b": {"k": {"base64": "!!"}}}"#).expect("write");
        let error = KvFile::open(&bad).expect_err("bad base64").to_string();
        assert!(error.contains("invalid base64"), "{error}");
    }
}
