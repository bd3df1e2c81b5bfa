#![no_main]
//! Authorities from Host headers and CONNECT lines, ConfigMap port lists, and the server's
//! whole port configuration (edge-tunnel-server-cfg) as operators write it.

use libfuzzer_sys::fuzz_target;
use tunnel_core::route::config::{FixedPorts, KEYS};
use tunnel_core::route::parse_authority;
use tunnel_core::{PortConfig, PortSet};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok((_, port)) = parse_authority(s, 10255) {
        assert!(port != 0);
    }
    if let Ok(set) = s.parse::<PortSet>() {
        let again: PortSet = set.to_string().parse().expect("a printed set parses");
        assert_eq!(again, set);
    }
    // One value per line, for the keys in order.
    let values = KEYS.iter().copied().zip(s.split('\n'));
    if let Ok(config) = PortConfig::parse(values, FixedPorts::default()) {
        let printed = config.values();
        let again = PortConfig::parse(printed.iter().map(|(k, v)| (*k, v.as_str())), FixedPorts::default())
            .expect("a printed configuration parses");
        assert_eq!(again, config);
        let policy = config.policy();
        for port in policy.node.iter().chain(policy.loopback.iter()) {
            assert!(config.serves(port), "the agents are told only what is served");
        }
        assert!(policy.node.iter().all(|p| !policy.loopback.contains(p)));
        assert!(config.serves(10250) && config.serves(10255));
    }
});
