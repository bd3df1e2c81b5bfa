//! Generates the wire messages from `proto/tunnel.proto` with protox, so that a fresh machine needs
//! cargo alone (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tunnel.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    // The gRPC service stubs are switched on by the gRPC transport; the QUIC transport needs the
    // messages only.
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_fds(fds)?;
    Ok(())
}
