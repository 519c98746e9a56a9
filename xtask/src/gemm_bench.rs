//! `cargo xtask bench gemm`: filled in with the sq-kernels work (issue 5).

pub fn run(_threads: Option<usize>, _json: bool) -> anyhow::Result<()> {
    anyhow::bail!(
        "`cargo xtask bench gemm` will measure the machine's vpdpbusd and FMA peaks, then time the \
         INT8 and f32 GEMMs on 1x2048x2048, 16x2048x2048, 512x2048x2048, 512x1536x576 and \
         2048x2048x2048; the kernels it measures are not in the workspace yet"
    )
}
