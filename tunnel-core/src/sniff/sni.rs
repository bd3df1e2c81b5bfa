//! Server Name Indication from a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3), read from the
//! bytes a client sent first. The bytes are only looked at: the caller forwards them unchanged, so
//! TLS is never terminated.

use super::SniffError;

/// The largest ClientHello accepted, over all records: post-quantum key shares make hellos of
/// several KiB common, while anything past 16 KiB is not a browser, kubectl or apiserver.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// Most records a ClientHello may span. Real clients use one or two; a peer trickling
/// one-byte records would otherwise make every re-parse walk a long chain.
pub const MAX_RECORDS: usize = 8;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;

/// Reads the SNI host name from the start of a TLS connection.
///
/// Returns `Ok(Some(name))` (as sent, not validated as a node name), `Ok(None)` when the
/// ClientHello is complete and carries no SNI, [`SniffError::Incomplete`] when more bytes are
/// needed, and a final error for anything else.
pub fn server_name(src: &[u8]) -> Result<Option<String>, SniffError> {
    // The handshake message may span several records; reassemble at most MAX_CLIENT_HELLO bytes.
    let mut hello = Vec::new();
    let mut rest = src;
    let mut expected: Option<usize> = None;
    for _ in 0..MAX_RECORDS {
        if rest.len() < RECORD_HEADER {
            return Err(SniffError::Incomplete {
                needed: RECORD_HEADER - rest.len(),
            });
        }
        if rest[0] != CONTENT_HANDSHAKE || rest[1] != 3 {
            return Err(SniffError::WrongProtocol("a TLS handshake"));
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > (1 << 14) {
            return Err(SniffError::Malformed("TLS record length"));
        }
        let Some(fragment) = rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
            return Err(SniffError::Incomplete {
                needed: RECORD_HEADER + len - rest.len(),
            });
        };
        if hello.len() + fragment.len() > MAX_CLIENT_HELLO + 4 {
            return Err(SniffError::TooLarge {
                limit: MAX_CLIENT_HELLO,
            });
        }
        hello.extend_from_slice(fragment);
        rest = &rest[RECORD_HEADER + len..];
        if expected.is_none() && hello.len() >= 4 {
            if hello[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniffError::WrongProtocol("a TLS ClientHello"));
            }
            let body =
                usize::from(hello[1]) << 16 | usize::from(hello[2]) << 8 | usize::from(hello[3]);
            if body > MAX_CLIENT_HELLO {
                return Err(SniffError::TooLarge {
                    limit: MAX_CLIENT_HELLO,
                });
            }
            expected = Some(4 + body);
        }
        if let Some(total) = expected
            && hello.len() >= total
        {
            let name = parse_client_hello(&hello[4..total])?;
            return Ok(name.map(|n| String::from_utf8_lossy(n).into_owned()));
        }
    }
    Err(SniffError::Malformed(
        "ClientHello spread over too many records",
    ))
}

/// A bounds-checked reader over a complete handshake message: running out of bytes means the
/// message is malformed, never incomplete.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniffError> {
        if self.0.len() < n {
            return Err(SniffError::Malformed("ClientHello truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, SniffError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SniffError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec_u8(&mut self) -> Result<&'a [u8], SniffError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }
    fn vec_u16(&mut self) -> Result<&'a [u8], SniffError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

fn parse_client_hello(body: &[u8]) -> Result<Option<&[u8]>, SniffError> {
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    r.vec_u8()?; // legacy_session_id
    r.vec_u16()?; // cipher_suites
    r.vec_u8()?; // legacy_compression_methods
    if r.0.is_empty() {
        return Ok(None); // no extensions at all
    }
    let mut exts = Reader(r.vec_u16()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec_u16()?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        let mut list = Reader(Reader(data).vec_u16()?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec_u16()?;
            if name_type == NAME_TYPE_HOST {
                if name.is_empty() || std::str::from_utf8(name).is_err() {
                    return Err(SniffError::Malformed("SNI host name"));
                }
                return Ok(Some(name));
            }
        }
        return Ok(None);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls sends it, so the test covers a real peer's encoding.
    fn rustls_client_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_sni_from_a_real_client_hello_at_every_cut() {
        let hello = rustls_client_hello("node-a");
        for cut in 0..hello.len() {
            assert!(
                server_name(&hello[..cut]).unwrap_err().is_incomplete(),
                "{cut}"
            );
        }
        assert_eq!(server_name(&hello), Ok(Some("node-a".into())));
        // Trailing bytes (the client's next flight) do not matter.
        let mut more = hello.clone();
        more.extend_from_slice(b"\x17\x03\x03");
        assert_eq!(server_name(&more), Ok(Some("node-a".into())));
    }

    #[test]
    fn client_hello_split_over_two_records() {
        let hello = rustls_client_hello("edge-node-7.example");
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(server_name(&split), Ok(Some("edge-node-7.example".into())));
    }

    #[test]
    fn hello_to_an_ip_has_no_sni() {
        let hello = rustls_client_hello("10.0.0.5");
        assert_eq!(server_name(&hello), Ok(None));
    }

    #[test]
    fn other_protocols_and_garbage() {
        assert_eq!(
            server_name(b"GET / HTTP/1.1\r\n"),
            Err(SniffError::WrongProtocol("a TLS handshake"))
        );
        assert_eq!(
            server_name(&[22, 3, 1, 0, 0]),
            Err(SniffError::Malformed("TLS record length"))
        );
        // A complete handshake message that claims more extension bytes than it has.
        let mut bad = vec![22, 3, 1, 0, 47, 1, 0, 0, 43, 3, 3];
        bad.extend_from_slice(&[0; 32]);
        bad.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0, 0xff, 0xff]);
        assert_eq!(bad.len(), 5 + 47);
        assert_eq!(
            server_name(&bad),
            Err(SniffError::Malformed("ClientHello truncated"))
        );
    }

    #[test]
    fn hello_trickled_in_tiny_records_is_refused() {
        let hello = rustls_client_hello("node-a");
        let mut tiny = Vec::new();
        for b in &hello[5..] {
            tiny.extend_from_slice(&[22, 3, 1, 0, 1, *b]);
        }
        assert_eq!(
            server_name(&tiny),
            Err(SniffError::Malformed(
                "ClientHello spread over too many records"
            ))
        );
    }

    #[test]
    fn oversized_hello_is_refused_early() {
        let mut big = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        big.resize(5 + 0x4000, 0);
        assert_eq!(
            server_name(&big),
            Err(SniffError::TooLarge {
                limit: MAX_CLIENT_HELLO
            })
        );
    }
}
