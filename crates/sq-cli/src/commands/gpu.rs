//! `--device cuda[:N]` for the commands that run the model forward.

use anyhow::{bail, Result};
use sq_model::Device;

/// Whether `device` can run the model forward of `eval`, `generate` and `bench`.
pub fn require_forward(device: Device) -> Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(_) => bail!(
            "device {device}: the GPU is usable (the CUDA kernels are built in: INT8 GEMM, \
             quantization, attention BMM), but the model forward does not run on it yet; use \
             --device cpu"
        ),
    }
}
