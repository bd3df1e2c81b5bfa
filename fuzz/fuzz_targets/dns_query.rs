//! The embedded DNS responder on whatever a client sends: hickory's parse of the message, then
//! what the responder reads of it (opcode, question, class, type, EDNS). A message that parses
//! must get a response that parses back, is a response, carries the query's id and fits the
//! client's payload size.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Message, MessageType};
use hickory_server::server::Request;
use libfuzzer_sys::fuzz_target;
use tokio::sync::watch;
use tunnel_server::dns::{NodeRecords, Responder};

struct Target {
    runtime: tokio::runtime::Runtime,
    responder: Responder,
    _records: watch::Sender<Arc<NodeRecords>>,
}

fn target() -> &'static Target {
    static TARGET: OnceLock<Target> = OnceLock::new();
    TARGET.get_or_init(|| {
        let mut records = NodeRecords::new();
        records.insert("node-a", "10.96.0.7".parse().unwrap());
        records.insert("cloud-1", "fd00::10".parse().unwrap());
        let (tx, rx) = watch::channel(Arc::new(records));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // No upstream: names that are not nodes' are refused, nothing leaves the process.
        let responder = Responder::new(rx, &[]).unwrap();
        Target {
            runtime,
            responder,
            _records: tx,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let target = target();
    let response = target.runtime.block_on(target.responder.answer_udp(data));
    let src = SocketAddr::from(([127, 0, 0, 1], 0));
    let Ok(request) = Request::from_bytes(data.to_vec(), src, Protocol::Udp) else {
        assert!(response.is_none(), "an answer to a message that does not parse");
        return;
    };
    let response = response.expect("a response to every message that parses");
    let max = request.edns.as_ref().map_or(512, |e| e.max_payload().max(512));
    assert!(response.len() <= usize::from(max), "the response fits the payload size");
    let message = Message::from_vec(&response).expect("the response parses");
    assert_eq!(message.metadata.id, request.metadata.id);
    assert_eq!(message.metadata.message_type, MessageType::Response);
});
