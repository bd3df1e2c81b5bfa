//! Resident memory of a process, from `/proc`.

use anyhow::Context;

/// `VmRSS` of process `pid`, bytes.
pub(crate) fn rss_of(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("no VmRSS line")?;
    Ok(kib * 1024)
}

/// Raises this process's open-file limit (root may raise the hard limit too) so that tens of
/// thousands of idle connections fit; returns the limit in force.
pub(crate) fn raise_nofile(want: u64) -> u64 {
    use rlimit::Resource;
    if Resource::NOFILE.set(want, want).is_err() {
        let _ = rlimit::increase_nofile_limit(want);
    }
    Resource::NOFILE.get().map_or(1024, |(soft, _)| soft)
}
