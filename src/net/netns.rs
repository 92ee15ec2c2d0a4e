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

    /// Whether the calling thread is in this namespace now.
    pub fn is_current(&self) -> Result<bool, NetnsError> {
        use std::os::unix::fs::MetadataExt;
        let id = |file: &File, path: &Path| {
            file.metadata()
                .map(|m| (m.dev(), m.ino()))
                .map_err(|source| NetnsError::Open {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let current = Netns::current()?;
        Ok(id(&self.file, &self.path)? == id(&current.file, &current.path)?)
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
