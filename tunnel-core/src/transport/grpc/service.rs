//! The gRPC client and server of the `Tunnel` service, generated from the schema (`build.rs`).
//! Public for tools and tests that speak the wire protocol directly.
#![allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]

include!(concat!(env!("OUT_DIR"), "/service/edgetunnel.v1.rs"));
