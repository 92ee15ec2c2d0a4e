//! A network's resolver, on `hickory-server`: bound to `<prefix>::3` port 53 (UDP and TCP),
//! it answers only live members of its network (source within the prefix and holding a
//! lease; anyone else is REFUSED), `.internal` names from the [`Published`] directory
//! (authoritative, TTL [`super::TTL`]), other names through the upstreams (REFUSED when
//! there are none).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{AAAA, TXT};
use hickory_proto::rr::{RData, Record as DnsRecord, RecordType};
use hickory_proto::xfer::Protocol;
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;
use ipnet::Ipv6Net;

use super::directory::Published;
use super::forward::forward;
use super::names::{answer, txt_strings, Answer, Question, Record};
use super::TTL;
use crate::config::NetworkConfig;

/// How long an idle TCP connection is kept.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest UDP answer offered to clients that speak EDNS.
const EDNS_PAYLOAD: u16 = 1232;

#[derive(Debug, thiserror::Error)]
#[error("network {network}: cannot serve DNS on {address}: {source}")]
pub struct DnsError {
    pub network: String,
    pub address: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// One network's resolver.
pub struct Resolver {
    prefix: Ipv6Net,
    directory: Published,
    upstreams: Vec<SocketAddr>,
}

/// What the resolver sends back, before it is written.
struct Reply {
    code: ResponseCode,
    authoritative: bool,
    answers: Vec<DnsRecord>,
    authority: Vec<DnsRecord>,
    additionals: Vec<DnsRecord>,
}

impl Reply {
    fn code(code: ResponseCode, authoritative: bool) -> Reply {
        Reply {
            code,
            authoritative,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
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
    pub fn new(n: &NetworkConfig, directory: Published) -> Resolver {
        Resolver {
            prefix: n.prefix,
            directory,
            upstreams: n.dns_upstream.clone(),
        }
    }

    async fn reply(&self, request: &Request) -> Reply {
        if request.message_type() != MessageType::Query || request.op_code() != OpCode::Query {
            return Reply::code(ResponseCode::NotImp, false);
        }
        let Ok(info) = request.request_info() else {
            return Reply::code(ResponseCode::FormErr, false);
        };
        let directory = self.directory.current();
        let asker = match request.src().ip() {
            IpAddr::V6(a) if self.prefix.contains(&a) => directory.member(&a).cloned(),
            _ => None,
        };
        let Some(asker) = asker else {
            return Reply::code(ResponseCode::Refused, false);
        };
        let query = info.query.original();
        let question = match query.query_type() {
            RecordType::AAAA => Question::Aaaa,
            RecordType::TXT => Question::Txt,
            _ => Question::Other,
        };
        let name = query.name().to_ascii().to_ascii_lowercase();
        match answer(&directory, &asker, &name, question) {
            Answer::Records(records) => {
                let mut r = Reply::code(ResponseCode::NoError, true);
                r.answers = records
                    .into_iter()
                    .map(|x| to_dns(query.name(), x))
                    .collect();
                r
            }
            Answer::NoData => Reply::code(ResponseCode::NoError, true),
            Answer::NxDomain => Reply::code(ResponseCode::NXDomain, true),
            Answer::Forward if self.upstreams.is_empty() => {
                Reply::code(ResponseCode::Refused, false)
            }
            Answer::Forward => {
                let tcp = request.protocol() == Protocol::Tcp;
                match forward(&self.upstreams, query, tcp).await {
                    Ok(mut m) => Reply {
                        code: m.response_code(),
                        authoritative: false,
                        answers: m.take_answers(),
                        authority: m.take_name_servers(),
                        additionals: m.take_additionals(),
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
        let message = builder.build(
            header,
            reply.answers.iter(),
            reply.authority.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
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

/// The running resolvers; they serve until dropped.
pub type Resolvers = Vec<ServerFuture<Resolver>>;

/// Starts `n`'s resolver on `<prefix>::3` port 53, UDP and TCP. The address must be on the
/// network's device already. It serves until the returned server is dropped.
pub async fn start(
    n: &NetworkConfig,
    directory: Published,
) -> Result<ServerFuture<Resolver>, DnsError> {
    let address = SocketAddr::new(n.dns().into(), 53);
    let err = |source| DnsError {
        network: n.name.clone(),
        address,
        source,
    };
    let udp = tokio::net::UdpSocket::bind(address).await.map_err(err)?;
    let tcp = tokio::net::TcpListener::bind(address).await.map_err(err)?;
    let mut server = ServerFuture::new(Resolver::new(n, directory));
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT);
    Ok(server)
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
        Resolver::new(&n, published)
    }

    #[tokio::test]
    async fn only_live_members_get_answers() {
        let r = resolver(Vec::new());
        let asked = |src: &'static str| request("web.internal.", RecordType::AAAA, src);
        let ok = r.reply(&asked("[fdaa:0:1::102]:5353")).await;
        assert_eq!(ok.code, ResponseCode::NoError);
        assert_eq!(ok.answers.len(), 1);
        assert!(ok.authoritative);
        // In the prefix but holding no lease, another network, or not IPv6 at all.
        for stranger in [
            "[fdaa:0:1::999]:5353",
            "[fdaa:0:2::101]:5353",
            "198.51.100.10:5353",
        ] {
            let refused = r.reply(&asked(stranger)).await;
            assert_eq!(refused.code, ResponseCode::Refused, "{stranger}");
            assert!(refused.answers.is_empty());
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
            (nodata.code, nodata.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }
}
