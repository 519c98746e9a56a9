//! The GPU GEMM benchmark behind `cargo xtask bench gemm --device cuda`: INT8 tensor-core
//! throughput next to FP16 cuBLAS on the same shapes, in the same run.
//!
//! For each `(m, n, k)` it times, with CUDA events on the device's stream:
//!
//! - **INT8 GEMM**: the INT32 product alone (`X · Wᵀ`, INT8 operands; cuBLASLt for `m > 16`,
//!   our `__dp4a` kernel below), in TOPS (`2·m·n·k` operations) and as a share of the GPU's
//!   dense INT8 peak;
//! - **W8A8 Linear**: what a SmoothQuant Linear costs end to end on the GPU, from f16
//!   activations to f16 outputs: per-token quantization, the INT8 product and the fused
//!   dequantize + bias epilogue;
//! - **FP16 GEMM**: cuBLAS `X · Wᵀ` in f16 with FP32 accumulation (the baseline), in TFLOPS and
//!   as a share of the dense FP16 peak.
//!
//! Peaks come from NVIDIA's datasheets (dense, no sparsity) for the GPUs we know by name;
//! others print no percentage.

use super::ops::{DeviceActQuant, GemmOut};
use super::CudaDevice;
use crate::bench::{json_number, json_string};
use crate::error::Result;
use crate::WeightScales;
use cudarc::driver::sys::CUevent_flags;
use half::f16;

/// Square shapes and the Linears of LLaMA-7B (hidden 4096, MLP 11008) and SmolLM2-135M
/// (hidden 576, MLP 1536) at prefill (2048 tokens) and decode (1 and 16 tokens).
pub const SHAPES: [(usize, usize, usize); 14] = [
    (4096, 4096, 4096),
    (8192, 8192, 8192),
    (2048, 4096, 4096),
    (2048, 11008, 4096),
    (2048, 4096, 11008),
    (2048, 12288, 4096),
    (2048, 1536, 576),
    (2048, 576, 1536),
    (1, 4096, 4096),
    (1, 11008, 4096),
    (1, 4096, 11008),
    (16, 4096, 4096),
    (16, 11008, 4096),
    (1, 1536, 576),
];

/// Dense (no sparsity) tensor-core peaks `(INT8 TOPS, FP16 TFLOPS with FP32 accumulation)` for
/// GPUs recognized by name; the first matching entry wins.
const PEAKS: [(&str, f64, f64); 13] = [
    ("H100 PCIe", 1513.0, 756.0),
    ("H100 NVL", 1671.0, 835.0),
    ("H100", 1979.0, 989.0),
    ("H200", 1979.0, 989.0),
    ("GH200", 1979.0, 989.0),
    ("H800", 1979.0, 989.0),
    ("A100", 624.0, 312.0),
    ("L40S", 733.0, 362.0),
    ("L40", 362.0, 181.0),
    ("L4", 242.5, 121.0),
    ("RTX 4090", 660.6, 165.2),
    ("A10", 250.0, 125.0),
    ("T4", 130.0, 65.0),
];

/// `(INT8 TOPS, FP16 TFLOPS)` dense peaks of the GPU called `name`, when known.
pub fn peaks_for(name: &str) -> Option<(f64, f64)> {
    PEAKS
        .iter()
        .find(|(key, _, _)| name.contains(key))
        .map(|&(_, i8, f16)| (i8, f16))
}

/// One shape's results.
#[derive(Clone, Debug)]
pub struct GpuGemmResult {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The INT32 product alone.
    pub int8_tops: f64,
    pub pct_of_int8_peak: Option<f64>,
    /// Quantize + product + dequantize epilogue, f16 in and out.
    pub w8a8_tops: f64,
    pub fp16_tflops: f64,
    pub pct_of_fp16_peak: Option<f64>,
    /// INT8 product over FP16 GEMM.
    pub speedup_vs_fp16: f64,
    /// W8A8 Linear over FP16 GEMM.
    pub w8a8_speedup_vs_fp16: f64,
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct GpuGemmReport {
    pub device: String,
    pub compute_capability: (i32, i32),
    pub sm_count: usize,
    pub peak_int8_tops: Option<f64>,
    pub peak_fp16_tflops: Option<f64>,
    pub gemm: Vec<GpuGemmResult>,
}

/// Seconds per call of `f`: warm-up, then enough calls for about `target_s` of GPU time,
/// timed with events around the whole batch.
fn time_per_call(d: &CudaDevice, target_s: f64, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let err = |e| super::cuda_err("bench timing", e);
    let mut run = |iters: usize| -> Result<f64> {
        let start = d.stream().record_event(flags).map_err(err)?;
        for _ in 0..iters {
            f()?;
        }
        let end = d.stream().record_event(flags).map_err(err)?;
        end.synchronize().map_err(err)?;
        Ok(start.elapsed_ms(&end).map_err(err)? as f64 / 1e3)
    };
    run(3)?;
    let once = run(1)?.max(1e-7);
    let iters = ((target_s / once) as usize).clamp(5, 2000);
    Ok(run(iters)? / iters as f64)
}

fn pseudo_random_i8(len: usize, seed: u64) -> Vec<i8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 56) as u8 as i8
        })
        .collect()
}

/// Times one shape.
pub fn bench_shape(d: &CudaDevice, m: usize, n: usize, k: usize) -> Result<GpuGemmResult> {
    let peaks = peaks_for(d.name());
    let target_s = 0.25;
    let w_q = pseudo_random_i8(n * k, 1);
    let dw = d.upload_weights(&w_q, n, k, &WeightScales::PerTensor(0.01), None)?;
    let x_f16: Vec<f16> = pseudo_random_i8(m * k, 2)
        .into_iter()
        .map(|v| f16::from_f32(v as f32 / 64.0))
        .collect();
    let w_f16: Vec<f16> = w_q
        .iter()
        .map(|&v| f16::from_f32(v as f32 / 64.0))
        .collect();
    let dx = d.upload(&x_f16)?;
    let dwf = d.upload(&w_f16)?;
    let mut dy = d.zeros::<f16>(m * n)?;
    let acts = d.quantize(&dx, m, k, DeviceActQuant::Token, None)?;

    let int8_s = time_per_call(d, target_s, || {
        d.product(&acts, &dw, super::GemmPath::Auto).map(drop)
    })?;
    let w8a8_s = time_per_call(d, target_s, || {
        let a = d.quantize(&dx, m, k, DeviceActQuant::Token, None)?;
        d.gemm(&a, &dw, GemmOut::F16(dy.as_view_mut()))
    })?;
    let fp16_s = time_per_call(d, target_s, || d.hgemm(&dx, m, &dwf, n, k, &mut dy))?;
    let ops = 2.0 * m as f64 * n as f64 * k as f64;
    let int8_tops = ops / int8_s / 1e12;
    let fp16_tflops = ops / fp16_s / 1e12;
    Ok(GpuGemmResult {
        m,
        n,
        k,
        int8_tops,
        pct_of_int8_peak: peaks.map(|(p, _)| 100.0 * int8_tops / p),
        w8a8_tops: ops / w8a8_s / 1e12,
        fp16_tflops,
        pct_of_fp16_peak: peaks.map(|(_, p)| 100.0 * fp16_tflops / p),
        speedup_vs_fp16: fp16_s / int8_s,
        w8a8_speedup_vs_fp16: fp16_s / w8a8_s,
    })
}

/// Runs [`SHAPES`] (or `shapes`) on `d`.
pub fn run_gemm_suite(
    d: &CudaDevice,
    shapes: Option<&[(usize, usize, usize)]>,
) -> Result<GpuGemmReport> {
    let shapes = shapes.unwrap_or(&SHAPES);
    let mut gemm = Vec::with_capacity(shapes.len());
    for &(m, n, k) in shapes {
        gemm.push(bench_shape(d, m, n, k)?);
    }
    let peaks = peaks_for(d.name());
    Ok(GpuGemmReport {
        device: d.name().to_string(),
        compute_capability: d.compute_capability(),
        sm_count: d.sm_count(),
        peak_int8_tops: peaks.map(|p| p.0),
        peak_fp16_tflops: peaks.map(|p| p.1),
        gemm,
    })
}

fn opt_number(v: Option<f64>) -> String {
    v.map_or_else(|| "null".into(), json_number)
}

impl GpuGemmReport {
    /// One JSON object: `device`, `compute_capability`, `sm_count`, `peak_int8_tops`,
    /// `peak_fp16_tflops`, `gemm: [{m, n, k, int8_tops, pct_of_int8_peak, w8a8_tops,
    /// fp16_tflops, pct_of_fp16_peak, speedup_vs_fp16, w8a8_speedup_vs_fp16}]`.
    pub fn to_json(&self) -> String {
        let rows: Vec<String> = self
            .gemm
            .iter()
            .map(|g| {
                format!(
                    "{{\"m\":{},\"n\":{},\"k\":{},\"int8_tops\":{},\"pct_of_int8_peak\":{},\"w8a8_tops\":{},\"fp16_tflops\":{},\"pct_of_fp16_peak\":{},\"speedup_vs_fp16\":{},\"w8a8_speedup_vs_fp16\":{}}}",
                    g.m,
                    g.n,
                    g.k,
                    json_number(g.int8_tops),
                    opt_number(g.pct_of_int8_peak),
                    json_number(g.w8a8_tops),
                    json_number(g.fp16_tflops),
                    opt_number(g.pct_of_fp16_peak),
                    json_number(g.speedup_vs_fp16),
                    json_number(g.w8a8_speedup_vs_fp16)
                )
            })
            .collect();
        format!(
            "{{\"device\":{},\"compute_capability\":\"{}.{}\",\"sm_count\":{},\"peak_int8_tops\":{},\"peak_fp16_tflops\":{},\"gemm\":[{}]}}",
            json_string(&self.device),
            self.compute_capability.0,
            self.compute_capability.1,
            self.sm_count,
            opt_number(self.peak_int8_tops),
            opt_number(self.peak_fp16_tflops),
            rows.join(",")
        )
    }

    /// A readable table.
    pub fn to_table(&self) -> String {
        let pct = |v: Option<f64>| v.map_or_else(|| "-".into(), |p| format!("{p:.1}%"));
        let mut s = format!(
            "device: {} (sm_{}{}, {} SMs)\ndense peaks: INT8 {} TOPS, FP16 {} TFLOPS\n\n",
            self.device,
            self.compute_capability.0,
            self.compute_capability.1,
            self.sm_count,
            self.peak_int8_tops
                .map_or_else(|| "unknown".into(), |v| format!("{v:.0}")),
            self.peak_fp16_tflops
                .map_or_else(|| "unknown".into(), |v| format!("{v:.0}"))
        );
        s.push_str(&format!(
            "{:>5} {:>6} {:>6} | {:>9} {:>7} | {:>9} | {:>10} {:>7} | {:>8} {:>9}\n",
            "m",
            "n",
            "k",
            "INT8 TOPS",
            "% peak",
            "W8A8 TOPS",
            "FP16 TFLOPS",
            "% peak",
            "INT8/FP16",
            "W8A8/FP16"
        ));
        for g in &self.gemm {
            s.push_str(&format!(
                "{:>5} {:>6} {:>6} | {:>9.1} {:>7} | {:>9.1} | {:>10.1} {:>7} | {:>8.2}x {:>8.2}x\n",
                g.m,
                g.n,
                g.k,
                g.int8_tops,
                pct(g.pct_of_int8_peak),
                g.w8a8_tops,
                g.fp16_tflops,
                pct(g.pct_of_fp16_peak),
                g.speedup_vs_fp16,
                g.w8a8_speedup_vs_fp16
            ));
        }
        s
    }
}
