//! What the tests that run the `tunnel-server` binary share.

/// Fronts and meta server on ports the kernel picks, so that tests never collide.
pub(crate) const EPHEMERAL_FRONTS: [&str; 6] = [
    "--secure-port",
    "0",
    "--insecure-port",
    "0",
    "--meta-port",
    "0",
];
