//! Times single GEMM calls for tuning the blocking: `kernel_probe [cold:][f32:]MxNxK ...` (best
//! and median of many calls, on rayon's default pool; set `RAYON_NUM_THREADS`). The weights are
//! hot (one copy) unless `cold:` rotates through enough copies to stream them from DRAM, as
//! decode does.

use sq_kernels::bench::{measure, peak_f32_gflops, peak_int8_gops};
use sq_kernels::{f32_gemm, pack_f32, select_backend, ActScales, WeightScales};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = select_backend()?;
    let threads = rayon::current_num_threads();
    let peak_i8 = peak_int8_gops(threads).unwrap_or(f64::NAN);
    let peak_f32 = peak_f32_gflops(threads).unwrap_or(f64::NAN);
    println!(
        "backend {} threads {threads}: peaks {peak_i8:.1} INT8 GOPS, {peak_f32:.1} f32 GFLOPS",
        backend.name()
    );
    for arg in std::env::args().skip(1) {
        let (cold, rest) = match arg.strip_prefix("cold:") {
            Some(s) => (true, s),
            None => (false, arg.as_str()),
        };
        let (is_f32, shape) = match rest.strip_prefix("f32:") {
            Some(s) => (true, s),
            None => (false, rest),
        };
        let dims: Vec<usize> = shape.split('x').map(str::parse).collect::<Result<_, _>>()?;
        let [m, n, k] = dims[..] else {
            return Err(format!("expected [f32:]MxNxK, got {arg}").into());
        };
        let x: Vec<i8> = (0..m * k).map(|i| (i * 7 % 251) as i8).collect();
        let w: Vec<i8> = (0..n * k).map(|i| (i * 13 % 253) as i8).collect();
        let mut out = vec![0f32; m * n];
        let time = Duration::from_millis(700);
        let (t, peak) = if is_f32 {
            let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
            let copies = if cold {
                (sq_kernels::bench::cold_bytes() / (n * k * 4)).max(1)
            } else {
                1
            };
            let packed = (0..copies)
                .map(|_| pack_f32(&wf, n, k))
                .collect::<Result<Vec<_>, _>>()?;
            let mut idx = 0;
            let t = measure(time, 10, || {
                idx = (idx + 1) % copies;
                f32_gemm(&xf, m, &packed[idx], None, &mut out).expect("valid shapes")
            });
            (t, peak_f32)
        } else {
            let copies = if cold {
                (sq_kernels::bench::cold_bytes() / (n * k)).max(1)
            } else {
                1
            };
            let packed = (0..copies)
                .map(|_| backend.pack_weights(&w, n, k, WeightScales::PerTensor(0.1), None))
                .collect::<Result<Vec<_>, _>>()?;
            let scales = vec![0.01f32; m];
            let mut idx = 0;
            let t = measure(time, 10, || {
                idx = (idx + 1) % copies;
                backend
                    .gemm_f32_out(&x, m, ActScales::PerToken(&scales), &packed[idx], &mut out)
                    .expect("valid shapes")
            });
            (t, peak_i8)
        };
        let rate = 2.0 * (m * n * k) as f64 / t.best_s / 1e9;
        let weight_bytes = (n * k * if is_f32 { 4 } else { 1 }) as f64;
        println!(
            "{arg}: best {:.3} ms = {rate:.1} G/s ({:.1}% of peak, weights {:.1} GB/s), median {:.3} ms",
            t.best_s * 1e3,
            100.0 * rate / peak,
            weight_bytes / t.best_s / 1e9,
            t.median_s * 1e3
        );
    }
    Ok(())
}
