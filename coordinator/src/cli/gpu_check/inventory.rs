//! What the worker sees on this machine, asked of `strata-worker devices`: the same
//! detection a serving worker runs (CPU, GPUs through the CUDA driver, the memory
//! it would offer, its bandwidth benchmark), and the driver's free memory of a GPU
//! at one moment, read in a process of its own so that this one holds no context
//! on the GPU while it reads.

use std::process::Command;

use anyhow::Context;
use serde_json::Value;

use super::super::children::sibling_binary;
use crate::planner::format_bytes;

/// `strata-worker devices --device DEVICE --json`'s answer.
pub struct WorkerDevices {
    profile: Value,
    device: String,
}

impl WorkerDevices {
    /// Runs the detection, and the worker's bandwidth benchmark when `bench`.
    pub fn probe(device: &str, bench: bool) -> anyhow::Result<Self> {
        let worker = sibling_binary("strata-worker");
        let mut command = Command::new(&worker);
        command.args(["devices", "--device", device, "--json"]);
        if bench {
            command.arg("--bench");
        }
        let out = command.output().with_context(|| format!("cannot run {}", worker.display()))?;
        if !out.status.success() {
            // The worker's last line says why (`error: ...`); warnings may come before.
            let stderr = String::from_utf8_lossy(&out.stderr);
            let why = stderr.trim().lines().last().unwrap_or_default();
            anyhow::bail!("the worker cannot use {device}: {}", why.strip_prefix("error: ").unwrap_or(why));
        }
        let profile = serde_json::from_slice(&out.stdout).context("`strata-worker devices --json` printed no JSON")?;
        Ok(Self { profile, device: device.to_string() })
    }

    /// The GPU the device names, as the driver describes it.
    fn gpu(&self) -> Option<&Value> {
        let ordinal = strata_model::device::cuda_ordinal(&self.device)? as u64;
        self.profile["inventory"]["gpus"].as_array()?.iter().find(|g| g["ordinal"].as_u64() == Some(ordinal))
    }

    /// The device's memory in use now, by the driver (total less free); `None` for
    /// the CPU or where the driver does not say.
    pub fn gpu_memory_used(&self) -> Option<u64> {
        let gpu = self.gpu()?;
        Some(gpu["total_memory_bytes"].as_u64()?.saturating_sub(gpu["free_memory_bytes"].as_u64()?))
    }

    /// The memory bandwidth decode speed is compared with: a GPU's peak by the
    /// driver, else what the worker's benchmark measured on this CPU; with what it is.
    pub fn reference_bandwidth(&self) -> Option<(f64, &'static str)> {
        if let Some(peak) = self.gpu().and_then(|g| g["memory_bandwidth_bytes_per_second"].as_u64()) {
            return Some((peak as f64, "the card's peak"));
        }
        let measured = self.profile["bench"]["bytes_per_second"].as_f64().filter(|b| *b > 0.0)?;
        Some((measured, "what the worker's own benchmark reads"))
    }

    /// The report's lines: the machine, its GPUs (or why there are none), and what a
    /// worker on the device would offer.
    pub fn describe(&self) -> Vec<String> {
        let p = &self.profile;
        let cpu = &p["inventory"]["cpu"];
        let bytes = |v: &Value| format_bytes(v.as_u64().unwrap_or(0));
        let features: Vec<&str> = cpu["features"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let mut lines = vec![format!(
            "cpu      {}: {} physical / {} logical cores, {}; memory {}, {} available",
            cpu["name"].as_str().unwrap_or("?"),
            cpu["physical_cores"],
            cpu["logical_cores"],
            if features.is_empty() { "no vector extensions we use".to_string() } else { features.join(",") },
            bytes(&cpu["total_memory_bytes"]),
            bytes(&cpu["available_memory_bytes"]),
        )];
        for gpu in p["inventory"]["gpus"].as_array().into_iter().flatten() {
            let cc = &gpu["compute_capability"];
            let peak = gpu["memory_bandwidth_bytes_per_second"]
                .as_f64()
                .map(|b| format!(", {:.0} GB/s peak", b / 1e9))
                .unwrap_or_default();
            lines.push(format!(
                "cuda:{}   {}: compute {}.{}, {} ({} free){peak}",
                gpu["ordinal"],
                gpu["name"].as_str().unwrap_or("?"),
                cc[0],
                cc[1],
                bytes(&gpu["total_memory_bytes"]),
                gpu["free_memory_bytes"].as_u64().map_or("?".into(), format_bytes),
            ));
        }
        if let Some(why) = p["inventory"]["cuda_unavailable"].as_str() {
            lines.push(format!("gpus     none: {why}"));
        }
        let bench = match p["bench"]["bytes_per_second"].as_f64().filter(|b| *b > 0.0) {
            Some(b) => format!("reads {} weights at {:.1} GB/s", p["bench"]["dtype"].as_str().unwrap_or("?"), b / 1e9),
            None => "its bandwidth not measured".into(),
        };
        lines.push(format!(
            "worker   on {} ({}) would offer {} of {}; {bench}",
            p["device"]["device"].as_str().unwrap_or("?"),
            p["device"]["name"].as_str().unwrap_or("?"),
            bytes(&p["offer"]["offered_bytes"]),
            bytes(&p["device"]["total_memory_bytes"]),
        ));
        lines
    }
}
