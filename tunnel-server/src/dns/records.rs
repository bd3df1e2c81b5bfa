//! The node records: which address each node name resolves to in cluster DNS.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Longest name DNS can carry (RFC 1035: 255 octets on the wire, 253 as text).
const MAX_NAME: usize = 253;
/// Longest label.
const MAX_LABEL: usize = 63;

/// Whether `name` is a valid DNS-1123 subdomain (what Kubernetes requires of a node name) that
/// DNS can also carry: lowercase letters, digits, `-` and `.`, labels of 1 to 63 characters
/// that start and end with a letter or digit, at most 253 characters in all.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            !bytes.is_empty()
                && bytes.len() <= MAX_LABEL
                && bytes.first().is_some_and(alnum)
                && bytes.last().is_some_and(alnum)
                && bytes.iter().all(|b| alnum(b) || *b == b'-')
        })
}

/// Whether `name` looks like a name of cluster DNS itself (`NAME.NAMESPACE.svc`, anything
/// under `cluster.local`): a Node or an agent certificate so named must not take it over for
/// every client of CoreDNS, whose `hosts` block answers before its `kubernetes` one.
pub fn is_cluster_name(name: &str) -> bool {
    name == "cluster.local"
        || name.ends_with(".cluster.local")
        || name.split('.').any(|l| l == "svc")
}

/// Node names and the addresses they resolve to. Names that are not valid DNS-1123 subdomains
/// never get in, so nothing written from here can break a hosts file or a resolver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRecords {
    by_name: BTreeMap<String, Vec<IpAddr>>,
}

impl NodeRecords {
    /// No records.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `ip` for `name`; returns false (and adds nothing) when `name` is not a valid
    /// DNS-1123 subdomain or is a cluster name ([`is_cluster_name`]).
    pub fn insert(&mut self, name: &str, ip: IpAddr) -> bool {
        if !is_dns1123_subdomain(name) || is_cluster_name(name) {
            return false;
        }
        let ips = self.by_name.entry(name.to_owned()).or_default();
        if let Err(at) = ips.binary_search(&ip) {
            ips.insert(at, ip);
        }
        true
    }

    /// The addresses of `name` (any case, with or without the root's trailing dot).
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self
                .by_name
                .get(&name.to_ascii_lowercase())
                .map(Vec::as_slice);
        }
        self.by_name.get(name).map(Vec::as_slice)
    }

    /// Each name, in order, with its addresses.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[IpAddr])> {
        self.by_name
            .iter()
            .map(|(name, ips)| (name.as_str(), ips.as_slice()))
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are no names.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The records as the hosts plugin of CoreDNS reads them: one `IP<TAB>name` line per
    /// address, the lines sorted, each ending in a newline. The same records give the same
    /// bytes on every replica, so replicas writing one ConfigMap never fight.
    pub fn render(&self) -> String {
        let mut lines: Vec<String> = self
            .by_name
            .iter()
            .flat_map(|(name, ips)| ips.iter().map(move |ip| format!("{ip}\t{name}\n")))
            .collect();
        lines.sort_unstable();
        lines.concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns1123_names() {
        for good in ["a", "edge-node-1", "node.example", "0abc", &"a".repeat(63)] {
            assert!(is_dns1123_subdomain(good), "{good}");
        }
        let long = ["a"; 127].join(".") + "bc";
        assert_eq!(long.len(), 255);
        for bad in [
            "",
            "Edge",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "a b",
            "a\tb",
            "ä",
            &"a".repeat(64),
            &long,
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    #[test]
    fn render_is_sorted_lines_whatever_the_insertion_order() {
        let mut a = NodeRecords::new();
        let mut b = NodeRecords::new();
        let entries = [
            ("node-b", "10.96.0.7"),
            ("node-a", "10.96.0.7"),
            ("cloud-1", "192.168.0.10"),
            ("cloud-1", "fd00::10"),
        ];
        for (name, ip) in entries {
            assert!(a.insert(name, ip.parse().unwrap()));
        }
        for (name, ip) in entries.iter().rev() {
            assert!(b.insert(name, ip.parse().unwrap()));
        }
        assert!(!a.insert("Bad_Name", "10.0.0.1".parse().unwrap()));
        for cluster in [
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "cluster.local",
            "x.cluster.local",
        ] {
            assert!(!a.insert(cluster, "10.0.0.1".parse().unwrap()), "{cluster}");
        }
        assert!(b.insert("ip-10-0-0-1.ec2.internal", "10.0.0.1".parse().unwrap()));
        b.by_name.remove("ip-10-0-0-1.ec2.internal");
        assert_eq!(a, b);
        assert_eq!(
            a.render(),
            "10.96.0.7\tnode-a\n10.96.0.7\tnode-b\n192.168.0.10\tcloud-1\nfd00::10\tcloud-1\n"
        );
        assert_eq!(
            a.lookup("NODE-A."),
            Some(&["10.96.0.7".parse().unwrap()][..])
        );
        assert_eq!(a.lookup("node-c"), None);
    }
}
