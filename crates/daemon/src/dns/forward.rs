//! Names outside `.internal`, asked of the network's upstream resolvers: over UDP, over TCP
//! when the question came over TCP or the UDP answer was truncated. Upstreams are tried in
//! order; the first answer (whatever its response code) is passed back.
//!
//! UDP sockets are kept between questions ([`Sockets`]): opening, binding, connecting and
//! closing one per question (and the connection tracking entry of each new port) cost more
//! than the question itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long one upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest UDP answer read. Questions carry no EDNS, so an upstream answers at most 512
/// bytes (more is truncated and asked again over TCP); this leaves room for one that
/// does not keep to that.
const MAX_UDP_ANSWER: usize = 4096;
/// Idle sockets kept per upstream: as many as questions may be in flight at once.
const IDLE_SOCKETS: usize = super::server::FORWARDS_IN_FLIGHT;

/// UDP sockets connected to the upstreams, each on a port the kernel chose at random when
/// it was opened. A question takes an idle one (or opens one) and gives it back once
/// answered; a socket whose question went unanswered is closed, so a late answer never
/// meets the next question.
#[derive(Debug, Default)]
pub struct Sockets {
    idle: Mutex<HashMap<SocketAddr, Vec<UdpSocket>>>,
}

impl Sockets {
    fn take(&self, upstream: SocketAddr) -> Option<UdpSocket> {
        self.idle.lock().ok()?.get_mut(&upstream)?.pop()
    }

    fn give_back(&self, upstream: SocketAddr, socket: UdpSocket) {
        if let Ok(mut idle) = self.idle.lock() {
            let kept = idle.entry(upstream).or_default();
            if kept.len() < IDLE_SOCKETS {
                kept.push(socket);
            }
        }
    }
}

/// A question as the upstreams are asked it: name, type and class, and whether over TCP.
/// Two askers with the same one get the same answer ([`super::flights`]). Names are the
/// same only with the same case: an asker that varies the case of its names checks the
/// answer's.
#[derive(Debug, Clone)]
pub struct Asked {
    pub query: Query,
    pub tcp: bool,
}

impl PartialEq for Asked {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.query, &other.query);
        self.tcp == other.tcp
            && a.query_type() == b.query_type()
            && a.query_class() == b.query_class()
            && a.name().is_fqdn() == b.name().is_fqdn()
            && a.name().eq_case(b.name())
    }
}

impl Eq for Asked {}

impl std::hash::Hash for Asked {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The name's hash ignores case: names equal with their case are equal without.
        self.query.name().hash(state);
        self.query.query_type().hash(state);
        self.query.query_class().hash(state);
        self.tcp.hash(state);
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream answered: {0}")]
    NoAnswer(String),
}

/// Asks `upstreams` for `query` (recursion desired); `tcp` asks over TCP from the start.
/// UDP sockets come from and go back to `sockets`.
pub async fn forward(
    upstreams: &[SocketAddr],
    query: &Query,
    tcp: bool,
    sockets: &Sockets,
) -> Result<Message, ForwardError> {
    let mut failures = Vec::new();
    for upstream in upstreams {
        let asked = ask(*upstream, query, tcp, sockets).await;
        let asked = match asked {
            Ok(m) if m.truncated() && !tcp => ask(*upstream, query, true, sockets).await,
            other => other,
        };
        match asked {
            Ok(m) => return Ok(m),
            Err(e) => failures.push(format!("{upstream}: {e}")),
        }
    }
    Err(ForwardError::NoAnswer(failures.join("; ")))
}

fn request(query: &Query) -> Message {
    let mut m = Message::new();
    m.set_id(rand_id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(query.clone());
    m
}

/// An unpredictable ID makes spoofed answers harder. It comes from the thread's CSPRNG
/// (`rand`'s ChaCha12, seeded from the kernel and reseeded as it goes), not from a system
/// call per question.
fn rand_id() -> u16 {
    rand::random()
}

async fn ask(
    upstream: SocketAddr,
    query: &Query,
    tcp: bool,
    sockets: &Sockets,
) -> Result<Message, String> {
    let req = request(query);
    let bytes = req.to_vec().map_err(|e| e.to_string())?;
    let no_answer = |_| format!("no answer within {} s", UPSTREAM_TIMEOUT.as_secs());
    if !tcp {
        let asked = tokio::time::timeout(
            UPSTREAM_TIMEOUT,
            over_udp(upstream, &bytes, req.id(), sockets),
        );
        return asked.await.map_err(no_answer)?;
    }
    let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, over_tcp(upstream, &bytes))
        .await
        .map_err(no_answer)??;
    let m = Message::from_vec(&answer).map_err(|e| e.to_string())?;
    if !answers(&m, req.id()) {
        return Err("answer does not match the question".into());
    }
    Ok(m)
}

fn answers(m: &Message, id: u16) -> bool {
    m.id() == id && m.message_type() == MessageType::Response
}

/// One question over UDP, on a kept socket or a new one; datagrams that are not its answer
/// are passed over. The socket is kept again only once the answer came.
async fn over_udp(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    sockets: &Sockets,
) -> Result<Message, String> {
    let socket = match sockets.take(upstream) {
        Some(socket) => socket,
        None => open(upstream).await.map_err(|e| e.to_string())?,
    };
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; MAX_UDP_ANSWER];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        match Message::from_vec(&buf[..n]) {
            Ok(m) if answers(&m, id) => {
                sockets.give_back(upstream, socket);
                return Ok(m);
            }
            _ => continue,
        }
    }
}

async fn open(upstream: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    Ok(socket)
}

/// DNS over TCP: each message preceded by its length (RFC 1035 4.2.2).
async fn over_tcp(upstream: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::try_from(bytes.len()).map_err(|_| "question too long")?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await.map_err(|e| e.to_string())?;
    let n = stream.read_u16().await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(n)];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{Name, RecordType};
    use std::collections::HashSet;

    fn asked(name: &str, rtype: RecordType, tcp: bool) -> Asked {
        let query = Query::query(Name::from_ascii(name).unwrap(), rtype);
        Asked { query, tcp }
    }

    #[test]
    fn the_same_question_is_the_same_name_case_type_and_transport() {
        let www = asked("www.example.test.", RecordType::AAAA, false);
        let mut seen = HashSet::new();
        seen.insert(www.clone());
        assert!(seen.contains(&www));
        for other in [
            asked("WwW.example.test.", RecordType::AAAA, false),
            asked("www.example.test.", RecordType::A, false),
            asked("www.example.test.", RecordType::AAAA, true),
            asked("www.example.test", RecordType::AAAA, false),
            asked("mail.example.test.", RecordType::AAAA, false),
        ] {
            assert!(!seen.contains(&other), "{other:?}");
        }
    }

    #[test]
    fn question_ids_vary() {
        let ids: HashSet<u16> = (0..64).map(|_| rand_id()).collect();
        assert!(ids.len() > 32, "{} distinct IDs of 64", ids.len());
    }
}
