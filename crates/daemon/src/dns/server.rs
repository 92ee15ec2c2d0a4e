//! A network's resolver, on `hickory-server`: bound to `<prefix>::3` port 53 (UDP and TCP),
//! it answers only live members of its network (source within the prefix and holding a
//! lease; anyone else is REFUSED), `.internal` names from the [`Published`] directory
//! (authoritative, TTL [`super::TTL`]), other names through the upstreams (REFUSED when
//! there are none).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{AAAA, TXT};
use hickory_proto::rr::{RData, Record as DnsRecord, RecordType};
use hickory_proto::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_proto::serialize::binary::BinDecodable;
use hickory_proto::xfer::Protocol;
use hickory_server::authority::{MessageRequest, MessageResponseBuilder};
use hickory_server::server::{
    Request, RequestHandler, ResponseHandle, ResponseHandler, ResponseInfo, TimeoutStream,
};
use ipnet::Ipv6Net;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::counts::DnsCounts;
use super::directory::Published;
use super::flights::Flights;
use super::forward::{forward, Asked, ForwardError, Sockets};
use super::names::{answer, txt_strings, Answer, Question, Record};
use super::TTL;
use crate::config::NetworkConfig;
use crate::descriptors::{PerSource, SourceSlot};

/// How long an idle TCP connection is kept.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest UDP answer offered to clients that speak EDNS.
const EDNS_PAYLOAD: u16 = 1232;
/// Queries forwarded upstream at once, per network: each holds a socket until answered or
/// timed out. More are answered SERVFAIL at once.
pub const FORWARDS_IN_FLIGHT: usize = 64;
/// Of those, what one member may hold, so that a member's flood leaves the others room.
pub const FORWARDS_PER_MEMBER: usize = FORWARDS_IN_FLIGHT / 4;
/// TCP connections served at once, per network; more are closed as soon as accepted.
pub const TCP_CONNECTIONS: usize = 64;
/// Of those, what one member may hold.
pub const TCP_PER_MEMBER: usize = TCP_CONNECTIONS / 4;

#[derive(Debug, thiserror::Error)]
#[error("network {network}: cannot serve DNS on {address}: {source}")]
pub struct DnsError {
    pub network: String,
    pub address: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// One network's resolver.
#[derive(Clone)]
pub struct Resolver {
    prefix: Ipv6Net,
    directory: Published,
    upstreams: Arc<[SocketAddr]>,
    forwards: Arc<Semaphore>,
    forwarding_members: Arc<PerSource>,
    upstream_sockets: Arc<Sockets>,
    /// Forwarded questions in flight: an asker of one already asked waits for its answer.
    flights: Arc<Flights<Asked, Result<Arc<Message>, ForwardError>>>,
    counts: Arc<DnsCounts>,
}

/// What the resolver sends back, before it is written.
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    records: Records,
}

/// The records of a reply: the network's own, or an upstream's answer, shared by every
/// asker of its question (never copied per asker).
enum Records {
    Answers(Vec<DnsRecord>),
    Upstream(Arc<Message>),
}

impl Reply {
    fn code(code: ResponseCode, authoritative: bool) -> Reply {
        Reply {
            code,
            authoritative,
            records: Records::Answers(Vec::new()),
        }
    }

    fn answers(&self) -> &[DnsRecord] {
        match &self.records {
            Records::Answers(answers) => answers,
            Records::Upstream(m) => m.answers(),
        }
    }

    /// The authority and additional sections.
    fn authority_and_additionals(&self) -> (&[DnsRecord], &[DnsRecord]) {
        match &self.records {
            Records::Answers(_) => (&[], &[]),
            Records::Upstream(m) => (m.name_servers(), m.additionals()),
        }
    }
}

fn to_dns(name: &hickory_proto::rr::Name, record: Record) -> DnsRecord {
    let rdata = match record {
        Record::Aaaa(a) => RData::AAAA(AAAA(a)),
        Record::Txt(t) => RData::TXT(TXT::new(txt_strings(&t))),
    };
    DnsRecord::from_rdata(name.clone(), TTL, rdata)
}

impl Resolver {
    /// `counts`: where what it does is counted.
    pub fn new(n: &NetworkConfig, directory: Published, counts: Arc<DnsCounts>) -> Resolver {
        Resolver {
            prefix: n.prefix,
            directory,
            upstreams: n.dns_upstream.clone().into(),
            forwards: Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT)),
            forwarding_members: Arc::default(),
            upstream_sockets: Arc::default(),
            flights: Arc::default(),
            counts,
        }
    }

    /// Room for one more forwarded query from `member`, if there is any.
    fn forward_slot(&self, member: IpAddr) -> Option<(SourceSlot, OwnedSemaphorePermit)> {
        let slot = self.forwarding_members.take(member, FORWARDS_PER_MEMBER)?;
        let permit = self.forwards.clone().try_acquire_owned().ok()?;
        Some((slot, permit))
    }

    /// The reply to `request`, counted as answered, refused or forwarded.
    async fn reply(&self, request: &Request) -> Reply {
        let reply = self.decide(request).await;
        if reply.authoritative {
            self.counts.answered();
        }
        reply
    }

    /// The upstreams' answer to `query`: of the same question in flight, or asked now.
    async fn forwarded(&self, query: &Query, tcp: bool) -> Result<Arc<Message>, ForwardError> {
        let asked = Asked {
            query: query.clone(),
            tcp,
        };
        let (upstreams, sockets) = (self.upstreams.clone(), self.upstream_sockets.clone());
        let question = asked.clone();
        let flight = self.flights.join(asked, move || async move {
            forward(&upstreams, &question.query, question.tcp, &sockets)
                .await
                .map(Arc::new)
        });
        flight.await
    }

    async fn decide(&self, request: &Request) -> Reply {
        if request.message_type() != MessageType::Query || request.op_code() != OpCode::Query {
            return Reply::code(ResponseCode::NotImp, false);
        }
        let Ok(info) = request.request_info() else {
            return Reply::code(ResponseCode::FormErr, false);
        };
        let directory = self.directory.current();
        let asker = match request.src().ip() {
            IpAddr::V6(a) if self.prefix.contains(&a) => directory.member(&a),
            _ => None,
        };
        let Some(asker) = asker else {
            self.counts.refused();
            return Reply::code(ResponseCode::Refused, false);
        };
        let query = info.query.original();
        let question = match query.query_type() {
            RecordType::AAAA => Question::Aaaa,
            RecordType::TXT => Question::Txt,
            _ => Question::Other,
        };
        let mut name = query.name().to_ascii();
        name.make_ascii_lowercase();
        match answer(&directory, asker, &name, question) {
            Answer::Records(records) => {
                let mut r = Reply::code(ResponseCode::NoError, true);
                r.records = Records::Answers(
                    records
                        .into_iter()
                        .map(|x| to_dns(query.name(), x))
                        .collect(),
                );
                r
            }
            Answer::NoData => Reply::code(ResponseCode::NoError, true),
            Answer::NxDomain => Reply::code(ResponseCode::NXDomain, true),
            Answer::Forward if self.upstreams.is_empty() => {
                self.counts.refused();
                Reply::code(ResponseCode::Refused, false)
            }
            Answer::Forward => {
                let Some(_slot) = self.forward_slot(request.src().ip()) else {
                    tracing::debug!(asker = %request.src().ip(), "too many forwarded queries in flight");
                    return Reply::code(ResponseCode::ServFail, false);
                };
                let tcp = request.protocol() == Protocol::Tcp;
                self.counts.forwarded();
                match self.forwarded(query, tcp).await {
                    Ok(m) => Reply {
                        code: m.response_code(),
                        authoritative: false,
                        records: Records::Upstream(m),
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "forwarding failed");
                        Reply::code(ResponseCode::ServFail, false)
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Resolver {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let reply = self.reply(request).await;
        let mut header = Header::response_from_request(request.header());
        header
            .set_response_code(reply.code)
            .set_authoritative(reply.authoritative)
            .set_recursion_available(!self.upstreams.is_empty());
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if request.edns().is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD).set_version(0);
            builder.edns(edns);
        }
        let (authority, additionals) = reply.authority_and_additionals();
        let message = builder.build(
            header,
            reply.answers().iter(),
            authority.iter(),
            std::iter::empty(),
            additionals.iter(),
        );
        match response.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a DNS answer");
                let mut failed = Header::response_from_request(request.header());
                failed.set_response_code(ResponseCode::ServFail);
                failed.into()
            }
        }
    }
}

/// A network's running resolver: the UDP loop ([`super::udp`]) and the bounded TCP accept
/// loop. Both stop when it is dropped.
pub struct DnsServer {
    udp: tokio::task::JoinHandle<()>,
    tcp: tokio::task::JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

/// The running resolvers; they serve until dropped.
pub type Resolvers = Vec<DnsServer>;

/// Starts `n`'s resolver on `<prefix>::3` port 53, UDP and TCP. The address must be on the
/// network's device already. It serves until the returned server is dropped.
pub async fn start(
    n: &NetworkConfig,
    directory: Published,
    counts: Arc<DnsCounts>,
) -> Result<DnsServer, DnsError> {
    let address = SocketAddr::new(n.dns().into(), 53);
    let err = |source| DnsError {
        network: n.name.clone(),
        address,
        source,
    };
    let udp = tokio::net::UdpSocket::bind(address).await.map_err(err)?;
    let tcp = tokio::net::TcpListener::bind(address).await.map_err(err)?;
    let resolver = Resolver::new(n, directory, counts);
    Ok(DnsServer {
        udp: tokio::spawn(super::udp::serve(udp, Arc::new(resolver.clone()))),
        tcp: tokio::spawn(serve_tcp(tcp, resolver)),
    })
}

/// Accepts DNS over TCP: at most [`TCP_CONNECTIONS`] at once, [`TCP_PER_MEMBER`] from one
/// address; one over either is closed at once. A failed accept (out of descriptors, say)
/// is retried after a pause, never in a busy loop.
async fn serve_tcp(listener: tokio::net::TcpListener, resolver: Resolver) {
    let connections = Arc::new(Semaphore::new(TCP_CONNECTIONS));
    let members = Arc::new(PerSource::default());
    loop {
        let (stream, src) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "DNS over TCP: cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = members.take(src.ip(), TCP_PER_MEMBER) else {
            continue;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            serve_tcp_connection(stream, src, &resolver).await;
            drop((slot, permit));
        });
    }
}

/// Answers the length-prefixed queries of one TCP connection, one at a time, until it is
/// closed or idle for [`TCP_TIMEOUT`].
async fn serve_tcp_connection(stream: tokio::net::TcpStream, src: SocketAddr, resolver: &Resolver) {
    let (stream, handle) =
        hickory_proto::tcp::TcpStream::from_stream(AsyncIoTokioAsStd(stream), src);
    let mut messages = TimeoutStream::new(stream, TCP_TIMEOUT);
    while let Some(Ok(message)) = messages.next().await {
        let Ok(request) = MessageRequest::from_bytes(message.bytes()) else {
            return;
        };
        let request = Request::new(request, src, Protocol::Tcp);
        let response = ResponseHandle::new(src, handle.clone(), Protocol::Tcp);
        resolver.handle_request(&request, response).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::network::tests::network;
    use crate::dns::directory::Directory;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::Name;
    use hickory_proto::serialize::binary::BinDecodable;
    use hickory_server::authority::MessageRequest;
    use wgexit::api::{Lease, MemberInfo, MemberKind};
    use wgexit::keys::Key;

    fn member(n: u8, app: &str) -> Lease {
        Lease {
            egress: "network:acme".into(),
            public_key: Key([n; 32]),
            address: format!("fdaa:0:1::{:x}", 0x100 + u16::from(n))
                .parse()
                .unwrap(),
            address6: None,
            created_at: 0,
            attachment: Default::default(),
            member: Some(Box::new(MemberInfo {
                network: "acme".into(),
                kind: MemberKind::Container,
                app: app.into(),
                region: "ams".into(),
                name: String::new(),
            })),
        }
    }

    fn request(name: &str, rtype: RecordType, src: &str) -> Request {
        let mut m = Message::new();
        m.set_id(7)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        let bytes = m.to_vec().unwrap();
        let message = MessageRequest::from_bytes(&bytes).unwrap();
        Request::new(message, src.parse().unwrap(), Protocol::Udp)
    }

    fn resolver(upstreams: Vec<SocketAddr>) -> Resolver {
        let mut n = network("acme", "fdaa:0:1::/48", "wgn-acme");
        n.dns_upstream = upstreams;
        let published = Published::default();
        published.publish(Directory::from_leases(
            [member(1, "web"), member(2, "api")].iter(),
        ));
        Resolver::new(&n, published, Arc::default())
    }

    #[tokio::test]
    async fn only_live_members_get_answers() {
        let r = resolver(Vec::new());
        let asked = |src: &'static str| request("web.internal.", RecordType::AAAA, src);
        let ok = r.reply(&asked("[fdaa:0:1::102]:5353")).await;
        assert_eq!(ok.code, ResponseCode::NoError);
        assert_eq!(ok.answers().len(), 1);
        assert!(ok.authoritative);
        // In the prefix but holding no lease, another network, or not IPv6 at all.
        for stranger in [
            "[fdaa:0:1::999]:5353",
            "[fdaa:0:2::101]:5353",
            "198.51.100.10:5353",
        ] {
            let refused = r.reply(&asked(stranger)).await;
            assert_eq!(refused.code, ResponseCode::Refused, "{stranger}");
            assert!(refused.answers().is_empty());
        }
    }

    #[tokio::test]
    async fn other_names_are_refused_without_an_upstream() {
        let r = resolver(Vec::new());
        let q = request("example.test.", RecordType::A, "[fdaa:0:1::101]:5353");
        assert_eq!(r.reply(&q).await.code, ResponseCode::Refused);
        let q = request("nope.internal.", RecordType::AAAA, "[fdaa:0:1::101]:5353");
        assert_eq!(r.reply(&q).await.code, ResponseCode::NXDomain);
        let q = request("web.internal.", RecordType::TXT, "[fdaa:0:1::101]:5353");
        let nodata = r.reply(&q).await;
        assert_eq!(
            (nodata.code, nodata.answers().len()),
            (ResponseCode::NoError, 0)
        );
        let totals = r.counts.totals();
        assert_eq!(
            (totals.answered, totals.refused, totals.forwarded),
            (2, 1, 0)
        );
    }

    #[test]
    fn forwarded_queries_are_capped_per_member_and_per_network() {
        let r = resolver(vec!["198.18.0.53:53".parse().unwrap()]);
        let member = |i: u16| IpAddr::from([0xfdaa, 0, 1, 0, 0, 0, 0, i]);
        let mut held = Vec::new();
        while let Some(slot) = r.forward_slot(member(1)) {
            held.push(slot);
        }
        assert_eq!(held.len(), FORWARDS_PER_MEMBER);
        for i in 2.. {
            match r.forward_slot(member(i)) {
                Some(slot) => held.push(slot),
                None if held.len() == FORWARDS_IN_FLIGHT => break,
                None => continue,
            }
        }
        assert!(r.forward_slot(member(1000)).is_none(), "the network's cap");
        held.clear();
        assert!(
            r.forward_slot(member(1)).is_some(),
            "given back when answered"
        );
    }
}
