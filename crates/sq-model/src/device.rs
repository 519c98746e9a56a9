//! Where a model runs: the CPU, or an NVIDIA GPU with the `cuda` feature.

use crate::{ModelError, Result};
use std::fmt;
use std::str::FromStr;

/// `cpu` (the default) or `cuda[:N]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// NVIDIA GPU number N (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device: expected cpu, cuda or cuda:N")),
        }
    }
}

/// Whether this build can run models on NVIDIA GPUs (the `cuda` feature).
pub const CUDA_BUILT_IN: bool = cfg!(feature = "cuda");

impl Device {
    /// Checks that the device can be used: always for the CPU; for a GPU, that CUDA support is
    /// built in and that the driver, the CUDA libraries and GPU N are there. The error says
    /// which is missing and what to do.
    pub fn check(&self) -> Result<()> {
        match *self {
            Device::Cpu => Ok(()),
            Device::Cuda(n) => cuda_check(n).map_err(|reason| ModelError::Device {
                device: self.to_string(),
                reason,
            }),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_check(_ordinal: usize) -> std::result::Result<(), String> {
    Err(
        "this build of smoothquant-rs has no CUDA support; rebuild it with `--features cuda` \
         (e.g. `cargo build --release -p sq-cli --features cuda`: no CUDA toolkit is needed to \
         build, the NVIDIA driver and CUDA libraries are loaded at run time), or use --device cpu"
            .into(),
    )
}

#[cfg(feature = "cuda")]
fn cuda_check(ordinal: usize) -> std::result::Result<(), String> {
    sq_kernels::cuda::CudaDevice::new(ordinal)
        .map(drop)
        .map_err(|e| match e {
            sq_kernels::KernelError::CudaUnavailable { reason } => {
                format!("{reason}; use --device cpu to run on the CPU")
            }
            other => other.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("CUDA".parse(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<Device>().unwrap_err();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert!(Device::Cpu.check().is_ok());
    }

    #[test]
    fn an_unusable_gpu_is_a_device_error() {
        // No machine has GPU 999; without the feature no GPU is usable at all.
        let err = Device::Cuda(999).check().unwrap_err();
        assert!(matches!(err, ModelError::Device { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.starts_with("device cuda:999: "), "{msg}");
        if !CUDA_BUILT_IN {
            assert!(msg.contains("--features cuda"), "{msg}");
        }
    }
}
