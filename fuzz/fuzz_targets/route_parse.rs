#![no_main]
//! Authorities from Host headers and CONNECT lines, and ConfigMap port lists.

use libfuzzer_sys::fuzz_target;
use tunnel_core::PortSet;
use tunnel_core::route::parse_authority;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok((_, port)) = parse_authority(s, 10255) {
        assert!(port != 0);
    }
    if let Ok(set) = s.parse::<PortSet>() {
        let again: PortSet = set.to_string().parse().expect("a printed set parses");
        assert_eq!(again, set);
    }
});
