//! The `capture` section: PostgreSQL change capture's keys, defaults and validation (see
//! `CaptureConfig::validate` in the parent module).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A change that PostgreSQL change capture publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureOperation {
    /// `INSERT`, published as `schema.table.create`.
    Create,
    /// `UPDATE`, published as `schema.table.update`.
    Update,
    /// `DELETE`, published as `schema.table.delete`.
    Delete,
}

impl CaptureOperation {
    /// The operation's name in event types.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureOperation::Create => "create",
            CaptureOperation::Update => "update",
            CaptureOperation::Delete => "delete",
        }
    }

    /// The SQL trigger event that produces it.
    pub fn trigger_event(self) -> &'static str {
        match self {
            CaptureOperation::Create => "INSERT",
            CaptureOperation::Update => "UPDATE",
            CaptureOperation::Delete => "DELETE",
        }
    }
}

/// PostgreSQL change capture: `eventbroker serve` publishes `schema.table.create|update|delete`
/// events (source `database`) for every committed change of the watched tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Connection URL of the watched database (`postgres://…`); required when `tables` is set.
    pub url: String,
    /// Watched tables as `schema.table` (plain identifiers, case-sensitive). Empty: capture off.
    pub tables: Vec<String>,
    /// Which changes are captured.
    pub operations: Vec<CaptureOperation>,
    /// How often the outbox is polled when no notification arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Outbox rows published per transaction.
    pub batch_size: usize,
    /// Schema (in the watched database) holding the outbox table and the trigger function.
    pub schema: String,
    /// Install (or update) the trigger function, triggers and outbox when the host starts.
    /// Off: install them with `eventbroker capture install`.
    pub install: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            url: String::new(),
            tables: Vec::new(),
            operations: vec![
                CaptureOperation::Create,
                CaptureOperation::Update,
                CaptureOperation::Delete,
            ],
            poll_interval: Duration::from_secs(1),
            batch_size: 100,
            schema: "eventbroker".into(),
            install: true,
        }
    }
}

impl CaptureConfig {
    /// Whether capture is on (some table is watched).
    pub fn enabled(&self) -> bool {
        !self.tables.is_empty()
    }
}
