//! DNS over UDP without a task per question: one loop reads the resolver's socket and
//! answers a question from the network's names in place, straight onto the socket; a
//! question that waits (for an upstream, or for room in the socket's send buffer) is kept
//! by the same loop, which goes on with it when it is woken. One task, like one event loop:
//! no wake-up of another thread per question, and stopping the loop stops every question
//! in flight and frees the socket.
//!
//! hickory's `ServerFuture` spawns a task per datagram, hands each answer to a sending task
//! through a channel, and logs two lines at `info` per query; at tens of thousands of
//! queries per second those were most of the resolver's time (`docs/benchmarks.md`, row 6).
//! Parsing and writing messages stay hickory's. As with `ServerFuture`, a datagram that is a
//! response is ignored (no reflection); a query that does not parse gets FORMERR when its
//! header can be read (RFC 1035 4.1.1), and nothing otherwise.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hickory_proto::op::MessageType;
use hickory_proto::rr::Record;
use hickory_proto::serialize::binary::{BinDecodable, BinEncoder};
use hickory_proto::udp::MAX_RECEIVE_BUFFER_SIZE;
use hickory_proto::xfer::Protocol;
use hickory_server::authority::{MessageRequest, MessageResponse};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tokio::net::UdpSocket;

/// How long the loop waits after the socket fails to give it a datagram.
const PAUSE_AFTER_ERROR: Duration = Duration::from_millis(100);

/// Where one answer goes: the resolver's socket, to the asker's address.
#[derive(Clone)]
struct Reply {
    socket: Arc<UdpSocket>,
    to: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for Reply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> io::Result<ResponseInfo> {
        // The size the asker offered (EDNS), else hickory's own default for UDP; what does
        // not fit is left out and the answer marked truncated.
        let max_size = response
            .get_edns()
            .as_ref()
            .map_or(MAX_RECEIVE_BUFFER_SIZE as u16, |e| e.max_payload());
        let mut buffer = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buffer);
        encoder.set_max_size(max_size);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(io::Error::other)?;
        self.socket.send_to(&buffer, self.to).await?;
        Ok(info)
    }
}

/// Serves `handler` on `socket` until the returned future is dropped (or its task aborted).
pub async fn serve<H: RequestHandler>(socket: UdpSocket, handler: Arc<H>) {
    let socket = Arc::new(socket);
    let mut waiting = FuturesUnordered::new();
    let mut datagram = vec![0u8; MAX_RECEIVE_BUFFER_SIZE];
    loop {
        let received = tokio::select! {
            Some(()) = waiting.next(), if !waiting.is_empty() => continue,
            received = socket.recv_from(&mut datagram) => received,
        };
        let (len, from) = match received {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(error = %e, "DNS over UDP: cannot read a question");
                tokio::time::sleep(PAUSE_AFTER_ERROR).await;
                continue;
            }
        };
        let Ok(message) = MessageRequest::from_bytes(&datagram[..len]) else {
            if let Some(reply) = format_error(&datagram[..len]) {
                // Never waited for: a full send buffer drops it, as the network may.
                let _ = socket.try_send_to(&reply, from);
            }
            continue;
        };
        if message.message_type() == MessageType::Response {
            continue;
        }
        let request = Request::new(message, from, Protocol::Udp);
        let reply = Reply {
            socket: socket.clone(),
            to: from,
        };
        let handler = handler.clone();
        let mut answer = Box::pin(async move {
            handler.handle_request(&request, reply).await;
        });
        if futures::poll!(answer.as_mut()).is_pending() {
            waiting.push(answer);
        }
    }
}

/// The FORMERR answer to a query that does not parse: its ID and opcode, no sections; none
/// for a datagram without a whole header or one that is a response.
fn format_error(datagram: &[u8]) -> Option<[u8; 12]> {
    let header = datagram.get(..12)?;
    if header[2] & 0x80 != 0 {
        return None;
    }
    let mut out = [0u8; 12];
    out[..2].copy_from_slice(&header[..2]);
    // QR set, the query's opcode kept; RCODE 1 (FORMERR).
    out[2] = 0x80 | (header[2] & 0x78);
    out[3] = 1;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, ResponseCode};

    #[test]
    fn a_query_that_does_not_parse_gets_formerr_with_its_id() {
        // A header announcing one question, and no question.
        let query = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        assert!(MessageRequest::from_bytes(&query).is_err());
        let answer = Message::from_bytes(&format_error(&query).unwrap()).unwrap();
        assert_eq!(answer.id(), 0xabcd);
        assert_eq!(answer.message_type(), MessageType::Response);
        assert_eq!(answer.response_code(), ResponseCode::FormErr);
        // No header, or a response: nothing.
        assert_eq!(format_error(&query[..11]), None);
        let mut response = query;
        response[2] |= 0x80;
        assert_eq!(format_error(&response), None);
    }
}
