//! The on-disk cache of compiled components. Its entries are loaded as native code, so only
//! the user running the host may be able to write them: the directory is created readable and
//! writable by that user only (0700), entries are written 0600, and a directory or entry that
//! another user owns, that group or others can write, or that is not a regular file, is not
//! trusted.

use std::path::Path;

use wasmtime::component::Component;

#[cfg(unix)]
fn check_owner_and_mode(metadata: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if metadata.uid() != me {
        return Err(format!(
            "owned by user id {}, not by the host's user id {me}",
            metadata.uid()
        ));
    }
    let mode = metadata.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {mode:o}); make it writable by its owner only (chmod go-w)"
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner_and_mode(_metadata: &std::fs::Metadata) -> Result<(), String> {
    Ok(())
}

/// Creates `dir` (and missing parents) readable and writable by this user only, or checks an
/// existing one: a directory owned by this user that neither group nor others can write.
///
/// # Errors
/// Why the directory cannot be used.
pub(crate) fn prepare_dir(dir: &Path) -> Result<(), String> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| format!("cannot create it: {e}"))?;
    let metadata = std::fs::metadata(dir).map_err(|e| format!("cannot inspect it: {e}"))?;
    if !metadata.is_dir() {
        return Err("it is not a directory".into());
    }
    check_owner_and_mode(&metadata)
}

/// Whether `path` holds an entry that can be loaded: `Ok(false)` when there is none,
/// `Ok(true)` for a regular file that only this user can write.
///
/// # Errors
/// Why an existing entry is not trusted (it is then compiled afresh and replaced).
pub(crate) fn trusted_entry(path: &Path) -> Result<bool, String> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(format!("cannot inspect it: {error}")),
    };
    if !metadata.file_type().is_file() {
        return Err("it is not a regular file".into());
    }
    check_owner_and_mode(&metadata)?;
    Ok(true)
}

/// Writes the compiled `component` to `path` atomically (a private temporary file renamed into
/// place), readable and writable by this user only.
///
/// # Errors
/// I/O errors.
pub(crate) fn write_entry(component: &Component, path: &Path) -> std::io::Result<()> {
    let bytes = component.serialize().map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        prepare_dir(dir).map_err(std::io::Error::other)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(&tmp)
        .and_then(|mut file| std::io::Write::write_all(&mut file, &bytes));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(error);
    }
    std::fs::rename(&tmp, path)
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_directory_is_private_and_shared_ones_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/cache");
        prepare_dir(&dir).expect("created");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare_dir(&shared).unwrap_err();
        assert!(err.contains("writable by group or others"), "{err}");
    }

    #[test]
    fn entries_others_can_write_or_that_are_links_are_not_trusted() {
        let root = tempfile::tempdir().unwrap();
        let entry = root.path().join("x.cwasm");
        assert_eq!(trusted_entry(&entry), Ok(false));
        std::fs::write(&entry, b"x").unwrap();
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(trusted_entry(&entry), Ok(true));
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(trusted_entry(&entry).is_err());
        let link = root.path().join("link.cwasm");
        std::os::unix::fs::symlink(&entry, &link).unwrap();
        assert!(trusted_entry(&link).unwrap_err().contains("regular file"));
    }
}
