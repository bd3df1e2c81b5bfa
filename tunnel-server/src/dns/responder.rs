//! The embedded DNS responder: node names from the records, everything else forwarded.
//!
//! hickory-server does the wire work (UDP and TCP, EDNS, truncation to the client's payload
//! size, FORMERR for a message that does not parse); this module decides the answers. A
//! kube-apiserver pod pointed at it (`dnsConfig.nameservers`) resolves edge node names to the
//! tunnel Service and every other name as before, without CoreDNS being changed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::NetError;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{DNSClass, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::resolver::config::{NameServerConfig, ResolverOpts};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::{Catalog, MessageResponse, MessageResponseBuilder};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

use super::NodeRecords;

/// TTL of a node's answer: short, so that a node that moves (agent to another replica, edge
/// to cloud) is followed within seconds by caching resolvers.
pub const NODE_TTL: u32 = 5;
/// Forwarded queries in flight at once; more get SERVFAIL at once rather than pile up.
pub const MAX_FORWARDS: usize = 1024;
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_QUEUE: usize = 32;
/// How long one upstream query may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the responder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    /// A socket could not be bound.
    #[error("cannot listen for DNS on {addr} ({proto}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// udp or tcp.
        proto: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The upstream resolver could not be set up.
    #[error("DNS upstream: {0}")]
    Upstream(String),
}

/// How the answer to a query was made, for `edge_tunnel_server_dns_queries_total{answer}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// From the node records.
    Node,
    /// Sent to the upstream.
    Forwarded,
    /// Not a node, and no upstream (or no recursion asked for): REFUSED.
    Refused,
    /// Too many forwards in flight: SERVFAIL.
    Overloaded,
}

impl Answer {
    const ALL: [Self; 4] = [Self::Node, Self::Forwarded, Self::Refused, Self::Overloaded];

    fn label(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Forwarded => "forwarded",
            Self::Refused => "refused",
            Self::Overloaded => "overloaded",
        }
    }

    fn count(self) {
        metrics::counter!("edge_tunnel_server_dns_queries_total", "answer" => self.label())
            .increment(1);
    }
}

/// Answers node names from the records and forwards the rest.
pub struct Responder {
    records: watch::Receiver<Arc<NodeRecords>>,
    upstream: Option<Catalog>,
    forwards: Semaphore,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("nodes", &self.records.borrow().len())
            .field("upstream", &self.upstream.is_some())
            .finish()
    }
}

impl Responder {
    /// A responder over `records`, forwarding to `upstream` (none: other names are REFUSED).
    pub fn new(
        records: watch::Receiver<Arc<NodeRecords>>,
        upstream: &[SocketAddr],
    ) -> Result<Self, ResponderError> {
        for answer in Answer::ALL {
            metrics::counter!("edge_tunnel_server_dns_queries_total", "answer" => answer.label())
                .increment(0);
        }
        let upstream = if upstream.is_empty() {
            None
        } else {
            Some(forwarder(upstream)?)
        };
        Ok(Self {
            records,
            upstream,
            forwards: Semaphore::new(MAX_FORWARDS),
        })
    }

    /// The records answering `request`, when it asks for a node's name: `Some` of the node's
    /// addresses of the queried type (none for other types: the name exists, the type does
    /// not); `None` when the name is not a node's.
    fn node_answer(&self, request: &Request) -> Option<Vec<Record>> {
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            return None;
        }
        let info = request.request_info().ok()?;
        let query = info.query;
        if query.query_class() != DNSClass::IN {
            return None;
        }
        let name = query.original().name();
        let records = self.records.borrow();
        let ips = records.lookup(&name.to_ascii())?;
        let qtype = query.query_type();
        Some(
            ips.iter()
                .filter_map(|ip| match (ip, qtype) {
                    (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                    (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                        Some(RData::AAAA(AAAA(*v6)))
                    }
                    _ => None,
                })
                .map(|rdata| Record::from_rdata(name.clone(), NODE_TTL, rdata))
                .collect(),
        )
    }

    async fn send_node_answer<R: ResponseHandler>(
        request: &Request,
        answers: &[Record],
        upstream: bool,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        metadata.recursion_available = upstream;
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(MIN_PAYLOAD));
            edns.set_version(0);
            edns
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        // EDNS versions above 0 do not exist yet; RFC 6891 says BADVERS.
        let response = if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            metadata.response_code = ResponseCode::BADVERS;
            builder.build(metadata, &[], &[], &[], &[])
        } else {
            builder.build(metadata, answers, &[], &[], &[])
        };
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, "cannot send a DNS response");
                serve_failed(request)
            }
        }
    }

    async fn refuse<R: ResponseHandler>(
        request: &Request,
        code: ResponseCode,
        mut response_handle: R,
    ) -> ResponseInfo {
        let response =
            MessageResponseBuilder::new(&request.queries, None).error_msg(&request.metadata, code);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, "cannot send a DNS response");
                serve_failed(request)
            }
        }
    }
}

impl Responder {
    /// Answers one message as the UDP server would: the response's bytes, at most the
    /// client's payload size (512 without EDNS) with TC set when the answer does not fit.
    /// `None` when the message does not parse (the server answers FORMERR to those itself, or
    /// drops what has no header). No socket involved: for tests and fuzzing.
    pub async fn answer_udp(&self, message: &[u8]) -> Option<Vec<u8>> {
        let src = SocketAddr::from(([127, 0, 0, 1], 0));
        let request = Request::from_bytes(message.to_vec(), src, Protocol::Udp).ok()?;
        let max = request
            .edns
            .as_ref()
            .map_or(MIN_PAYLOAD, |e| e.max_payload().max(MIN_PAYLOAD));
        let capture = Capture {
            max,
            sent: Arc::default(),
        };
        self.handle_request::<_, TokioTime>(&request, capture.clone())
            .await;
        let mut sent = capture
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sent.pop()
    }
}

/// The payload size of a client without EDNS (RFC 1035), and the least any client gets.
const MIN_PAYLOAD: u16 = 512;

/// Keeps the encoded response instead of sending it.
#[derive(Clone)]
struct Capture {
    max: u16,
    sent: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
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
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(usize::from(MIN_PAYLOAD));
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(self.max);
        let info = response.destructive_emit(&mut encoder)?;
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(bytes);
        Ok(info)
    }
}

/// A SERVFAIL header for `request`, what the server logs when no response could be sent.
fn serve_failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(hickory_server::proto::op::Header {
        metadata,
        counts: Default::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for Responder {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        if let Some(answers) = self.node_answer(request) {
            Answer::Node.count();
            return Self::send_node_answer(
                request,
                &answers,
                self.upstream.is_some(),
                response_handle,
            )
            .await;
        }
        let Some(upstream) = &self.upstream else {
            Answer::Refused.count();
            return Self::refuse(request, ResponseCode::Refused, response_handle).await;
        };
        let Ok(_permit) = self.forwards.try_acquire() else {
            Answer::Overloaded.count();
            return Self::refuse(request, ResponseCode::ServFail, response_handle).await;
        };
        Answer::Forwarded.count();
        upstream
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A catalog whose root zone forwards to `upstream` (UDP, and TCP when an answer is truncated).
fn forwarder(upstream: &[SocketAddr]) -> Result<Catalog, ResponderError> {
    let name_servers = upstream
        .iter()
        .map(|addr| {
            let mut server = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut server.connections {
                connection.port = addr.port();
            }
            server
        })
        .collect();
    let mut options = ResolverOpts::default();
    options.timeout = UPSTREAM_TIMEOUT;
    options.attempts = 1;
    // The clients cache by the upstream's TTLs; a second cache here would only add staleness.
    options.cache_size = 0;
    let handler = ForwardZoneHandler::builder_tokio(ForwardConfig {
        name_servers,
        options: Some(options),
    })
    .build()
    .map_err(ResponderError::Upstream)?;
    let mut catalog = Catalog::new();
    catalog.upsert(
        hickory_server::proto::rr::LowerName::from(hickory_server::proto::rr::Name::root()),
        vec![Arc::new(handler)],
    );
    Ok(catalog)
}

/// A bound responder, serving until [`stop`](Self::stop).
pub struct DnsServer {
    server: Server<Responder>,
    addr: SocketAddr,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (port 0: the kernel picks one, the same for both) and
    /// serves `responder` on them to clients in `allow` (others are refused).
    pub async fn bind(
        addr: SocketAddr,
        responder: Responder,
        allow: &[ipnet::IpNet],
    ) -> Result<Self, ResponderError> {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|source| ResponderError::Bind {
                addr,
                proto: "udp",
                source,
            })?;
        let bound = udp.local_addr().map_err(|source| ResponderError::Bind {
            addr,
            proto: "udp",
            source,
        })?;
        let tcp = TcpListener::bind(bound)
            .await
            .map_err(|source| ResponderError::Bind {
                addr: bound,
                proto: "tcp",
                source,
            })?;
        // An allow list of one address family leaves the other open (hickory's rule): deny
        // both families outright, so that only the allowed networks get answers.
        // (An allowed /0 would tie with that deny and lose: its family is not denied.)
        let everything: [ipnet::IpNet; 2] = [
            ipnet::Ipv4Net::default().into(),
            ipnet::Ipv6Net::default().into(),
        ];
        let deny = everything.into_iter().filter(|all| !allow.contains(all));
        let mut server = Server::with_access(responder, deny, allow.iter().copied());
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_QUEUE);
        Ok(Self {
            server,
            addr: bound,
        })
    }

    /// Where it listens (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops answering.
    pub async fn stop(mut self) {
        if let Err(error) = self.server.shutdown_gracefully().await {
            warn!(%error, "the DNS responder stopped with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_server::proto::op::{Message, Query};
    use hickory_server::proto::rr::Name;

    use super::*;

    fn responder() -> (watch::Sender<Arc<NodeRecords>>, Responder) {
        let mut records = NodeRecords::new();
        records.insert("node-a", "10.96.0.7".parse().unwrap());
        records.insert("cloud-1", "fd00::10".parse().unwrap());
        let (tx, rx) = watch::channel(Arc::new(records));
        (tx, Responder::new(rx, &[]).unwrap())
    }

    fn query(name: &str, qtype: RecordType, edns: Option<(u16, u8)>) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 0x1234;
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some((payload, version)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_version(version);
            message.set_edns(e);
        }
        message.to_vec().unwrap()
    }

    async fn ask(responder: &Responder, bytes: &[u8]) -> Message {
        let response = responder.answer_udp(bytes).await.expect("a response");
        let message = Message::from_vec(&response).expect("the response parses");
        assert_eq!(message.metadata.id, 0x1234);
        assert_eq!(message.metadata.message_type, MessageType::Response);
        message
    }

    #[tokio::test]
    async fn node_names_are_answered_from_the_records_by_type() {
        let (_tx, responder) = responder();
        let a = ask(&responder, &query("node-a.", RecordType::A, None)).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert!(a.metadata.authoritative);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].ttl, NODE_TTL);
        assert_eq!(a.answers[0].data, RData::A(A("10.96.0.7".parse().unwrap())));
        // The name exists, the type does not: NODATA, not NXDOMAIN.
        for (name, qtype) in [
            ("node-a.", RecordType::AAAA),
            ("node-a.", RecordType::MX),
            ("cloud-1.", RecordType::A),
        ] {
            let none = ask(&responder, &query(name, qtype, None)).await;
            assert_eq!(
                none.metadata.response_code,
                ResponseCode::NoError,
                "{name} {qtype}"
            );
            assert!(none.answers.is_empty(), "{name} {qtype}");
        }
        let v6 = ask(
            &responder,
            &query("cloud-1.", RecordType::AAAA, Some((1232, 0))),
        )
        .await;
        assert_eq!(v6.answers.len(), 1);
        assert_eq!(v6.edns.as_ref().map(Edns::max_payload), Some(1232));
    }

    #[tokio::test]
    async fn other_names_are_refused_without_an_upstream_and_edns_above_0_is_badvers() {
        let (_tx, responder) = responder();
        let other = ask(&responder, &query("example.com.", RecordType::A, None)).await;
        assert_eq!(other.metadata.response_code, ResponseCode::Refused);
        let bad = ask(
            &responder,
            &query("node-a.", RecordType::A, Some((1232, 1))),
        )
        .await;
        // BADVERS and BADSIG share the code 16 (RFC 6891, RFC 8945): the value is what counts.
        assert_eq!(
            u16::from(bad.metadata.response_code),
            u16::from(ResponseCode::BADVERS)
        );
        assert!(bad.answers.is_empty());
        // An update to a node's name is not a query: never answered from the records.
        let mut update = Message::from_vec(&query("node-a.", RecordType::A, None)).unwrap();
        update.metadata.op_code = OpCode::Update;
        let refused = ask(&responder, &update.to_vec().unwrap()).await;
        assert_ne!(refused.metadata.response_code, ResponseCode::NoError);
        assert!(refused.answers.is_empty());
    }

    #[tokio::test]
    async fn the_records_in_force_are_the_latest_published() {
        let (tx, responder) = responder();
        let mut next = NodeRecords::new();
        next.insert("node-b", "10.96.0.8".parse().unwrap());
        tx.send_replace(Arc::new(next));
        let gone = ask(&responder, &query("node-a.", RecordType::A, None)).await;
        assert_eq!(gone.metadata.response_code, ResponseCode::Refused);
        let b = ask(&responder, &query("node-b.", RecordType::A, None)).await;
        assert_eq!(b.answers.len(), 1);
    }
}
