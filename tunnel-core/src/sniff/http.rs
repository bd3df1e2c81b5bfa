//! The target of an HTTP/1 request, from its head: origin-form with a Host header, absolute-form
//! (`GET http://node-a:9100/metrics`, as HTTP proxy clients send), and `CONNECT node-a:10250`.

use super::SniffError;
use crate::route::{NodeRef, parse_authority};

/// Largest request head accepted, in bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 64;

/// How the request named its target (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestForm {
    /// `GET /path` with a Host header.
    Origin,
    /// `GET http://host:port/path`.
    Absolute,
    /// `CONNECT host:port`.
    Connect,
}

/// The node and port a request head names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTarget {
    /// The node, by name or IP.
    pub node: NodeRef,
    /// The port on the node.
    pub port: u16,
    /// How the target was written.
    pub form: RequestForm,
}

/// Where a request says it goes, from its parts as an HTTP library gives them: the method, the
/// request-target as sent, and the Host header (if exactly one was sent).
///
/// `default_port` applies when neither the request-target nor Host names a port.
pub fn request_target(
    method: &str,
    target: &str,
    host: Option<&str>,
    default_port: u16,
) -> Result<RequestTarget, SniffError> {
    if method.eq_ignore_ascii_case("CONNECT") {
        // CONNECT needs an explicit port (RFC 9110 §9.3.6).
        if !target.contains(':') || target.ends_with(']') {
            return Err(SniffError::NoTarget("CONNECT without host:port"));
        }
        let (node, port) = parse_authority(target, default_port)?;
        return Ok(RequestTarget {
            node,
            port,
            form: RequestForm::Connect,
        });
    }
    if let Some(rest) = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("HTTP://"))
    {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(SniffError::Malformed("userinfo in request target"));
        }
        let (node, port) = parse_authority(authority, default_port)?;
        return Ok(RequestTarget {
            node,
            port,
            form: RequestForm::Absolute,
        });
    }
    if !target.starts_with('/') && target != "*" {
        return Err(SniffError::Malformed("request target"));
    }
    let host = host.ok_or(SniffError::NoTarget("no Host header"))?;
    let (node, port) = parse_authority(host.trim(), default_port)?;
    Ok(RequestTarget {
        node,
        port,
        form: RequestForm::Origin,
    })
}

/// The parsed head of a request: its target and its length in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Where the request goes.
    pub target: RequestTarget,
    /// Bytes of `src` taken by the head, including the final blank line.
    pub head_len: usize,
}

/// Parses the request head at the start of `src` and finds its target.
pub fn parse_request_head(src: &[u8], default_port: u16) -> Result<RequestHead, SniffError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(src).map_err(|e| match e {
        httparse::Error::TooManyHeaders => SniffError::TooLarge { limit: MAX_HEAD },
        httparse::Error::Version => SniffError::WrongProtocol("HTTP/1"),
        _ => SniffError::Malformed("HTTP request head"),
    });
    let head_len = match status? {
        httparse::Status::Complete(n) if n > MAX_HEAD => {
            return Err(SniffError::TooLarge { limit: MAX_HEAD });
        }
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if src.len() >= MAX_HEAD => {
            return Err(SniffError::TooLarge { limit: MAX_HEAD });
        }
        httparse::Status::Partial => return Err(SniffError::Incomplete { needed: 0 }),
    };
    let mut hosts = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"));
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(SniffError::Malformed("several Host headers")),
        (Some(h), None) => Some(
            std::str::from_utf8(h.value)
                .map_err(|_| SniffError::Malformed("Host header is not text"))?,
        ),
        (None, _) => None,
    };
    let method = req.method.ok_or(SniffError::Malformed("method"))?;
    let path = req.path.ok_or(SniffError::Malformed("request target"))?;
    Ok(RequestHead {
        target: request_target(method, path, host, default_port)?,
        head_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> NodeRef {
        NodeRef::Name(n.into())
    }

    #[test]
    fn the_three_forms() {
        let cases: [(&[u8], NodeRef, u16, RequestForm); 5] = [
            (
                b"GET /metrics HTTP/1.1\r\nHost: node-a:10255\r\n\r\n",
                name("node-a"),
                10255,
                RequestForm::Origin,
            ),
            (
                b"GET /pods HTTP/1.1\r\nhost: 10.0.0.5\r\nAccept: */*\r\n\r\n",
                NodeRef::Ip("10.0.0.5".parse().unwrap()),
                10255,
                RequestForm::Origin,
            ),
            (
                b"GET http://node-b:9100/metrics HTTP/1.1\r\nHost: node-b:9100\r\n\r\n",
                name("node-b"),
                9100,
                RequestForm::Absolute,
            ),
            (
                b"GET http://node-b?x HTTP/1.1\r\n\r\n",
                name("node-b"),
                10255,
                RequestForm::Absolute,
            ),
            (
                b"CONNECT node-c:10250 HTTP/1.1\r\nHost: node-c:10250\r\n\r\n",
                name("node-c"),
                10250,
                RequestForm::Connect,
            ),
        ];
        for (src, node, port, form) in cases {
            let head = parse_request_head(src, 10255).unwrap();
            assert_eq!(head.target, RequestTarget { node, port, form });
            assert_eq!(head.head_len, src.len());
        }
    }

    #[test]
    fn incomplete_then_complete() {
        let src = b"GET / HTTP/1.1\r\nHost: node-a\r\n\r\nbody";
        for cut in 0..src.len() - 4 {
            assert!(
                parse_request_head(&src[..cut], 1)
                    .unwrap_err()
                    .is_incomplete()
            );
        }
        assert_eq!(parse_request_head(src, 1).unwrap().head_len, src.len() - 4);
    }

    #[test]
    fn refusals() {
        let cases: [(&[u8], SniffError); 5] = [
            (
                b"GET / HTTP/1.1\r\n\r\n",
                SniffError::NoTarget("no Host header"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                SniffError::Malformed("several Host headers"),
            ),
            (
                b"CONNECT node-a HTTP/1.1\r\n\r\n",
                SniffError::NoTarget("CONNECT without host:port"),
            ),
            (
                b"GET http://user@node-a/ HTTP/1.1\r\n\r\n",
                SniffError::Malformed("userinfo in request target"),
            ),
            (
                b"\x16\x03\x01\x00\x10",
                SniffError::Malformed("HTTP request head"),
            ),
        ];
        for (src, err) in cases {
            assert_eq!(parse_request_head(src, 1), Err(err), "{src:?}");
        }
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(
            parse_request_head(&long, 1),
            Err(SniffError::TooLarge { limit: MAX_HEAD })
        );
    }
}
