// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Where `save` writes: a temporary file with a unique name in the output's directory
//! (created with `O_EXCL`, mode 0600 whatever the umask, never through a symlink), renamed
//! to the output only once the stream is complete and synced; or standard output (`-o -`).
//! An existing output is replaced only when the user asked for it (`--force`); otherwise it
//! is refused, and the final rename never replaces a file that appeared meanwhile (another
//! save won). Every check runs before the device is touched.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use vfio_mig_session::{Error, Result};

use super::signals;

/// An output being written.
pub enum Output {
    /// Standard output (`-o -`).
    Stdout,
    /// A temporary file, renamed to `path` by [`Output::commit`] (removed if dropped first).
    File {
        /// The final name.
        path: PathBuf,
        /// The temporary file.
        tmp: tempfile::NamedTempFile,
        /// Whether an existing `path` may be replaced.
        replace: bool,
    },
}

/// Whether standard output is /dev/null: what Rust's runtime opens on a standard output the
/// process started without, or a redirection that discards. A stream written there exists
/// nowhere, and its device would be left stopped.
fn stdout_is_null() -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    // The descriptor's own file (its /proc link is followed to the open file itself).
    match (
        std::fs::metadata("/dev/null"),
        std::fs::metadata("/proc/self/fd/1"),
    ) {
        (Ok(null), Ok(out)) => out.file_type().is_char_device() && out.rdev() == null.rdev(),
        _ => false,
    }
}

fn refuse(path: &Path, why: &str) -> Error {
    Error::invalid_input(format!("-o {}: {why}", path.display()))
}

impl Output {
    /// Checks `path` and creates the temporary file. An existing output is refused unless
    /// `replace`, and must then be a regular file (not a symlink, a directory, a device or a
    /// socket); `-` is standard output, which must not be a terminal.
    pub fn create(path: &Path, replace: bool) -> Result<Self> {
        if path.as_os_str() == "-" {
            use std::io::IsTerminal;
            if stdout_is_null() {
                return Err(refuse(
                    path,
                    "standard output is closed or /dev/null: the state would exist nowhere \
                     (the device was not touched)",
                ));
            }
            if io::stdout().is_terminal() {
                return Err(refuse(path, "standard output is a terminal; redirect it"));
            }
            return Ok(Output::Stdout);
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(refuse(
                    path,
                    "is a symbolic link; name the file itself (it is never followed)",
                ))
            }
            Ok(m) if !m.file_type().is_file() => {
                return Err(refuse(
                    path,
                    "exists and is not a regular file (a directory, a device or a socket is \
                     never replaced; use -o - for standard output)",
                ))
            }
            Ok(_) if !replace => {
                return Err(refuse(
                    path,
                    "exists; give --force to replace it (the device was not touched)",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::transport(format!("check {}", path.display()), e)),
        }
        let name = path
            .file_name()
            .ok_or_else(|| refuse(path, "names no file"))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".partial")
            .tempfile_in(dir)
            .map_err(|e| {
                Error::transport(format!("create a temporary file in {}", dir.display()), e)
            })?;
        signals::remove_on_exit(tmp.path().to_owned());
        Ok(Output::File {
            path: path.to_owned(),
            tmp,
            replace,
        })
    }

    /// What to write the stream to.
    pub fn writer(&self) -> Result<Box<dyn Write + Send>> {
        match self {
            Output::Stdout => Ok(Box::new(io::stdout())),
            Output::File { tmp, .. } => {
                Ok(Box::new(tmp.reopen().map_err(|e| {
                    Error::transport(format!("open {}", tmp.path().display()), e)
                })?))
            }
        }
    }

    /// The output's name for messages.
    pub fn name(&self) -> String {
        match self {
            Output::Stdout => "standard output".into(),
            Output::File { path, .. } => path.display().to_string(),
        }
    }

    /// Syncs the file and renames it to the output (over an existing one only if it may be
    /// replaced), then syncs the directory.
    pub fn commit(self) -> Result<()> {
        match self {
            Output::Stdout => io::stdout()
                .flush()
                .map_err(|e| Error::transport("write standard output", e)),
            Output::File { path, tmp, replace } => {
                let tmp_path = tmp.path().to_owned();
                tmp.as_file()
                    .sync_all()
                    .map_err(|e| Error::transport(format!("sync {}", tmp_path.display()), e))?;
                let persisted = if replace {
                    tmp.persist(&path)
                } else {
                    tmp.persist_noclobber(&path)
                };
                persisted.map_err(|e| {
                    let step = format!("rename to {}", path.display());
                    match e.error.kind() {
                        io::ErrorKind::AlreadyExists => Error::transport(
                            format!(
                                "{step}: {} appeared while saving (another save?) and was not \
                                 replaced",
                                path.display()
                            ),
                            e.error,
                        ),
                        _ => Error::transport(step, e.error),
                    }
                })?;
                signals::keep(&tmp_path);
                let dir = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::transport(format!("sync {}", dir.display()), e))
            }
        }
    }
}
