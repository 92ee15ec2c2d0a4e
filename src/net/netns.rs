//! Entering network namespaces for the current thread.
//!
//! Netlink sockets belong to the namespace of the thread that created them, so the pattern
//! is: enter, open a socket, leave; the socket keeps working on the namespace it was born in.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source} (needs CAP_SYS_ADMIN)")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// What tells one network namespace from another for as long as it lives: the device and
/// inode of its nsfs file, the same through every path and descriptor that names it. A path
/// such as `/proc/<pid>/ns/net` or a bind mount can come to name another namespace (the
/// process ended and its PID was reused, the mount was replaced); the identity cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl std::fmt::Display for NetnsId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "net:[{}] on device {}", self.ino, self.dev)
    }
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        match File::open(path) {
            Ok(file) => Ok(Netns {
                file,
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(NetnsError::NotFound {
                path: path.to_path_buf(),
            }),
            Err(source) => Err(NetnsError::Open {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The namespace the calling thread is in now.
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The identity of this namespace.
    pub fn id(&self) -> Result<NetnsId, NetnsError> {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .map(|m| NetnsId {
                dev: m.dev(),
                ino: m.ino(),
            })
            .map_err(|source| NetnsError::Open {
                path: self.path.clone(),
                source,
            })
    }

    /// Whether the calling thread is in this namespace now.
    pub fn is_current(&self) -> Result<bool, NetnsError> {
        Ok(self.id()? == Netns::current()?.id()?)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Moves the calling thread into this namespace until the guard is dropped.
    ///
    /// Only for a current-thread runtime (the plugin's), where everything, awaits included,
    /// runs on this thread: sockets opened while the guard lives belong to this namespace.
    pub fn enter(&self) -> Result<NetnsGuard, NetnsError> {
        let origin = Netns::current()?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        Ok(NetnsGuard { origin })
    }

    /// Runs `f` with the calling thread inside this namespace, then returns to where it was.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        let guard = self.enter()?;
        let out = f();
        drop(guard);
        Ok(out)
    }
}

/// Returns the thread to its namespace when dropped.
pub struct NetnsGuard {
    origin: Netns,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Failing to go back would leave the thread in the wrong namespace: that must not
        // go unnoticed.
        if let Err(e) = setns(self.origin.file.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("wgexit: cannot return to network namespace: {e}");
            std::process::abort();
        }
    }
}
