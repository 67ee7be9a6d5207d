//! Choosing the compute device from a user's `cpu` / `cuda:N`.

use candle_core::Device;

use crate::error::{Error, Result};

/// Parses `cpu`, `cuda` or `cuda:N` and opens the device.
pub fn parse_device(spec: &str) -> Result<Device> {
    if spec.trim() == "cpu" {
        return Ok(Device::Cpu);
    }
    match cuda_ordinal(spec) {
        Some(ordinal) => open_cuda(spec, ordinal),
        None => Err(Error::UnknownDevice(spec.to_string())),
    }
}

/// The CUDA ordinal a `--device` names (`cuda` is `cuda:0`); `None` for the CPU
/// or anything that is not a CUDA device.
pub fn cuda_ordinal(spec: &str) -> Option<usize> {
    match spec.trim() {
        "cuda" => Some(0),
        s => s.strip_prefix("cuda:")?.parse().ok(),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize) -> Result<Device> {
    // cudarc panics when no driver library can be loaded; turn that into an error.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(Error::DeviceUnavailable(spec.to_string(), e.to_string())),
        Err(_) => Err(Error::DeviceUnavailable(spec.to_string(), "the CUDA driver could not be loaded".into())),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device> {
    Err(Error::DeviceUnavailable(
        spec.to_string(),
        "this build has no CUDA support (rebuild with `--features cuda`)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_ordinals() {
        assert_eq!(cuda_ordinal("cpu"), None);
        assert_eq!(cuda_ordinal("cuda"), Some(0));
        assert_eq!(cuda_ordinal(" cuda:3 "), Some(3));
        assert_eq!(cuda_ordinal("cuda:x"), None);
    }

    #[test]
    fn parses_cpu_and_rejects_nonsense() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        assert!(matches!(parse_device("tpu:0"), Err(Error::UnknownDevice(_))));
        assert!(matches!(parse_device("cuda:x"), Err(Error::UnknownDevice(_))));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
