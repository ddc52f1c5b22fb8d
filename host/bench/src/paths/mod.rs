//! One module per path: its bare baseline and its broker-side setup.

pub mod grants;
pub mod hooks;
pub mod memory;
pub mod nats;
pub mod redis;
pub mod sql;
pub mod stored;
pub mod wasm;

/// The result of one path: its row, or why it was skipped.
pub type Outcome = Result<crate::Row, crate::Skipped>;

pub(crate) fn skipped(path: &str, reason: impl Into<String>) -> crate::Skipped {
    crate::Skipped {
        path: path.to_owned(),
        reason: reason.into(),
    }
}
