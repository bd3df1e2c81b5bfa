//! The wire messages (generated from `proto/tunnel.proto`) and their framing.
//!
//! A frame is a 2-byte big-endian length followed by that many bytes of prost encoding. Decoding is
//! sans-IO and total: it tells "need more bytes" ([`DecodeError::Incomplete`]) from malformed input,
//! checks the length against a limit before looking at the body, and never panics.

use bytes::{BufMut, BytesMut};
use prost::Message;

use crate::route::{self, TargetHost};

#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/messages/edgetunnel.v1.rs"));
}
pub use generated::*;

/// Bytes of the length prefix in front of every frame.
pub const FRAME_HEADER_LEN: usize = 2;
/// Largest control-channel message accepted, in bytes of encoding.
pub const MAX_CONTROL_LEN: usize = 16 * 1024;
/// Largest stream-open header or reply accepted, in bytes of encoding.
pub const MAX_OPEN_LEN: usize = 1024;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends inside the frame; `needed` more bytes complete at least the next step.
    #[error("incomplete frame: {needed} more bytes needed")]
    Incomplete {
        /// How many more bytes the decoder needs before it can make progress.
        needed: usize,
    },
    /// The length prefix announces more than the limit for this kind of frame.
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        limit: usize,
    },
    /// The body is not a valid prost encoding of the expected message.
    #[error("malformed message: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// The message decoded but a field is missing or out of range.
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

impl DecodeError {
    /// True when more input may complete the frame; every other error is final.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete { .. })
    }
}

/// Appends `msg` as one frame to `dst`.
///
/// # Panics
/// Never for messages this crate builds: all of them are far below `u16::MAX` bytes. A caller that
/// builds an oversized message gets [`DecodeError::TooLarge`] instead.
pub fn encode_frame<M: Message>(msg: &M, dst: &mut BytesMut) -> Result<(), DecodeError> {
    let len = msg.encoded_len();
    let Ok(prefix) = u16::try_from(len) else {
        return Err(DecodeError::TooLarge {
            len,
            limit: usize::from(u16::MAX),
        });
    };
    dst.reserve(FRAME_HEADER_LEN + len);
    dst.put_u16(prefix);
    msg.encode(dst)
        .map_err(|_| DecodeError::Invalid("encode buffer"))?;
    Ok(())
}

/// Encodes `msg` as one frame in a fresh buffer.
pub fn frame<M: Message>(msg: &M) -> Result<BytesMut, DecodeError> {
    let mut buf = BytesMut::with_capacity(FRAME_HEADER_LEN + msg.encoded_len());
    encode_frame(msg, &mut buf)?;
    Ok(buf)
}

/// Length of the frame body announced by `src`'s prefix, checked against `limit`.
pub fn frame_len(src: &[u8], limit: usize) -> Result<usize, DecodeError> {
    let Some(prefix) = src.get(..FRAME_HEADER_LEN) else {
        return Err(DecodeError::Incomplete {
            needed: FRAME_HEADER_LEN - src.len(),
        });
    };
    let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
    if len > limit {
        return Err(DecodeError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Decodes one frame from the front of `src`; returns the message and the bytes it used.
pub fn decode_frame<M: Message + Default>(
    src: &[u8],
    limit: usize,
) -> Result<(M, usize), DecodeError> {
    let len = frame_len(src, limit)?;
    let total = FRAME_HEADER_LEN + len;
    let Some(body) = src.get(FRAME_HEADER_LEN..total) else {
        return Err(DecodeError::Incomplete {
            needed: total - src.len(),
        });
    };
    Ok((M::decode(body)?, total))
}

/// What the server asks the agent to connect to, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// Where the agent should dial.
    pub target: route::Target,
    /// Whether the stream's payload is zstd-compressed (reserved; not yet negotiated).
    pub compress: bool,
    /// Correlates the server's and the agent's logs for this stream.
    pub trace_id: u64,
    /// Peer links only: the node whose agent the receiving replica opens the stream to (by
    /// its own registry, so `target.host` is left for it to decide). `None` on agent links.
    pub node: Option<route::NodeRef>,
}

impl OpenRequest {
    /// A request for `target` with a trace id.
    pub fn new(target: route::Target, trace_id: u64) -> Self {
        Self {
            target,
            compress: false,
            trace_id,
            node: None,
        }
    }

    /// A request a replica forwards to the peer holding `node`'s agent, for `port` there.
    pub fn to_peer(node: route::NodeRef, port: u16, trace_id: u64) -> Self {
        Self {
            target: route::Target {
                host: TargetHost::Node,
                port,
            },
            compress: false,
            trace_id,
            node: Some(node),
        }
    }

    /// The wire form.
    pub fn to_proto(&self) -> StreamOpen {
        let (kind, ip) = match self.target.host {
            TargetHost::Node => (HostKind::Node, Vec::new()),
            TargetHost::Loopback => (HostKind::Loopback, Vec::new()),
            TargetHost::NodeIp(std::net::IpAddr::V4(ip)) => {
                (HostKind::NodeIp, ip.octets().to_vec())
            }
            TargetHost::NodeIp(std::net::IpAddr::V6(ip)) => {
                (HostKind::NodeIp, ip.octets().to_vec())
            }
        };
        StreamOpen {
            target: Some(Target {
                kind: kind.into(),
                ip,
                port: u32::from(self.target.port),
            }),
            compress: self.compress,
            trace_id: self.trace_id,
            node: self
                .node
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }

    /// Validates the wire form: a known host kind, a 4- or 16-byte IP where one is needed, a port
    /// in 1..=65535.
    pub fn from_proto(msg: StreamOpen) -> Result<Self, DecodeError> {
        let target = msg
            .target
            .ok_or(DecodeError::Invalid("stream open without target"))?;
        let port = u16::try_from(target.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or(DecodeError::Invalid("target port out of range"))?;
        let host = match HostKind::try_from(target.kind) {
            Ok(HostKind::Node) => TargetHost::Node,
            Ok(HostKind::Loopback) => TargetHost::Loopback,
            Ok(HostKind::NodeIp) => {
                let ip = match target.ip.len() {
                    4 => {
                        let b: [u8; 4] = target.ip[..]
                            .try_into()
                            .map_err(|_| DecodeError::Invalid("ip"))?;
                        std::net::IpAddr::from(b)
                    }
                    16 => {
                        let b: [u8; 16] = target.ip[..]
                            .try_into()
                            .map_err(|_| DecodeError::Invalid("ip"))?;
                        std::net::IpAddr::from(b)
                    }
                    _ => return Err(DecodeError::Invalid("target ip must be 4 or 16 bytes")),
                };
                TargetHost::NodeIp(ip)
            }
            Ok(HostKind::Unspecified) | Err(_) => {
                return Err(DecodeError::Invalid("unknown target host kind"));
            }
        };
        let node = match msg.node.as_str() {
            "" => None,
            node => Some(
                route::parse_host(node)
                    .map_err(|_| DecodeError::Invalid("peer request for an invalid node"))?,
            ),
        };
        Ok(Self {
            target: route::Target { host, port },
            compress: msg.compress,
            trace_id: msg.trace_id,
            node,
        })
    }
}

impl PortPolicy {
    /// The wire form of `policy`.
    pub fn from_policy(policy: &route::PortPolicy) -> Self {
        Self {
            node_ports: policy.node.iter().map(u32::from).collect(),
            loopback_ports: policy.loopback.iter().map(u32::from).collect(),
        }
    }

    /// Validates the wire form: every port in 1..=65535.
    pub fn to_policy(&self) -> Result<route::PortPolicy, DecodeError> {
        let ports = |list: &[u32]| {
            list.iter()
                .map(|p| {
                    u16::try_from(*p)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or(DecodeError::Invalid("port policy: port out of range"))
                })
                .collect::<Result<Vec<u16>, _>>()
                .map(route::PortSet::new)
        };
        Ok(route::PortPolicy {
            node: ports(&self.node_ports)?,
            loopback: ports(&self.loopback_ports)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_incomplete_prefixes() {
        let req = OpenRequest::new(
            route::Target {
                host: TargetHost::NodeIp("10.0.0.5".parse().unwrap()),
                port: 10250,
            },
            7,
        );
        let buf = frame(&req.to_proto()).unwrap();
        for cut in 0..buf.len() {
            let err = decode_frame::<StreamOpen>(&buf[..cut], MAX_OPEN_LEN).unwrap_err();
            assert!(err.is_incomplete(), "cut at {cut}: {err:?}");
        }
        let (msg, used) = decode_frame::<StreamOpen>(&buf, MAX_OPEN_LEN).unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(OpenRequest::from_proto(msg).unwrap(), req);
    }

    #[test]
    fn peer_requests_carry_their_node_and_reject_invalid_ones() {
        for node in [
            route::NodeRef::Name("edge-1".into()),
            route::NodeRef::Ip("fd00::5".parse().unwrap()),
        ] {
            let req = OpenRequest::to_peer(node, 10250, 9);
            assert_eq!(OpenRequest::from_proto(req.to_proto()).unwrap(), req);
        }
        let mut msg = OpenRequest::new(
            route::Target {
                host: TargetHost::Node,
                port: 10250,
            },
            1,
        )
        .to_proto();
        assert_eq!(OpenRequest::from_proto(msg.clone()).unwrap().node, None);
        msg.node = "not a node!".into();
        assert!(matches!(
            OpenRequest::from_proto(msg),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn oversized_frame_is_rejected_before_the_body_arrives() {
        let err = decode_frame::<StreamOpen>(&[0x40, 0x00], MAX_OPEN_LEN).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                len: 0x4000,
                limit: MAX_OPEN_LEN
            }
        );
    }

    #[test]
    fn invalid_targets_are_typed_errors() {
        let cases = [
            StreamOpen::default(),
            StreamOpen {
                target: Some(Target {
                    kind: HostKind::Node.into(),
                    ip: vec![],
                    port: 70000,
                }),
                ..Default::default()
            },
            StreamOpen {
                target: Some(Target {
                    kind: HostKind::NodeIp.into(),
                    ip: vec![1, 2, 3],
                    port: 80,
                }),
                ..Default::default()
            },
            StreamOpen {
                target: Some(Target {
                    kind: 42,
                    ip: vec![],
                    port: 80,
                }),
                ..Default::default()
            },
        ];
        for case in cases {
            assert!(matches!(
                OpenRequest::from_proto(case),
                Err(DecodeError::Invalid(_))
            ));
        }
    }

    #[test]
    fn port_policies_round_trip_and_reject_bad_ports() {
        let policy = route::PortPolicy {
            node: route::PortSet::new([9100, 10250]),
            loopback: route::PortSet::new([10255]),
        };
        assert_eq!(PortPolicy::from_policy(&policy).to_policy(), Ok(policy));
        for bad in [0, 65536] {
            let msg = PortPolicy {
                node_ports: vec![80, bad],
                loopback_ports: vec![],
            };
            assert!(msg.to_policy().is_err(), "{bad}");
        }
    }

    #[test]
    fn garbage_body_is_malformed_not_a_panic() {
        let bytes = [0x00, 0x03, 0xff, 0xff, 0xff];
        let err = decode_frame::<Control>(&bytes, MAX_CONTROL_LEN).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)));
    }
}
