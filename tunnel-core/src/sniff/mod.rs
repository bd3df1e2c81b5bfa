//! Finding the node a client wants from the first bytes it sends, without terminating anything:
//! the TLS ClientHello's SNI ([`sni`]) and the HTTP/1 request head ([`http`]). Pure, bounded,
//! and total: every input gives a value or a typed error, never a panic.

pub mod http;
pub mod sni;

/// Why sniffing did not yield a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniffError {
    /// More bytes are needed; `needed` is a lower bound when known (0 when not).
    #[error("incomplete: at least {needed} more bytes needed")]
    Incomplete {
        /// Lower bound of the bytes still missing.
        needed: usize,
    },
    /// The input is larger than the sniffer's limit before it is complete.
    #[error("client hello or request head exceeds {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The bytes are not the protocol this sniffer reads.
    #[error("not {0}")]
    WrongProtocol(&'static str),
    /// The bytes are the right protocol but broken.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// A complete, well-formed input that does not name a node (no SNI, no Host header).
    #[error("no target: {0}")]
    NoTarget(&'static str),
    /// The named host or port is not valid.
    #[error(transparent)]
    Authority(#[from] crate::route::AuthorityError),
}

impl SniffError {
    /// True when reading more bytes may turn this into a result.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, Self::Incomplete { .. })
    }
}
