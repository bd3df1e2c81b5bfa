#![no_main]
//! Bytes a client sends first on the TLS front.

use libfuzzer_sys::fuzz_target;
use tunnel_core::sniff::sni;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(name)) = sni::server_name(data) {
        assert!(!name.is_empty());
        let _ = tunnel_core::route::parse_host(&name);
    }
});
