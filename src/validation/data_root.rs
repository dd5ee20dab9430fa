//! The calibration data root (`--calibration-data-dir`): the one folder `POST /admin/calibrate`
//! may read dataset files and their images from.
//!
//! A path (relative to the root, or absolute) is canonicalised — `..` and symlinks resolved — and
//! must still lie inside the canonical root; it is opened without following a final symlink and
//! without blocking (a FIFO cannot stall a thread), and the opened file must be a regular file
//! no larger than the cap, checked before reading. Every refusal outside the root reads the
//! same ("not a readable file inside the data root"), so answers do not reveal whether a path
//! exists elsewhere on the server, and no error carries file contents. Reads block: callers run
//! them on the blocking pool.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a dataset path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataRootError {
    /// The server has no data root.
    #[error(
        "dataset input is disabled on this server: start it with --calibration-data-dir DIR \
         (or FITPRUNE_CALIBRATION_DATA_DIR) to allow datasets from DIR, or send inline samples"
    )]
    Disabled,
    /// Missing, outside the root, not a regular file, or unreadable: deliberately one answer.
    #[error("{path:?} is not a readable regular file inside the calibration data root")]
    NotAllowed { path: String },
    /// Inside the root but over the size cap.
    #[error("{path:?} is larger than {max} bytes")]
    TooLarge { path: String, max: u64 },
}

/// A canonical folder that dataset paths are confined to.
#[derive(Debug, Clone)]
pub struct DataRoot {
    root: PathBuf,
}

impl DataRoot {
    /// The root at `dir`, which must be an existing folder.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let root = dir.canonicalize()?;
        if !root.is_dir() {
            return Err(std::io::Error::other(format!("{} is not a folder", dir.display())));
        }
        Ok(Self { root })
    }

    /// The canonical root.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The canonical form of `path` (relative to the root, or absolute) if it lies inside it.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, DataRootError> {
        let refused = || DataRootError::NotAllowed { path: path.display().to_string() };
        if path.as_os_str().is_empty() {
            return Err(refused());
        }
        // `join` keeps an absolute `path` as is; confinement is decided on the canonical form.
        let canonical = self.root.join(path).canonicalize().map_err(|_| refused())?;
        if !canonical.starts_with(&self.root) {
            return Err(refused());
        }
        Ok(canonical)
    }

    /// Reads a regular file inside the root of at most `max` bytes.
    pub fn read(&self, path: &Path, max: u64) -> Result<Vec<u8>, DataRootError> {
        let refused = || DataRootError::NotAllowed { path: path.display().to_string() };
        let canonical = self.resolve(path)?;
        let file = open_no_follow(&canonical).map_err(|_| refused())?;
        // fstat of what was opened: a file swapped for a FIFO or device after `resolve` is caught.
        let meta = file.metadata().map_err(|_| refused())?;
        if !meta.is_file() {
            return Err(refused());
        }
        let too_large = || DataRootError::TooLarge { path: path.display().to_string(), max };
        if meta.len() > max {
            return Err(too_large());
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // `take` bounds a file that grows while being read.
        file.take(max + 1).read_to_end(&mut bytes).map_err(|_| refused())?;
        if bytes.len() as u64 > max {
            return Err(too_large());
        }
        Ok(bytes)
    }
}

#[cfg(unix)]
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(e: Result<Vec<u8>, DataRootError>) -> String {
        match e {
            Err(e @ DataRootError::NotAllowed { .. }) => e.to_string(),
            other => panic!("expected NotAllowed, got {other:?}"),
        }
    }

    #[test]
    fn only_regular_files_inside_the_root_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        let root_dir = tmp.path().join("root");
        std::fs::create_dir_all(root_dir.join("imgs")).unwrap();
        std::fs::write(root_dir.join("imgs/a.png"), b"inside").unwrap();
        std::fs::write(tmp.path().join("secret.txt"), b"\"top secret\"").unwrap();
        let root = DataRoot::new(&root_dir).unwrap();

        assert_eq!(root.read(Path::new("imgs/a.png"), 100).unwrap(), b"inside");
        assert_eq!(root.read(&root_dir.join("imgs/a.png"), 100).unwrap(), b"inside", "absolute inside is fine");
        assert_eq!(root.read(Path::new("imgs/../imgs/a.png"), 100).unwrap(), b"inside");

        let outside = refused(root.read(Path::new("../secret.txt"), 100));
        let missing = refused(root.read(Path::new("nope.txt"), 100));
        assert!(!outside.contains("top secret"));
        // Same wording whether the path exists outside or not at all.
        assert_eq!(outside.replace("../secret.txt", "X"), missing.replace("nope.txt", "X"));
        refused(root.read(&tmp.path().join("secret.txt"), 100));
        refused(root.read(Path::new("/etc/passwd"), 1 << 20));
        refused(root.read(Path::new("/dev/zero"), 1 << 20));
        refused(root.read(Path::new(""), 100));
        refused(root.read(Path::new("imgs"), 100));

        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.path().join("secret.txt"), root_dir.join("link.txt")).unwrap();
            refused(root.read(Path::new("link.txt"), 100));
            std::os::unix::fs::symlink("/dev/zero", root_dir.join("zero")).unwrap();
            refused(root.read(Path::new("zero"), 100));
            // A FIFO inside the root is refused at once instead of blocking on open or read.
            let fifo = root_dir.join("fifo");
            assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
            refused(root.read(Path::new("fifo"), 100));
        }

        assert_eq!(
            root.read(Path::new("imgs/a.png"), 3),
            Err(DataRootError::TooLarge { path: "imgs/a.png".into(), max: 3 })
        );
    }
}
