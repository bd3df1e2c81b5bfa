#![no_main]
//! A stream of control frames from a peer, fed to both roles of the state machine with a
//! moving clock: errors are fine, panics and unbounded queues are not.

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tunnel_core::control::{Control, ControlConfig};
use tunnel_core::proto::{self, MAX_CONTROL_LEN};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut server = Control::server(start, ControlConfig::default());
    let mut agent = Control::agent(start, ControlConfig::default(), proto::Register::default());
    let mut rest = data;
    let mut now = start;
    while let Ok((msg, used)) = proto::decode_frame::<proto::Control>(rest, MAX_CONTROL_LEN) {
        rest = &rest[used..];
        now += Duration::from_millis(u64::from(used as u8) * 100);
        for c in [&mut server, &mut agent] {
            if c.handle_message(now, msg.clone()).is_ok() {
                let _ = c.handle_timeout(now);
            }
            let mut sent = 0;
            while c.poll_transmit().is_some() {
                sent += 1;
                assert!(sent <= 64, "outbox must stay bounded");
            }
            while c.poll_event().is_some() {}
        }
    }
});
