//! What a request's path names, and the decoding of its query.

use super::Kind;
use super::store::Key;

/// What a path names: a collection (no name) or an object.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) kind: Kind,
    /// `None`: every namespace (or a cluster-scoped kind).
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
}

impl Target {
    pub(super) fn parse(path: &str) -> Option<Self> {
        let rest = path.strip_prefix("/api/v1/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let valid = |s: &str| !s.is_empty();
        let (kind, namespace, name) = match parts.as_slice() {
            [plural] => (Kind::from_plural(plural)?, None, None),
            [plural, name] if valid(name) => {
                let kind = Kind::from_plural(plural).filter(|k| !k.namespaced())?;
                (kind, None, Some(*name))
            }
            ["namespaces", ns, plural] if valid(ns) => {
                let kind = Kind::from_plural(plural).filter(|k| k.namespaced())?;
                (kind, Some(*ns), None)
            }
            ["namespaces", ns, plural, name] if valid(ns) && valid(name) => {
                let kind = Kind::from_plural(plural).filter(|k| k.namespaced())?;
                (kind, Some(*ns), Some(*name))
            }
            _ => return None,
        };
        Some(Self {
            kind,
            namespace: namespace.map(percent_decode),
            name: name.map(percent_decode),
        })
    }

    pub(super) fn key(&self, name: &str) -> Key {
        Key::new(self.kind, self.namespace.as_deref(), name)
    }
}

/// The decoded `key=value` pairs of a path's query.
pub(super) fn query_pairs(path: &str) -> Vec<(String, String)> {
    let Some((_, query)) = path.split_once('?') else {
        return Vec::new();
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a `%` not
/// followed by two hex digits stays as it is.
fn form_decode(s: &str) -> String {
    percent_decode(&s.replace('+', " "))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |at: usize| bytes.get(at).and_then(|c| (*c as char).to_digit(16));
        if b == b'%'
            && let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2))
        {
            out.push(u8::try_from(hi * 16 + lo).expect("invariant: two hex digits make a byte"));
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_decode() {
        let t = Target::parse("/api/v1/namespaces/kube-system/services/x-svc").unwrap();
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (Kind::Service, Some("kube-system"), Some("x-svc"))
        );
        assert_eq!(Target::parse("/api/v1/nodes").unwrap().kind, Kind::Node);
        for bad in [
            "/api/v1/services/x",
            "/api/v1/namespaces/a/nodes",
            "/api/v1/pods",
            "/api/v1/",
            "/apis/x",
            "/api/v1/namespaces//configmaps",
        ] {
            assert!(Target::parse(bad).is_none(), "{bad}");
        }
        assert_eq!(
            query_pairs("/x?fieldSelector=metadata.name%3Dx+y&watch&bad=%zz%4"),
            [
                ("fieldSelector".to_owned(), "metadata.name=x y".to_owned()),
                ("watch".to_owned(), String::new()),
                ("bad".to_owned(), "%zz%4".to_owned()),
            ]
        );
    }
}
