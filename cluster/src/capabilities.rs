//! What a fog node has to offer and how busy it is: CPU cores, memory, the GPUs
//! libtorch can see, and the current load. `Control.GetStatus` reports them; placement
//! of experts across nodes will read them from the membership view.
//!
//! Read from the OS where the OS tells (`/proc/meminfo`, `/proc/loadavg` on Linux) and
//! from libtorch for GPUs, so a node reports the devices its experts can actually use,
//! not the devices a driver lists. GPU names and memory come from `nvidia-smi` when it
//! is installed; without it they are unknown, never guessed.

use std::process::Command;

/// A node's hardware, probed once at start.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    pub cores: u32,
    pub memory_bytes: u64,
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    /// libtorch's CUDA device index.
    pub index: u32,
    /// Empty when unknown.
    pub name: String,
    pub memory_bytes: Option<u64>,
}

/// How busy a node is now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Runnable tasks averaged over the last minute, divided by the node's cores.
    pub cpu: f64,
    pub memory_available_bytes: u64,
}

impl Capabilities {
    pub fn probe() -> Capabilities {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let gpu_count = u32::try_from(tch::Cuda::device_count()).unwrap_or(0);
        let described = if gpu_count > 0 {
            nvidia_smi_gpus()
        } else {
            Vec::new()
        };
        Capabilities {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) * 1024,
            gpus: (0..gpu_count)
                .map(|index| {
                    let (name, memory_bytes) =
                        described.get(index as usize).cloned().unwrap_or_default();
                    Gpu {
                        index,
                        name,
                        memory_bytes,
                    }
                })
                .collect(),
        }
    }

    pub fn load(&self) -> Load {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        Load {
            cpu: load_1m(&loadavg).unwrap_or(0.0) / f64::from(self.cores.max(1)),
            memory_available_bytes: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0) * 1024,
        }
    }
}

/// A `/proc/meminfo` field in KiB (`MemTotal:  24576000 kB`).
fn meminfo_kib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The one-minute load average, the first field of `/proc/loadavg`.
fn load_1m(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

/// Names and memory of the NVIDIA GPUs, in CUDA's index order; empty without
/// `nvidia-smi`.
fn nvidia_smi_gpus() -> Vec<(String, Option<u64>)> {
    let Ok(output) = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output()
    else {
        return Vec::new();
    };
    if !output.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout))
}

/// Lines of `name, memory in MiB`.
fn parse_nvidia_smi(text: &str) -> Vec<(String, Option<u64>)> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (name, mib) = line.rsplit_once(',').unwrap_or((line, ""));
            let memory = mib.trim().parse::<u64>().ok().map(|m| m * 1024 * 1024);
            (name.trim().to_string(), memory)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_meminfo_and_loadavg() {
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(24_576_000));
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(20_000_000));
        assert_eq!(
            meminfo_kib(meminfo, "Mem"),
            None,
            "a prefix of a field is not the field"
        );
        assert_eq!(load_1m("1.52 0.90 0.50 2/300 12345\n"), Some(1.52));
        assert_eq!(load_1m(""), None);
    }

    #[test]
    fn reads_nvidia_smi_csv() {
        let gpus = parse_nvidia_smi("NVIDIA H200, 143771\nNVIDIA A2, [N/A]\n\n");
        assert_eq!(
            gpus,
            vec![
                ("NVIDIA H200".to_string(), Some(143_771 * 1024 * 1024)),
                ("NVIDIA A2".to_string(), None),
            ]
        );
    }

    #[test]
    fn this_machine_reports_itself() {
        let capabilities = Capabilities::probe();
        assert!(capabilities.cores >= 1);
        assert!(
            capabilities.memory_bytes > 0,
            "/proc/meminfo gives the memory"
        );
        assert_eq!(capabilities.gpus.len() as i64, tch::Cuda::device_count());
        let load = capabilities.load();
        assert!(load.cpu >= 0.0 && load.memory_available_bytes > 0);
    }
}
