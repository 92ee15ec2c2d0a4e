//! Devices served by `wireguard-go`, configured over its UAPI socket.
//!
//! Each device is one `wireguard-go NAME` process running in the foreground in its own
//! process group, so it outlives the process that started it (the CNI plugin exits right
//! after ADD; the daemon may restart while tunnels stay up) and a signal to the starter's
//! group (a terminal's Ctrl-C, a runtime killing the plugin's group) does not reach it. It
//! stays in the starter's session: a session of its own would also be a scheduling group of
//! its own (the kernel's autogroup, where CPU controllers do not group tasks), and the
//! scheduler then switches between the tunnel's ends and its traffic's sender and receiver
//! half as often again per packet; a CPU-bound tunnel lost a fifth of its throughput so. Its socket is
//! `/var/run/wireguard/NAME.sock` and its output goes to `/var/run/wireguard/NAME.log`.
//! That directory is shared by every network namespace, so names must be unique on the
//! machine, not only in one namespace.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Pid;

use super::{
    link_err, uapi, validate_name, DeviceConfig, DeviceStatus, PeerConfig, WgError, WireGuard,
};
use crate::keys::Key;
use crate::net::{Netlink, Netns, NetnsError};

/// How long `wireguard-go` may take to open its socket (it usually takes a few ms).
const START_TIMEOUT: Duration = Duration::from_secs(3);
/// Interval between checks for the socket while starting.
const START_POLL: Duration = Duration::from_millis(1);
/// How much of the log is quoted when `wireguard-go` fails.
const LOG_TAIL: u64 = 4096;

/// Where the log of device `name`'s `wireguard-go` goes.
pub fn log_path(name: &str) -> PathBuf {
    PathBuf::from(uapi::SOCKET_DIR).join(format!("{name}.log"))
}

/// Finds the `wireguard-go` binary: on `PATH`, else in the usual places.
pub fn find_wireguard_go() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("wireguard-go"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let usual = ["/usr/bin", "/usr/local/bin", "/usr/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join("wireguard-go"));
    from_path
        .into_iter()
        .chain(usual)
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether `pid` is, right now, a `wireguard-go` process serving `name`.
/// Checked through `/proc/PID/cmdline`, so a reused pid is not mistaken for it
/// (and an exited, not yet reaped process, whose cmdline is empty, counts as gone).
pub fn is_wireguard_go_for(pid: u32, name: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0).filter(|a| !a.is_empty());
    let Some(argv0) = args.next() else {
        return false;
    };
    let argv0_is_wg_go = argv0
        .rsplit(|&b| b == b'/')
        .next()
        .is_some_and(|base| base.starts_with(b"wireguard-go"));
    argv0_is_wg_go && args.any(|a| a == name.as_bytes())
}

/// The pid of the `wireguard-go` process serving device `name`, if one runs.
///
/// Asks the kernel who listens on the UAPI socket (`SO_PEERCRED`), verified through
/// `/proc/PID/cmdline`; when the socket is gone, scans `/proc` for `wireguard-go NAME`.
/// Callers may store it (e.g. in CNI state) to clean up later.
pub fn pid_of(name: &str) -> Option<u32> {
    if validate_name(name).is_err() {
        return None;
    }
    if let Ok(stream) = std::os::unix::net::UnixStream::connect(uapi::socket_path(name)) {
        if let Ok(creds) = getsockopt(&stream, PeerCredentials) {
            if let Ok(pid) = u32::try_from(creds.pid()) {
                if is_wireguard_go_for(pid, name) {
                    return Some(pid);
                }
            }
        }
    }
    let entries = fs::read_dir("/proc").ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| is_wireguard_go_for(pid, name))
}

fn netns_err(e: NetnsError) -> WgError {
    WgError::Io {
        name: "netns".to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The userspace backend: one `wireguard-go` per device.
pub struct UserspaceBackend {
    binary: PathBuf,
    route: Netlink,
    /// The namespace this backend was opened in; `wireguard-go` is started there even
    /// when a later call runs on a thread that is elsewhere.
    netns: Netns,
}

impl UserspaceBackend {
    /// Opens the backend in the current thread's network namespace. Must run inside a
    /// tokio runtime.
    pub fn open() -> Result<UserspaceBackend, WgError> {
        let binary = find_wireguard_go().ok_or_else(|| {
            WgError::WireguardGoMissing("not found on PATH nor in /usr/bin".to_string())
        })?;
        Ok(UserspaceBackend {
            binary,
            route: Netlink::current().map_err(link_err("rtnetlink"))?,
            netns: Netns::current().map_err(netns_err)?,
        })
    }

    /// Uses another `wireguard-go` binary (it is run as `BINARY NAME`).
    pub fn with_binary(mut self, binary: PathBuf) -> UserspaceBackend {
        self.binary = binary;
        self
    }

    /// Path of the `wireguard-go` binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Like [`WireGuard::create`], returning the pid of the `wireguard-go` serving the
    /// new device.
    pub async fn create_device(&self, name: &str) -> Result<u32, WgError> {
        validate_name(name)?;
        if uapi::answers(name).await
            || self
                .route
                .link_index(name)
                .await
                .map_err(link_err(name))?
                .is_some()
        {
            return Err(WgError::AlreadyExists(name.to_string()));
        }
        self.start(name).await
    }

    /// Runs `wireguard-go` for `name` in this backend's namespace and waits until it serves
    /// its UAPI socket.
    async fn start(&self, name: &str) -> Result<u32, WgError> {
        let io_err = |source| WgError::Io {
            name: name.to_string(),
            source,
        };
        fs::create_dir_all(uapi::SOCKET_DIR).map_err(io_err)?;
        let log_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(log_path(name))
            .map_err(io_err)?;
        let child = self.spawn(name, &log_file)?;
        wait_until_serving(name, child, log_file).await
    }

    fn spawn(&self, name: &str, log_file: &File) -> Result<Child, WgError> {
        let io_err = |source| WgError::Io {
            name: name.to_string(),
            source,
        };
        let child_out = log_file.try_clone().map_err(io_err)?;
        let child_err = log_file.try_clone().map_err(io_err)?;
        let netns_fd = if self.netns.is_current().map_err(netns_err)? {
            None
        } else {
            Some(self.netns.raw_fd())
        };
        let mut command = Command::new(&self.binary);
        command
            .arg(name)
            .env("WG_PROCESS_FOREGROUND", "1")
            .env("LOG_LEVEL", "error")
            .stdin(Stdio::null())
            // A file, not a pipe: Go dies of SIGPIPE writing to a closed stdout/stderr,
            // and the plugin exits right after starting it.
            .stdout(Stdio::from(child_out))
            .stderr(Stdio::from(child_err));
        // Its own process group, in this session (see the module's doc).
        command.process_group(0);
        if let Some(fd) = netns_fd {
            // SAFETY: the closure runs between fork and exec and only makes the
            // async-signal-safe system call setns(2).
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command.spawn().map_err(|e| WgError::WireguardGoFailed {
            name: name.to_string(),
            detail: format!("cannot run {}: {e}", self.binary.display()),
        })
    }
}

/// Waits, bounded, until `child` answers on `name`'s UAPI socket; returns its pid. A child that
/// exits or does not serve in time is reported with the tail of its log.
async fn wait_until_serving(name: &str, mut child: Child, log_file: File) -> Result<u32, WgError> {
    let failed = |detail: String| {
        let _ = fs::remove_file(log_path(name));
        WgError::WireguardGoFailed {
            name: name.to_string(),
            detail,
        }
    };
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    let socket = uapi::socket_path(name);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return Err(failed(format!(
                    "it exited ({status}): {}",
                    log_tail(log_file)
                )))
            }
            Ok(None) => {}
            Err(e) => {
                reap(child);
                return Err(failed(format!("cannot watch it: {e}")));
            }
        }
        // Listening is not enough: `wireguard-go` listens on its socket before it has made
        // its device and only answers once its start is over; a device moved to another
        // namespace during its start can leave it without its socket.
        if listener_pid(&socket).await == Some(pid) && uapi::answers(name).await {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!(
                "{} did not appear within {START_TIMEOUT:?}: {}",
                socket.display(),
                log_tail(log_file)
            )));
        }
        tokio::time::sleep(START_POLL).await;
    }
    reap(child);
    tracing::debug!(device = name, pid, "wireguard-go started");
    Ok(pid)
}

/// Who listens on a unix socket, or `None` if nobody does (yet).
async fn listener_pid(socket: &Path) -> Option<u32> {
    if !socket.exists() {
        return None;
    }
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let creds = getsockopt(&stream, PeerCredentials).ok()?;
    u32::try_from(creds.pid()).ok()
}

/// Waits for `child` on a small thread so that its exit leaves no zombie in a
/// long-running process. The thread does not keep the process alive: a one-shot caller
/// exits and the child carries on, adopted by init.
fn reap(mut child: Child) {
    let spawned = std::thread::Builder::new()
        .name("wireguard-go-reaper".to_string())
        .stack_size(64 * 1024)
        .spawn(move || {
            let _ = child.wait();
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start a thread to reap wireguard-go: {e}");
    }
}

fn log_tail(mut file: File) -> String {
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut buf = Vec::new();
    let _ = file.take(LOG_TAIL).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).trim().to_string();
    if text.is_empty() {
        "no output".to_string()
    } else {
        text
    }
}

/// Polls until `pid` no longer is `wireguard-go NAME`, or `timeout` passes.
async fn wait_gone(pid: u32, name: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_wireguard_go_for(pid, name) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(raw), sig);
    }
}

fn remove_if_exists(path: &Path, name: &str) -> Result<(), WgError> {
    crate::fsutil::remove_if_exists(path).map_err(|source| WgError::Io {
        name: name.to_string(),
        source,
    })
}

impl WireGuard for UserspaceBackend {
    async fn create(&self, name: &str) -> Result<(), WgError> {
        self.create_device(name).await.map(|_| ())
    }

    async fn configure(&self, name: &str, config: &DeviceConfig) -> Result<(), WgError> {
        validate_name(name)?;
        uapi::set(name, &uapi::set_device_request(config)).await
    }

    async fn set_peers(&self, name: &str, peers: &[PeerConfig]) -> Result<(), WgError> {
        validate_name(name)?;
        uapi::set(name, &uapi::set_peers_request(peers)).await
    }

    async fn remove_peer(&self, name: &str, public_key: &Key) -> Result<(), WgError> {
        validate_name(name)?;
        uapi::set(name, &uapi::remove_peer_request(public_key)).await
    }

    async fn status(&self, name: &str) -> Result<DeviceStatus, WgError> {
        validate_name(name)?;
        uapi::get(name).await
    }

    async fn exists(&self, name: &str) -> bool {
        validate_name(name).is_ok() && uapi::answers(name).await
    }

    async fn delete(&self, name: &str) -> Result<(), WgError> {
        validate_name(name)?;
        let pid = pid_of(name);
        // wireguard-go exits by itself once its interface is gone.
        let deleted = self.route.delete_link(name).await.map_err(link_err(name))?;
        if let Some(pid) = pid {
            let exited = deleted && wait_gone(pid, name, Duration::from_secs(1)).await;
            if !exited {
                // The link is elsewhere or the process did not notice: ask it to stop, which
                // also closes its TUN device and so removes the interface wherever it is.
                signal(pid, Signal::SIGTERM);
                if !wait_gone(pid, name, Duration::from_secs(3)).await {
                    signal(pid, Signal::SIGKILL);
                    wait_gone(pid, name, Duration::from_secs(1)).await;
                }
            }
        }
        let socket = uapi::socket_path(name);
        if socket.exists() {
            if uapi::answers(name).await {
                return Err(WgError::Uapi {
                    name: name.to_string(),
                    detail: format!(
                        "{} is still served by a process that could not be stopped",
                        socket.display()
                    ),
                });
            }
            remove_if_exists(&socket, name)?;
        }
        remove_if_exists(&log_path(name), name)?;
        Ok(())
    }
}
