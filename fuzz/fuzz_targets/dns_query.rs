//! The embedded DNS responder on whatever a client sends: hickory's parse of the message, then
//! what the responder reads of it (opcode, question, class, type, EDNS). A message that parses
//! must get exactly one response, which parses back, carries the query's id and fits the
//! client's payload size.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::Message;
use hickory_server::proto::rr::Record;
use hickory_server::proto::serialize::binary::BinEncoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use libfuzzer_sys::fuzz_target;
use tokio::sync::watch;
use tunnel_server::dns::{NodeRecords, Responder};

/// Encodes the response as the UDP server would, into a buffer the target reads.
#[derive(Clone)]
struct Capture {
    max: u16,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::new();
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(self.max);
        let info = response.destructive_emit(&mut encoder)?;
        self.sent.lock().unwrap().push(bytes);
        Ok(info)
    }
}

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
    let src = SocketAddr::from(([127, 0, 0, 1], 5353));
    let Ok(request) = Request::from_bytes(data.to_vec(), src, Protocol::Udp) else {
        return;
    };
    let target = target();
    let max = request
        .edns
        .as_ref()
        .map_or(512, |e| e.max_payload().max(512));
    let capture = Capture {
        max,
        sent: Arc::default(),
    };
    target.runtime.block_on(
        target
            .responder
            .handle_request::<_, TokioTime>(&request, capture.clone()),
    );
    let sent = capture.sent.lock().unwrap();
    assert_eq!(sent.len(), 1, "one response per query");
    assert!(sent[0].len() <= usize::from(max), "the response fits the payload size");
    let response = Message::from_vec(&sent[0]).expect("the response parses");
    assert_eq!(response.metadata.id, request.metadata.id);
});
