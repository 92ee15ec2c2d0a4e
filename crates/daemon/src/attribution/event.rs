//! One line of `conntrack -E -e NEW,DESTROY -o timestamp,id` read as a [`CtEvent`].
//!
//! A line is `[SECONDS.MICROS] [KIND] PROTO NUMBER [TIMEOUT] [STATE] ORIGINAL [flags]
//! REPLY [flags] id=CONNTRACK_ID`, where each tuple is `src= dst= sport= dport=` (ICMP:
//! `type= code= id=`) followed, with accounting on (`nf_conntrack_acct`), by `packets=
//! bytes=`. The first `src=` starts the original direction, the second the reply.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What conntrack reported about a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    New,
    Destroy,
}

/// The flow's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP and ICMPv6; the "port" is the echo identifier.
    Icmp,
    /// Anything else conntrack tracks, by its IP protocol number.
    #[serde(untagged)]
    Other(u8),
}

impl Proto {
    /// The protocol's one-byte code in stored keys.
    pub fn code(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
            Proto::Other(n) => n,
        }
    }

    pub fn from_code(code: u8) -> Proto {
        match code {
            6 => Proto::Tcp,
            17 => Proto::Udp,
            1 | 58 => Proto::Icmp,
            n => Proto::Other(n),
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proto::Tcp => f.write_str("tcp"),
            Proto::Udp => f.write_str("udp"),
            Proto::Icmp => f.write_str("icmp"),
            Proto::Other(n) => write!(f, "proto-{n}"),
        }
    }
}

/// One direction of a flow. For ICMP both ports are the echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// Bytes in this direction (DESTROY with accounting on).
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtEvent {
    pub kind: Kind,
    /// When conntrack reported it, Unix microseconds.
    pub at: u64,
    pub proto: Proto,
    pub original: Tuple,
    pub reply: Tuple,
    /// conntrack's id of the flow (unique among live flows).
    pub id: u32,
}

impl CtEvent {
    /// Whether the flow's source was rewritten: the reply comes back to another address
    /// or port than the original left from.
    pub fn source_natted(&self) -> bool {
        self.reply.dst != self.original.src || self.reply.dport != self.original.sport
    }
}

/// A tuple being read: fields as they come.
#[derive(Default)]
struct Partial {
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    sport: Option<u16>,
    dport: Option<u16>,
    bytes: Option<u64>,
}

impl Partial {
    fn done(self) -> Option<Tuple> {
        Some(Tuple {
            src: self.src?,
            dst: self.dst?,
            sport: self.sport.unwrap_or(0),
            dport: self.dport.unwrap_or(0),
            bytes: self.bytes,
        })
    }
}

/// `[1796474343.989828]` as Unix microseconds.
fn timestamp(token: &str) -> Option<u64> {
    let inner = token.strip_prefix('[')?.strip_suffix(']')?;
    let (secs, micros) = inner.split_once('.')?;
    let micros = format!("{micros:0<6}");
    Some(secs.parse::<u64>().ok()? * 1_000_000 + micros.get(..6)?.parse::<u64>().ok()?)
}

/// Reads one event line; `None` for anything else (conntrack's summary line, a protocol
/// without addresses).
pub fn parse(line: &str) -> Option<CtEvent> {
    let mut tokens = line.split_whitespace();
    let at = timestamp(tokens.next()?)?;
    let kind = match tokens.next()? {
        "[NEW]" => Kind::New,
        "[DESTROY]" => Kind::Destroy,
        _ => return None,
    };
    let _name = tokens.next()?;
    let proto = Proto::from_code(tokens.next()?.parse().ok()?);
    let mut tuples: Vec<Partial> = Vec::with_capacity(2);
    let (mut id, mut last_key) = (None, "");
    for token in tokens {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        if key == "src" {
            tuples.push(Partial::default());
        }
        let current = tuples.last_mut();
        match (key, current) {
            ("src", Some(t)) => t.src = value.parse().ok(),
            ("dst", Some(t)) => t.dst = value.parse().ok(),
            ("sport", Some(t)) => t.sport = value.parse().ok(),
            ("dport", Some(t)) => t.dport = value.parse().ok(),
            ("bytes", Some(t)) => t.bytes = value.parse().ok(),
            // ICMP's identifier follows its code; the flow's id ends the line.
            ("id", Some(t)) if last_key == "code" => {
                let echo = value.parse().ok();
                (t.sport, t.dport) = (echo, echo);
            }
            ("id", _) => id = value.parse().ok(),
            _ => {}
        }
        last_key = key;
    }
    let mut tuples = tuples.into_iter();
    let original = tuples.next()?.done()?;
    let reply = tuples.next()?.done()?;
    Some(CtEvent {
        kind,
        at,
        proto,
        original,
        reply,
        id: id?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_tcp_flow_with_its_nat_tuple() {
        let e = parse("[1796474343.989828]\t    [NEW] tcp      6 120 SYN_SENT src=100.96.0.2 dst=198.18.0.10 sport=40000 dport=8080 [UNREPLIED] src=198.18.0.10 dst=203.0.113.77 sport=8080 dport=61000 mark=7 id=3423341401").unwrap();
        assert_eq!(e.kind, Kind::New);
        assert_eq!(e.at, 1_796_474_343_989_828);
        assert_eq!(e.proto, Proto::Tcp);
        assert_eq!(e.original.src, "100.96.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(e.original.dport, 8080);
        assert_eq!(e.reply.dst, "203.0.113.77".parse::<IpAddr>().unwrap());
        assert_eq!(e.reply.dport, 61000);
        assert_eq!(e.id, 3_423_341_401);
        assert!(e.source_natted());
    }

    #[test]
    fn a_destroyed_icmp_flow_keeps_echo_ids_apart_from_the_flow_id() {
        let e = parse("[1796474344.324539]\t[DESTROY] icmp     1 29 src=100.96.0.2 dst=198.18.0.10 type=8 code=0 id=18284 packets=1 bytes=84 src=198.18.0.10 dst=203.0.113.77 type=0 code=0 id=1 packets=1 bytes=84 id=2049604873 [USERSPACE] portid=2443870406").unwrap();
        assert_eq!(e.kind, Kind::Destroy);
        assert_eq!(e.proto, Proto::Icmp);
        assert_eq!((e.original.sport, e.reply.dport), (18284, 1));
        assert_eq!(e.original.bytes, Some(84));
        assert_eq!(e.id, 2_049_604_873);
    }

    #[test]
    fn ipv6_udp_without_nat_is_read_and_seen_unnatted() {
        let e = parse("[1796474344.295496]\t    [NEW] udp      17 30 src=::1 dst=::1 sport=36194 dport=9999 [UNREPLIED] src=::1 dst=::1 sport=9999 dport=36194 id=3423341401").unwrap();
        assert_eq!(e.proto, Proto::Udp);
        assert!(!e.source_natted());
    }

    #[test]
    fn other_lines_are_not_events() {
        assert!(
            parse("conntrack v1.4.7 (conntrack-tools): 4 flow events have been shown.").is_none()
        );
        assert!(parse("").is_none());
        assert!(parse("[1.5] [NEW] tcp 6 120 src=1.2.3.4").is_none());
    }
}
