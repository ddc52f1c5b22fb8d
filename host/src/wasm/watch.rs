//! Hot reload: watches the handlers directory and applies changes through
//! [`HandlerSet::load_file`] and [`HandlerSet::remove`].
//!
//! File events are debounced (a file must be quiet for the debounce period before it is read),
//! and a component that does not load — a partially copied file included — is rejected while
//! the previous version keeps serving; the next change loads the complete file. Files whose
//! names start with `.` or end in `.partial`/`.tmp` are ignored, so the safe way to deploy by
//! copying is to write `.NAME.wasm.tmp` and `mv` it to `NAME.wasm` (an atomic rename).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::WasmError;
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

/// The handler name a changed path belongs to, if it is a handler file.
fn handler_name(path: &Path) -> Option<String> {
    let file_name = path.file_name()?.to_str()?;
    if file_name.starts_with('.') {
        return None;
    }
    let (stem, extension) = file_name.rsplit_once('.')?;
    matches!(extension, "wasm" | "toml").then(|| stem.to_owned())
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
                    let paths = events.into_iter().flat_map(|e| e.event.paths).collect();
                    let _ = sender.send(paths);
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
                if let Ok(bytes) = std::fs::read(&wasm) {
                    // Compile outside the handler set's change lock (a cache hit later).
                    handlers.engine().warm_cache(bytes).await;
                }
                match handlers.load_file(&wasm).await {
                    Ok(info) => tracing::info!(
                        handler = %name,
                        version = ?info.current.as_ref().map(|c| &c.version),
                        "handler (re)loaded from the handlers directory"
                    ),
                    Err(error) => {
                        tracing::warn!(handler = %name, %error, "changed handler rejected; the previous version keeps serving")
                    }
                }
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
    }
}
