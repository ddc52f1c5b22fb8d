//! Hot reload: watches the handlers directory and applies changes through
//! [`HandlerSet::load_file`] and [`HandlerSet::remove`].
//!
//! Only creations, modifications (content, metadata such as a `touch`, renames) and removals
//! count; access events — such as the watcher's own reads of the files — are ignored, so
//! reading a handler never triggers another read. A change whose files hold the version
//! already serving changes nothing and is not logged as a reload.
//!
//! File events are debounced (a file must be quiet for the debounce period before it is read),
//! and a component that does not load — a partially copied file included — is rejected while
//! the previous version keeps serving; the next change loads the complete file. Files whose
//! names start with `.` or end in `.partial`/`.tmp` are ignored, so the safe way to deploy by
//! copying is to write `.NAME.wasm.tmp` and `mv` it to `NAME.wasm` (an atomic rename).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::WasmError;
use super::manifest::validate_name;
use super::registry::HandlerSet;

/// A running watcher; dropping it (or cancelling) stops watching.
pub struct Watcher {
    stop: CancellationToken,
    _debouncer: Box<dyn std::any::Any + Send>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The handler name a changed path belongs to, if it is a handler file with a valid handler
/// name.
fn handler_name(path: &Path) -> Option<String> {
    let file_name = path.file_name()?.to_str()?;
    if file_name.starts_with('.') {
        return None;
    }
    let (stem, extension) = file_name.rsplit_once('.')?;
    if !matches!(extension, "wasm" | "toml") {
        return None;
    }
    if let Err(error) = validate_name(stem) {
        tracing::warn!(file = %path.display(), %error, "ignoring a handler file whose name is not a valid handler name");
        return None;
    }
    Some(stem.to_owned())
}

/// Whether a file event can change what a handler file holds: creations, modifications
/// (content, metadata, renames) and removals; not accesses (opens, reads, closes).
fn changes_files(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    )
}

/// Starts watching `handlers.dir()` (created if missing).
///
/// # Errors
/// [`WasmError::Io`] if the directory cannot be created or watched.
pub fn watch(handlers: HandlerSet, debounce: Duration) -> Result<Watcher, WasmError> {
    let dir = handlers.dir().to_path_buf();
    std::fs::create_dir_all(&dir)
        .map_err(|e| WasmError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let (sender, receiver) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer =
        new_debouncer(
            debounce,
            None,
            move |result: DebounceEventResult| match result {
                Ok(events) => {
                    let paths: Vec<PathBuf> = events
                        .into_iter()
                        .filter(|e| changes_files(&e.event.kind))
                        .flat_map(|e| e.event.paths)
                        .collect();
                    if !paths.is_empty() {
                        let _ = sender.send(paths);
                    }
                }
                Err(errors) => {
                    for error in errors {
                        tracing::warn!(%error, "handlers directory watch error");
                    }
                }
            },
        )
        .map_err(|e| WasmError::Io(format!("cannot watch {}: {e}", dir.display())))?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| WasmError::Io(format!("cannot watch {}: {e}", dir.display())))?;
    let stop = CancellationToken::new();
    tokio::spawn(apply_changes(handlers, receiver, stop.clone()));
    tracing::info!(dir = %dir.display(), "watching the handlers directory for changes");
    Ok(Watcher {
        stop,
        _debouncer: Box::new(debouncer),
    })
}

async fn apply_changes(
    handlers: HandlerSet,
    mut receiver: mpsc::UnboundedReceiver<Vec<PathBuf>>,
    stop: CancellationToken,
) {
    loop {
        let paths = tokio::select! {
            paths = receiver.recv() => match paths {
                Some(paths) => paths,
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let names: BTreeSet<String> = paths.iter().filter_map(|p| handler_name(p)).collect();
        for name in names {
            let wasm = handlers.dir().join(format!("{name}.wasm"));
            if wasm.exists() {
                match handlers.reload_file(&wasm).await {
                    Ok(Some(info)) => tracing::info!(
                        handler = %name,
                        version = %info.current.as_ref().map(|c| c.version.as_str()).unwrap_or(""),
                        "handler (re)loaded from the handlers directory"
                    ),
                    Ok(None) => {
                        tracing::debug!(handler = %name, "handler files changed but hold the serving version (or were written by this host's deploy)")
                    }
                    Err(error) => {
                        tracing::warn!(handler = %name, %error, "changed handler rejected; the previous version keeps serving")
                    }
                }
            } else if handlers.is_clustered() {
                tracing::info!(handler = %name, "handler file removed; the handler stays deployed in the cluster (remove it with `eventbroker handlers remove` or DELETE /v1/handlers/{name})");
            } else if handlers.get(&name).is_some() && handlers.remove(&name).await {
                tracing::info!(handler = %name, "handler removed (its component was deleted)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_handler_files_count() {
        assert_eq!(
            handler_name(Path::new("/h/audit.wasm")).as_deref(),
            Some("audit")
        );
        assert_eq!(
            handler_name(Path::new("/h/audit.toml")).as_deref(),
            Some("audit")
        );
        assert_eq!(handler_name(Path::new("/h/.audit.wasm.partial")), None);
        assert_eq!(handler_name(Path::new("/h/.audit.wasm.tmp")), None);
        assert_eq!(handler_name(Path::new("/h/audit.wasm.tmp")), None);
        assert_eq!(handler_name(Path::new("/h/readme.md")), None);
        assert_eq!(handler_name(Path::new("/h/has space.wasm")), None);
    }

    #[test]
    fn only_changes_count_not_accesses() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, MetadataKind, ModifyKind, RemoveKind, RenameMode,
        };
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
        ] {
            assert!(changes_files(&kind), "{kind:?}");
        }
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Read)),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            EventKind::Any,
        ] {
            assert!(!changes_files(&kind), "{kind:?}");
        }
    }
}
