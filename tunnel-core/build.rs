//! Generates the wire messages from `proto/tunnel.proto` with protox, so that a fresh machine needs
//! cargo alone (no system `protoc`). Two passes: the messages for `proto` (pure, no tonic), and
//! the gRPC service code for `transport::grpc`, which refers to those messages.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tunnel.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let messages = out.join("messages");
    std::fs::create_dir_all(&messages)?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .out_dir(&messages)
        // Payload bytes stay `Bytes`: no copy between the wire and the copy loop.
        .bytes(".edgetunnel.v1.Chunk.data")
        .compile_fds(fds.clone())?;

    let service = out.join("service");
    std::fs::create_dir_all(&service)?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .out_dir(&service)
        .extern_path(".edgetunnel.v1", "crate::proto")
        // Small initial call buffers: see the codec's docs.
        .codec_path("crate::transport::grpc::codec::TunnelCodec")
        .compile_fds(fds)?;
    Ok(())
}
