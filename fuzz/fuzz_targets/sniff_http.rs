#![no_main]
//! Bytes a client sends first on the HTTP front.

use libfuzzer_sys::fuzz_target;
use tunnel_core::sniff::http;

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = http::parse_request_head(data, 10255) {
        assert!(head.head_len <= data.len());
        assert!(head.target.port != 0);
    }
});
