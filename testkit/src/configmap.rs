//! A ConfigMap mounted as a directory, updated the way the kubelet updates it: the values go
//! into a new hidden timestamped directory, then the `..data` symlink is swapped atomically
//! (a rename over it); each key is a symlink `KEY -> ..data/KEY`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A kubelet-style ConfigMap volume in a temporary directory.
#[derive(Debug)]
pub struct ConfigMapDir {
    dir: tempfile::TempDir,
    generation: AtomicU64,
}

impl ConfigMapDir {
    /// A volume holding `values`.
    pub fn new(values: &[(&str, &str)]) -> Self {
        let this = Self {
            dir: tempfile::tempdir().expect("temp dir"),
            generation: AtomicU64::new(0),
        };
        this.write(values);
        this
    }

    /// The mount point (what `--config-dir` names).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces every key with `values`, atomically as the kubelet does.
    pub fn write(&self, values: &[(&str, &str)]) {
        let root = self.dir.path();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let data = format!("..2026_12_01_00_00_00.{generation}");
        std::fs::create_dir(root.join(&data)).expect("data dir");
        for (key, value) in values {
            std::fs::write(root.join(&data).join(key), value).expect("value");
        }
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&data, &tmp).expect("symlink");
        std::fs::rename(&tmp, root.join("..data")).expect("swap ..data");
        // Keys: a symlink each into ..data; keys no longer present go.
        for entry in std::fs::read_dir(root).expect("list").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // Older data directories go after the swap, as the kubelet removes them.
                if name.starts_with("..20") && name != data {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
                continue;
            }
            if !values.iter().any(|(k, _)| *k == name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        for (key, _) in values {
            let link = root.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(PathBuf::from("..data").join(key), &link)
                    .expect("key link");
            }
        }
    }
}
