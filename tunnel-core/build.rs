//! Generates the wire messages from `proto/tunnel.proto` with protox, so that a fresh machine needs
//! cargo alone (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tunnel.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Payload bytes stay `Bytes`: no copy between the wire and the copy loop.
        .bytes(".edgetunnel.v1.Chunk.data")
        // Small initial call buffers: see the codec's docs.
        .codec_path("crate::transport::grpc::codec::TunnelCodec")
        .compile_fds(fds)?;
    Ok(())
}
