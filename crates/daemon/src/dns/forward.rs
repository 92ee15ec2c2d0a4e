//! Names outside `.internal`, asked of the network's upstream resolvers: over UDP, over TCP
//! when the question came over TCP or the UDP answer was truncated. Upstreams are tried in
//! order; the first answer (whatever its response code) is passed back.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long one upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream answered: {0}")]
    NoAnswer(String),
}

/// Asks `upstreams` for `query` (recursion desired); `tcp` asks over TCP from the start.
pub async fn forward(
    upstreams: &[SocketAddr],
    query: &Query,
    tcp: bool,
) -> Result<Message, ForwardError> {
    let mut failures = Vec::new();
    for upstream in upstreams {
        let asked = ask(*upstream, query, tcp).await;
        let asked = match asked {
            Ok(m) if m.truncated() && !tcp => ask(*upstream, query, true).await,
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

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // An unpredictable id makes spoofed answers harder; a fixed one still works.
    let _ = getrandom::fill(&mut b);
    u16::from_be_bytes(b)
}

async fn ask(upstream: SocketAddr, query: &Query, tcp: bool) -> Result<Message, String> {
    let req = request(query);
    let bytes = req.to_vec().map_err(|e| e.to_string())?;
    let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        if tcp {
            over_tcp(upstream, &bytes).await
        } else {
            over_udp(upstream, &bytes).await
        }
    })
    .await
    .map_err(|_| format!("no answer within {} s", UPSTREAM_TIMEOUT.as_secs()))??;
    let m = Message::from_vec(&answer).map_err(|e| e.to_string())?;
    if m.id() != req.id() || m.message_type() != MessageType::Response {
        return Err("answer does not match the question".into());
    }
    Ok(m)
}

async fn over_udp(upstream: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let local: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().map_err(|_| "bind address")?
    } else {
        "[::]:0".parse().map_err(|_| "bind address")?
    };
    let socket = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
    socket.connect(upstream).await.map_err(|e| e.to_string())?;
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65535];
    let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
    buf.truncate(n);
    Ok(buf)
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
