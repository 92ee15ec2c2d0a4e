//! Client for the cross-platform userspace configuration protocol ("UAPI",
//! <https://www.wireguard.com/xplatform/>), as served by `wireguard-go` on
//! `/var/run/wireguard/NAME.sock`.
//!
//! A request is `get=1\n\n` or `set=1\n` followed by `key=value` lines and an empty line.
//! The reply to `get` is `key=value` lines; every reply ends with `errno=N\n\n`.
//! Keys travel as lowercase hex.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{DeviceConfig, DeviceStatus, PeerConfig, PeerStatus, WgError};
use crate::keys::Key;

/// Where `wireguard-go` (and every other userspace implementation) puts its sockets.
/// Shared by all network namespaces of the machine.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Upper bound on a `get=1` reply (an exit node with 60k peers answers ~30 MB).
pub const MAX_GET_REPLY: usize = 64 << 20;
/// Upper bound on a `set=1` reply, which is only `errno=N`.
const MAX_SET_REPLY: usize = 4096;
/// Upper bound on one line of a reply.
const MAX_LINE: usize = 4096;
/// How long one request/reply exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The UAPI socket of device `name`.
pub fn socket_path(name: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{name}.sock"))
}

/// Why a `get=1` reply could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("line without '=': {0:?}")]
    NoEquals(String),
    #[error("bad value for {key}: {value:?}")]
    BadValue { key: String, value: String },
    #[error("{0} before any public_key line")]
    PeerKeyOutsidePeer(String),
    #[error("reply has no errno line")]
    NoErrno,
    #[error("device answered errno={0}")]
    Errno(i64),
}

fn bad(key: &str, value: &str) -> ParseError {
    ParseError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
    }
}

fn num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, ParseError> {
    value.parse().map_err(|_| bad(key, value))
}

fn hex_key(key: &str, value: &str) -> Result<Key, ParseError> {
    Key::from_hex(value).map_err(|_| bad(key, value))
}

/// What `get=1` tells beyond [`DeviceStatus`], kept while parsing.
#[derive(Default)]
struct PeerBuilder {
    public_key: Option<Key>,
    endpoint: Option<SocketAddr>,
    allowed_ips: Vec<IpNet>,
    handshake_sec: u64,
    handshake_nsec: u32,
    rx_bytes: u64,
    tx_bytes: u64,
}

impl PeerBuilder {
    fn finish(self) -> Option<PeerStatus> {
        let public_key = self.public_key?;
        let last_handshake = if self.handshake_sec == 0 && self.handshake_nsec == 0 {
            None
        } else {
            SystemTime::UNIX_EPOCH.checked_add(
                Duration::from_secs(self.handshake_sec)
                    + Duration::from_nanos(self.handshake_nsec.into()),
            )
        };
        Some(PeerStatus {
            public_key,
            endpoint: self.endpoint,
            allowed_ips: self.allowed_ips,
            last_handshake,
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
        })
    }
}

/// Parses a whole `get=1` reply (with or without its final empty line).
/// Unknown keys are skipped, so newer implementations keep working.
pub fn parse_get_reply(reply: &str) -> Result<DeviceStatus, ParseError> {
    let mut private_key: Option<Key> = None;
    let mut listen_port = 0u16;
    let mut fwmark = 0u32;
    let mut peers = Vec::new();
    let mut peer: Option<PeerBuilder> = None;
    let mut errno: Option<i64> = None;

    for line in reply.lines() {
        if line.is_empty() {
            break;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| ParseError::NoEquals(line.to_string()))?;
        match key {
            "errno" => errno = Some(num(key, value)?),
            "private_key" => {
                let k = hex_key(key, value)?;
                private_key = (!k.is_zero()).then_some(k);
            }
            "listen_port" => listen_port = num(key, value)?,
            "fwmark" => fwmark = num(key, value)?,
            "public_key" => {
                if let Some(done) = peer.take().and_then(PeerBuilder::finish) {
                    peers.push(done);
                }
                peer = Some(PeerBuilder {
                    public_key: Some(hex_key(key, value)?),
                    ..PeerBuilder::default()
                });
            }
            _ => {
                let Some(p) = peer.as_mut() else {
                    // Device-level keys this client does not know about.
                    continue;
                };
                match key {
                    "endpoint" => p.endpoint = Some(value.parse().map_err(|_| bad(key, value))?),
                    "allowed_ip" => p
                        .allowed_ips
                        .push(value.parse().map_err(|_| bad(key, value))?),
                    "last_handshake_time_sec" => p.handshake_sec = num(key, value)?,
                    "last_handshake_time_nsec" => {
                        let nsec: u32 = num(key, value)?;
                        if nsec >= 1_000_000_000 {
                            return Err(bad(key, value));
                        }
                        p.handshake_nsec = nsec;
                    }
                    "rx_bytes" => p.rx_bytes = num(key, value)?,
                    "tx_bytes" => p.tx_bytes = num(key, value)?,
                    _ => {}
                }
            }
        }
    }
    if let Some(done) = peer.take().and_then(PeerBuilder::finish) {
        peers.push(done);
    }
    match errno {
        None => Err(ParseError::NoErrno),
        Some(0) => Ok(DeviceStatus {
            public_key: private_key.map(|k| k.public()),
            listen_port,
            fwmark,
            peers,
        }),
        Some(e) => Err(ParseError::Errno(e)),
    }
}

/// Parses the reply to `set=1`: `errno=N`.
pub fn parse_set_reply(reply: &str) -> Result<(), ParseError> {
    for line in reply.lines() {
        if let Some(value) = line.strip_prefix("errno=") {
            return match num::<i64>("errno", value)? {
                0 => Ok(()),
                e => Err(ParseError::Errno(e)),
            };
        }
    }
    Err(ParseError::NoErrno)
}

fn push_peer_lines(out: &mut String, peer: &PeerConfig) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "public_key={}", peer.public_key.to_hex());
    out.push_str("replace_allowed_ips=true\n");
    if let Some(endpoint) = peer.endpoint {
        let _ = writeln!(out, "endpoint={endpoint}");
    }
    let _ = writeln!(
        out,
        "persistent_keepalive_interval={}",
        peer.persistent_keepalive.unwrap_or(0)
    );
    for ip in &peer.allowed_ips {
        let _ = writeln!(out, "allowed_ip={ip}");
    }
}

/// `set=1` request that sets key and port and replaces all peers.
pub fn set_device_request(config: &DeviceConfig) -> String {
    let mut out = String::from("set=1\n");
    let _ = writeln!(out, "private_key={}", config.private_key.to_hex());
    if let Some(port) = config.listen_port {
        let _ = writeln!(out, "listen_port={port}");
    }
    out.push_str("replace_peers=true\n");
    for peer in &config.peers {
        push_peer_lines(&mut out, peer);
    }
    out.push('\n');
    out
}

/// `set=1` request that adds or updates `peers`, leaving the others alone.
pub fn set_peers_request(peers: &[PeerConfig]) -> String {
    let mut out = String::from("set=1\n");
    for peer in peers {
        push_peer_lines(&mut out, peer);
    }
    out.push('\n');
    out
}

/// `set=1` request that removes exactly one peer.
pub fn remove_peer_request(public_key: &Key) -> String {
    format!("set=1\npublic_key={}\nremove=true\n\n", public_key.to_hex())
}

fn io_err(name: &str, source: io::Error) -> WgError {
    WgError::Io {
        name: name.to_string(),
        source,
    }
}

fn uapi_err(name: &str, detail: impl ToString) -> WgError {
    WgError::Uapi {
        name: name.to_string(),
        detail: detail.to_string(),
    }
}

async fn connect(name: &str) -> Result<UnixStream, WgError> {
    match UnixStream::connect(socket_path(name)).await {
        Ok(s) => Ok(s),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Err(WgError::NoSuchDevice(name.to_string()))
        }
        Err(e) => Err(io_err(name, e)),
    }
}

/// Sends `request` and reads the reply up to its terminating empty line,
/// refusing replies longer than `limit` bytes.
async fn exchange(name: &str, request: &str, limit: usize) -> Result<String, WgError> {
    let work = async {
        let mut stream = connect(name).await?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| io_err(name, e))?;
        let mut reader = BufReader::new(stream);
        let mut reply = String::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await
                .map_err(|e| io_err(name, e))?;
            if n == 0 {
                // The peer closed early; parse what we have (it tells if errno is missing).
                break;
            }
            if n > MAX_LINE {
                return Err(uapi_err(name, "reply line too long"));
            }
            if line == b"\n" {
                break;
            }
            let text =
                std::str::from_utf8(&line).map_err(|_| uapi_err(name, "reply is not UTF-8"))?;
            if reply.len() + text.len() > limit {
                return Err(uapi_err(name, format!("reply larger than {limit} bytes")));
            }
            reply.push_str(text);
        }
        Ok(reply)
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, work)
        .await
        .map_err(|_| uapi_err(name, format!("no reply within {EXCHANGE_TIMEOUT:?}")))?
}

/// `get=1`: the device's full state.
pub async fn get(name: &str) -> Result<DeviceStatus, WgError> {
    let reply = exchange(name, "get=1\n\n", MAX_GET_REPLY).await?;
    parse_get_reply(&reply).map_err(|e| uapi_err(name, e))
}

/// Sends one `set=1` request built by [`set_device_request`], [`set_peer_request`]
/// or [`remove_peer_request`].
pub async fn set(name: &str, request: &str) -> Result<(), WgError> {
    let reply = exchange(name, request, MAX_SET_REPLY).await?;
    parse_set_reply(&reply).map_err(|e| uapi_err(name, e))
}

/// Whether a process answers on the socket of `name`: it accepts a `get=1` and starts
/// replying (only the first line is read, so this stays cheap on large devices).
pub async fn answers(name: &str) -> bool {
    let probe = async {
        let mut stream = connect(name).await.ok()?;
        stream.write_all(b"get=1\n\n").await.ok()?;
        let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
        let mut line = Vec::new();
        let n = reader.read_until(b'\n', &mut line).await.ok()?;
        (n > 0 && line.contains(&b'=')).then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    #[test]
    fn parses_full_get_reply() {
        let private = Key::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        let reply = format!(
            "private_key={}\nlisten_port=51820\nfwmark=0\n\
             public_key={}\npreshared_key={}\nprotocol_version=1\n\
             endpoint=198.18.0.1:51821\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=500\ntx_bytes=1234\nrx_bytes=5678\n\
             persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nallowed_ip=fd00::/64\n\
             public_key={}\nendpoint=[fd00::1]:7\nlast_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\nsome_future_key=x\n\
             errno=0\n\n",
            private.to_hex(),
            key(1).to_hex(),
            key(0).to_hex(),
            key(2).to_hex(),
        );
        let status = parse_get_reply(&reply).unwrap();
        assert_eq!(
            status.public_key.unwrap().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
        assert_eq!(status.listen_port, 51820);
        assert_eq!(status.peers.len(), 2);
        let p = &status.peers[0];
        assert_eq!(p.public_key, key(1));
        assert_eq!(p.endpoint, Some("198.18.0.1:51821".parse().unwrap()));
        assert_eq!(
            p.allowed_ips,
            vec![
                "100.64.0.2/32".parse::<IpNet>().unwrap(),
                "fd00::/64".parse().unwrap()
            ]
        );
        assert_eq!(
            p.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 500))
        );
        assert_eq!((p.rx_bytes, p.tx_bytes), (5678, 1234));
        let q = &status.peers[1];
        assert_eq!(q.public_key, key(2));
        assert_eq!(q.endpoint, Some("[fd00::1]:7".parse().unwrap()));
        assert_eq!(q.last_handshake, None);
        assert!(q.allowed_ips.is_empty());
    }

    #[test]
    fn parses_empty_device() {
        let status = parse_get_reply("listen_port=0\nerrno=0\n\n").unwrap();
        assert_eq!(status.public_key, None);
        assert_eq!(status.listen_port, 0);
        assert!(status.peers.is_empty());
        // An all-zero private key means "not set".
        let zero = format!("private_key={}\nerrno=0\n", Key([0; 32]).to_hex());
        assert_eq!(parse_get_reply(&zero).unwrap().public_key, None);
    }

    #[test]
    fn rejects_bad_replies() {
        assert_eq!(
            parse_get_reply("listen_port=1\n\n"),
            Err(ParseError::NoErrno)
        );
        assert_eq!(parse_get_reply("errno=19\n\n"), Err(ParseError::Errno(19)));
        assert!(matches!(
            parse_get_reply("garbage\nerrno=0\n"),
            Err(ParseError::NoEquals(_))
        ));
        assert!(matches!(
            parse_get_reply("listen_port=99999\nerrno=0\n"),
            Err(ParseError::BadValue { .. })
        ));
        assert!(matches!(
            parse_get_reply(&format!(
                "public_key={}\nendpoint=nope\nerrno=0\n",
                key(1).to_hex()
            )),
            Err(ParseError::BadValue { .. })
        ));
        assert!(matches!(
            parse_get_reply("public_key=abcd\nerrno=0\n"),
            Err(ParseError::BadValue { .. })
        ));
        assert!(matches!(
            parse_get_reply(&format!(
                "public_key={}\nlast_handshake_time_nsec=1000000000\nerrno=0\n",
                key(1).to_hex()
            )),
            Err(ParseError::BadValue { .. })
        ));
    }

    #[test]
    fn parses_set_reply() {
        assert_eq!(parse_set_reply("errno=0\n\n"), Ok(()));
        assert_eq!(parse_set_reply("errno=22\n"), Err(ParseError::Errno(22)));
        assert_eq!(parse_set_reply(""), Err(ParseError::NoErrno));
    }

    #[test]
    fn builds_requests() {
        let peer = PeerConfig {
            public_key: key(1),
            endpoint: Some("198.18.0.1:51820".parse().unwrap()),
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            persistent_keepalive: Some(25),
        };
        assert_eq!(
            set_peers_request(std::slice::from_ref(&peer)),
            format!(
                "set=1\npublic_key={}\nreplace_allowed_ips=true\nendpoint=198.18.0.1:51820\n\
                 persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\n\n",
                key(1).to_hex()
            )
        );
        let bare = PeerConfig {
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: vec![],
            ..peer.clone()
        };
        assert_eq!(
            set_peers_request(std::slice::from_ref(&bare)),
            format!(
                "set=1\npublic_key={}\nreplace_allowed_ips=true\npersistent_keepalive_interval=0\n\n",
                key(1).to_hex()
            )
        );
        assert_eq!(
            remove_peer_request(&key(3)),
            format!("set=1\npublic_key={}\nremove=true\n\n", key(3).to_hex())
        );
        let config = DeviceConfig {
            private_key: key(9),
            listen_port: Some(51820),
            peers: vec![peer.clone(), bare],
        };
        let req = set_device_request(&config);
        assert!(req.starts_with(&format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nreplace_peers=true\npublic_key=",
            key(9).to_hex()
        )));
        assert_eq!(req.matches("public_key=").count(), 2);
        assert!(req.ends_with("\n\n"));
        assert_eq!(req.matches("\n\n").count(), 1);
    }
}
