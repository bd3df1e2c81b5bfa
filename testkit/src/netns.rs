//! Tests that run themselves again inside a network namespace of their own (`ip netns`, root),
//! so that their iptables rules touch nothing else on the machine. `.ci/run` installs iproute2
//! and iptables.

use tokio::process::Command;

/// Set in the copy of a test that runs inside the namespace.
const INSIDE: &str = "EDGE_TUNNEL_TEST_IN_NETNS";

/// Whether this process is the copy running inside the namespace.
pub fn inside() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Runs `program` with `args` and requires success (the tools need root).
pub async fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program} not runnable ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed (this test needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace however the test ends.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

/// Runs test `name` of module `module` (the caller's `module_path!()`) of the current test
/// binary again inside a new namespace (loopback up), requires that it ran and passed, and
/// returns what it printed.
pub async fn in_namespace(module: &str, name: &str) -> String {
    // libtest names a test by its path below the crate root.
    let name = match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{name}"),
        None => name.to_owned(),
    };
    let ns = Netns(format!("edge-tunnel-test-{}", std::process::id()));
    run("ip", &["netns", "add", &ns.0]).await;
    run(
        "ip",
        &["netns", "exec", &ns.0, "ip", "link", "set", "lo", "up"],
    )
    .await;
    let exe = std::env::current_exe().expect("test binary");
    let exe = exe.to_str().expect("utf-8 path");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, exe, "--exact", &name, "--nocapture"])
        .env(INSIDE, "1")
        .output()
        .await
        .expect("run the test inside the namespace");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "inside the namespace:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run:\n{text}"
    );
    text
}
