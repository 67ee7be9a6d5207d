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
    let device = match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => device,
        Ok(Err(e)) => return Err(Error::DeviceUnavailable(spec.to_string(), e.to_string())),
        Err(_) => return Err(Error::DeviceUnavailable(spec.to_string(), "the CUDA driver could not be loaded".into())),
    };
    let capability = match &device {
        Device::Cuda(d) => d.cuda_stream().context().compute_capability().ok(),
        _ => None,
    };
    let path = QuantizedProducts::for_device(capability, BUILT_FOR);
    if path == QuantizedProducts::Dmmv {
        // candle's switch is process-wide: one card it cannot serve sends every
        // card's products through DMMV.
        candle_core::quantized::cuda::set_force_dmmv(true);
        FORCED_DMMV.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!(device = spec, ?capability, built_for = BUILT_FOR, products = ?path, "CUDA device opened");
    Ok(device)
}

/// The compute capability candle's machine-code kernels were built for
/// (`scripts/build-cuda` sets it; `build.rs` rebuilds this crate when it changes).
#[cfg(feature = "cuda")]
const BUILT_FOR: Option<&str> = option_env!("CUDA_COMPUTE_CAP");

#[cfg(feature = "cuda")]
static FORCED_DMMV: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The kernels CUDA products go through in this process, as the CUDA devices
/// opened so far decided (`None` in a build without CUDA).
pub fn cuda_products() -> Option<QuantizedProducts> {
    #[cfg(feature = "cuda")]
    return Some(if FORCED_DMMV.load(std::sync::atomic::Ordering::Relaxed) {
        QuantizedProducts::Dmmv
    } else {
        QuantizedProducts::MachineCode
    });
    #[cfg(not(feature = "cuda"))]
    None
}

/// Which of candle's CUDA kernels multiply by quantized weights.
///
/// candle 0.11 has two sets. Its MMVQ and MMQ kernels are compiled into the binary as
/// machine code for the one architecture of `CUDA_COMPUTE_CAP` (sm_86 in
/// `scripts/build-cuda`), with no PTX beside it. On a card of another major
/// version they cannot launch, and candle does not check the launch: on an H200
/// (9.0) every product came back as garbage (`strata gpu-check`, 2026-12-04). Its
/// DMMV kernels (dequantize, then multiply in f32) ship as PTX, which the driver
/// compiles for any card. So a card the machine code cannot run on uses DMMV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizedProducts {
    /// candle's MMVQ/MMQ kernels (the machine code runs on this card).
    MachineCode,
    /// candle's PTX DMMV kernels.
    Dmmv,
}

impl QuantizedProducts {
    /// `capability` is the card's (major, minor); `built_for` the build's
    /// `CUDA_COMPUTE_CAP` (`86`, `90a`). Machine code for X.Y runs on X.Z with
    /// Z ≥ Y only; anything unknown takes the PTX path.
    pub fn for_device(capability: Option<(i32, i32)>, built_for: Option<&str>) -> Self {
        let built = built_for.and_then(|cap| {
            let digits: String = cap.chars().take_while(char::is_ascii_digit).collect();
            let n: i32 = digits.parse().ok()?;
            Some((n / 10, n % 10))
        });
        match (capability, built) {
            (Some((major, minor)), Some((built_major, built_minor)))
                if major == built_major && minor >= built_minor =>
            {
                Self::MachineCode
            }
            _ => Self::Dmmv,
        }
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
    fn machine_code_only_on_cards_it_runs_on() {
        use QuantizedProducts::*;
        assert_eq!(QuantizedProducts::for_device(Some((8, 6)), Some("86")), MachineCode, "3070, 3090");
        assert_eq!(QuantizedProducts::for_device(Some((8, 9)), Some("86")), MachineCode, "4090");
        assert_eq!(QuantizedProducts::for_device(Some((9, 0)), Some("86")), Dmmv, "H100, H200");
        assert_eq!(QuantizedProducts::for_device(Some((8, 0)), Some("86")), Dmmv, "A100");
        assert_eq!(QuantizedProducts::for_device(Some((9, 0)), Some("90a")), MachineCode);
        assert_eq!(QuantizedProducts::for_device(None, Some("86")), Dmmv);
        assert_eq!(QuantizedProducts::for_device(Some((8, 6)), None), Dmmv);
    }

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
