//! The plugin's log: with `logFile` in the config, one line per command (container,
//! interface, address, duration, result or error code) appended to that file, never to
//! stdout, which carries only the CNI answer. The file is capped: a line that would take it
//! past `logMaxBytes` first moves it to `<logFile>.1` (replacing the previous one), under an
//! exclusive lock, so concurrent commands neither tear lines nor lose the cap.
//!
//! ```text
//! 2025-01-31T12:00:00.250Z ADD container=4f2a… ifname=eth0 egress=acme address=100.96.0.2/32 duration_ms=41.3 result=ok
//! 2025-01-31T12:00:01.003Z ADD container=9c1e… ifname=eth0 egress=acme duration_ms=12.0 result=error code=100 msg="…"
//! ```

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;

use crate::cni::config::DEFAULT_DATA_DIR;
use crate::cni::env::CniEnv;
use crate::cni::error::CniError;
use crate::cni::state::StateDir;

pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;
/// Smallest cap: a few lines' worth.
pub const MIN_MAX_BYTES: u64 = 4096;
/// Longest message kept in a line.
const MAX_MSG: usize = 1024;

/// What is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Failed commands only.
    Error,
    /// Every command.
    #[default]
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub file: PathBuf,
    pub level: LogLevel,
    pub max_bytes: u64,
}

fn invalid(key: &str, msg: impl std::fmt::Display) -> CniError {
    crate::cni::config::invalid(key, msg.to_string())
}

fn field<T: serde::de::DeserializeOwned>(raw: &Value, key: &str) -> Result<Option<T>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| invalid(key, e)),
    }
}

impl LogConfig {
    /// `logFile`, `logLevel` and `logMaxBytes` of a network config; `None` without `logFile`.
    pub fn parse(raw: &Value) -> Result<Option<LogConfig>, CniError> {
        let Some(file) = field::<PathBuf>(raw, "logFile")? else {
            return Ok(None);
        };
        if !file.is_absolute() {
            return Err(invalid("logFile", "must be an absolute path"));
        }
        let max_bytes = field::<u64>(raw, "logMaxBytes")?.unwrap_or(DEFAULT_MAX_BYTES);
        if max_bytes < MIN_MAX_BYTES {
            return Err(invalid(
                "logMaxBytes",
                format!("{max_bytes} is less than {MIN_MAX_BYTES}"),
            ));
        }
        Ok(Some(LogConfig {
            file,
            level: field(raw, "logLevel")?.unwrap_or_default(),
            max_bytes,
        }))
    }

    /// The log config of `stdin`, if it has a usable one; whatever else is wrong with it.
    fn of_stdin(stdin: &[u8]) -> Option<(LogConfig, Value)> {
        let raw: Value = serde_json::from_slice(stdin).ok()?;
        let config = LogConfig::parse(&raw).ok()??;
        Some((config, raw))
    }
}

/// One command's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub at: SystemTime,
    pub command: &'a str,
    pub container: Option<&'a str>,
    pub ifname: Option<&'a str>,
    pub egress: Option<&'a str>,
    pub address: Option<String>,
    pub duration: Duration,
    /// `Err((code, message))` for a failed command.
    pub result: Result<(), (u32, String)>,
}

/// `value` as a logfmt value: quoted when it has spaces, quotes, `=` or control characters.
pub(crate) fn value(v: &str) -> String {
    let plain = !v.is_empty()
        && !v
            .chars()
            .any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    if plain {
        return v.to_string();
    }
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// UTC `YYYY-MM-DDTHH:MM:SS.mmmZ` (days to a civil date: H. Hinnant's algorithm).
pub fn timestamp(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

impl Record<'_> {
    /// The line, with its newline.
    pub fn line(&self) -> String {
        let mut out = format!("{} {}", timestamp(self.at), self.command);
        let fields = [
            ("container", self.container),
            ("ifname", self.ifname),
            ("egress", self.egress),
            ("address", self.address.as_deref()),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                let _ = write!(out, " {k}={}", value(v));
            }
        }
        let _ = write!(out, " duration_ms={:.1}", self.duration.as_secs_f64() * 1e3);
        match &self.result {
            Ok(()) => out.push_str(" result=ok"),
            Err((code, msg)) => {
                let msg: String = msg.chars().take(MAX_MSG).collect();
                let _ = write!(out, " result=error code={code} msg={}", value(&msg));
            }
        }
        out.push('\n');
        out
    }
}

fn locked_append(path: &Path) -> std::io::Result<Flock<File>> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| std::io::Error::from(e))
}

/// The `.1` file `path` rotates to.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Appends `line` to `config.file`, rotating first when it would pass the cap.
pub fn append(config: &LogConfig, line: &str) -> std::io::Result<()> {
    let path = &config.file;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    loop {
        let mut file = locked_append(path)?;
        let held = file.metadata()?;
        match std::fs::metadata(path) {
            // Rotated (or removed) while we waited for the lock: open the new file.
            Ok(now) if now.ino() != held.ino() || now.dev() != held.dev() => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        if held.len() > 0 && held.len() + line.len() as u64 > config.max_bytes {
            std::fs::rename(path, rotated(path))?;
            continue;
        }
        return file.write_all(line.as_bytes());
    }
}

/// A command being logged: [`CommandLog::begin`] before it runs, [`CommandLog::finish`]
/// with its result. Does nothing when the config has no usable `logFile`.
pub struct CommandLog {
    config: Option<LogConfig>,
    raw: Value,
    env: CniEnv,
    started: Instant,
    /// The attachment's address before the command ran (DEL and CHECK).
    address_before: Option<String>,
}

impl CommandLog {
    pub fn begin(env: &CniEnv, stdin: &[u8]) -> CommandLog {
        let started = Instant::now();
        let (config, raw) = match LogConfig::of_stdin(stdin) {
            Some((c, raw)) if env.command != "VERSION" => (Some(c), raw),
            _ => (None, Value::Null),
        };
        let address_before = config.as_ref().and_then(|_| {
            let data_dir = raw["dataDir"].as_str().unwrap_or(DEFAULT_DATA_DIR);
            let state = StateDir::peek(
                Path::new(data_dir),
                env.container_id.as_deref()?,
                env.ifname.as_deref()?,
            )?;
            state.address.map(|a| a.to_string())
        });
        CommandLog {
            config,
            raw,
            env: env.clone(),
            started,
            address_before,
        }
    }

    pub fn finish(self, result: &Result<Option<Value>, CniError>) {
        let Some(config) = &self.config else {
            return;
        };
        if config.level == LogLevel::Error && result.is_ok() {
            return;
        }
        let added = match result {
            Ok(Some(v)) => v["ips"]
                .as_array()
                .and_then(|ips| ips.last())
                .and_then(|ip| ip["address"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let record = Record {
            at: SystemTime::now(),
            command: &self.env.command,
            container: self.env.container_id.as_deref(),
            ifname: self.env.ifname.as_deref(),
            egress: self.raw["egress"].as_str(),
            address: added.or(self.address_before),
            duration: self.started.elapsed(),
            result: match result {
                Ok(_) => Ok(()),
                Err(e) => Err((e.code as u32, e.to_string())),
            },
        };
        if let Err(e) = append(config, &record.line()) {
            eprintln!(
                "wgexit: cannot write the log file {}: {e}",
                config.file.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize, result: Result<(), (u32, String)>) -> Record<'static> {
        Record {
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_738_324_800_250),
            command: "ADD",
            container: Some("c1"),
            ifname: Some("eth0"),
            egress: Some("acme"),
            address: Some(format!("100.96.0.{}/32", n % 250 + 2)),
            duration: Duration::from_micros(41_349),
            result,
        }
    }

    #[test]
    fn a_line_names_the_command_and_its_outcome() {
        assert_eq!(
            record(0, Ok(())).line(),
            "2025-01-31T12:00:00.250Z ADD container=c1 ifname=eth0 egress=acme address=100.96.0.2/32 duration_ms=41.3 result=ok\n"
        );
        let failed = record(0, Err((100, "token \"x\" refused\nretry".into()))).line();
        assert!(
            failed.ends_with(" result=error code=100 msg=\"token \\\"x\\\" refused\\nretry\"\n"),
            "{failed}"
        );
        assert_eq!(failed.lines().count(), 1);
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn config_keys_are_checked() {
        let parse = |v: Value| LogConfig::parse(&v);
        assert_eq!(parse(serde_json::json!({})).unwrap(), None);
        let c = parse(serde_json::json!({"logFile": "/var/log/wgexit.log"}))
            .unwrap()
            .unwrap();
        assert_eq!((c.level, c.max_bytes), (LogLevel::Info, DEFAULT_MAX_BYTES));
        for (bad, key) in [
            (serde_json::json!({"logFile": "rel.log"}), "logFile"),
            (
                serde_json::json!({"logFile": "/l", "logLevel": "loud"}),
                "logLevel",
            ),
            (
                serde_json::json!({"logFile": "/l", "logMaxBytes": 10}),
                "logMaxBytes",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.msg.contains(key), "{}", e.msg);
        }
    }

    #[test]
    fn ten_thousand_commands_stay_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            file: dir.path().join("logs/wgexit.log"),
            level: LogLevel::Info,
            max_bytes: 64 * 1024,
        };
        let mut last = String::new();
        for n in 0..10_000 {
            let result = if n % 10 == 0 {
                Err((11, "exit node unreachable".to_string()))
            } else {
                Ok(())
            };
            last = record(n, result).line();
            append(&config, &last).unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&config.file) <= config.max_bytes);
        assert!(size(&rotated(&config.file)) <= config.max_bytes);
        let rotated_out = size(&rotated(&config.file)) + last.len() as u64 > config.max_bytes;
        assert!(rotated_out, "the .1 file was filled before it was rotated");
        let text = std::fs::read_to_string(&config.file).unwrap();
        assert!(text.ends_with(&last));
        assert!(text.lines().all(|l| l.contains(" ADD container=c1 ")));
    }

    #[test]
    fn concurrent_commands_do_not_tear_lines() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            file: dir.path().join("wgexit.log"),
            level: LogLevel::Info,
            max_bytes: DEFAULT_MAX_BYTES,
        };
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for n in 0..250 {
                        append(&config, &record(n, Ok(())).line()).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&config.file).unwrap();
        assert_eq!(text.lines().count(), 1000);
        assert!(text.lines().all(|l| l.ends_with(" result=ok")));
    }
}
