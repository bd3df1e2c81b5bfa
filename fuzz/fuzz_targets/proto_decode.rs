#![no_main]
//! Frames from a peer: decoding never panics, and a decoded stream-open validates or errors.

use libfuzzer_sys::fuzz_target;
use tunnel_core::proto::{self, MAX_CONTROL_LEN, MAX_OPEN_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok((msg, used)) = proto::decode_frame::<proto::StreamOpen>(data, MAX_OPEN_LEN) {
        assert!(used <= data.len());
        let _ = tunnel_core::OpenRequest::from_proto(msg);
    }
    if let Ok((_, used)) = proto::decode_frame::<proto::StreamOpenReply>(data, MAX_OPEN_LEN) {
        assert!(used <= data.len());
    }
    let _ = proto::decode_frame::<proto::Control>(data, MAX_CONTROL_LEN);
});
