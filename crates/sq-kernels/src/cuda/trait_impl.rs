//! [`Int8Gemm`] on the GPU through host slices: uploads, runs the GPU-resident API, downloads.

use super::ops::{DeviceBatched, DeviceBmmOut, GemmOut};
use super::{CudaDevice, GemmPath};
use crate::error::Result;
use crate::int8::{
    check_out_scale, validate_bmm, validate_gemm, ActScales, BatchedI8, BmmOutput, Int8Gemm,
    PackedInt8, PackedLayout,
};
use std::sync::Arc;

/// The [`Int8Gemm`] trait on a [`CudaDevice`]. Weights are packed on the host in the
/// row-major layout (like `reference`) and every call uploads its operands and downloads its
/// result: correct and exact, but dominated by PCIe copies. It exists so the GPU kernels answer
/// the same calls as the CPU backends (tests, tools); the model uses the GPU-resident API.
#[derive(Clone, Debug)]
pub struct CudaBackend {
    device: Arc<CudaDevice>,
    path: GemmPath,
}

impl CudaBackend {
    pub const NAME: &'static str = "cuda";

    /// The backend on GPU `ordinal` (see [`CudaDevice::new`] for the errors).
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(Self::with_device(CudaDevice::new(ordinal)?))
    }

    pub fn with_device(device: Arc<CudaDevice>) -> Self {
        Self::with_path(device, GemmPath::Auto)
    }

    /// A backend whose GEMMs compute the INT32 product on `path` (tests, benchmarks).
    pub fn with_path(device: Arc<CudaDevice>, path: GemmPath) -> Self {
        CudaBackend { device, path }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    fn weights<'w>(&self, op: &'static str, w: &'w PackedInt8) -> Result<&'w [i8]> {
        w.check_layout(op, Self::NAME, PackedLayout::RowMajor)?;
        Ok(w.row_major().expect("layout checked"))
    }

    #[allow(clippy::too_many_arguments)]
    fn run<T>(
        &self,
        op: &'static str,
        x_q: &[i8],
        m: usize,
        x_scales: Option<ActScales<'_>>,
        w: &PackedInt8,
        out: &mut [T],
        make_out: impl FnOnce(&mut super::CudaSlice<T>) -> GemmOut<'_>,
    ) -> Result<()>
    where
        T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
    {
        let wq = self.weights(op, w)?;
        let mut storage = [0.0f32; 1];
        validate_gemm(
            op,
            x_q.len(),
            m,
            w,
            x_scales.as_ref(),
            out.len(),
            &mut storage,
        )?;
        let d = &self.device;
        let dw = d.upload_weights(wq, w.n(), w.k(), w.scales(), w.bias())?;
        let da = d.upload_acts(x_q, m, w.k(), x_scales.unwrap_or(ActScales::PerTensor(1.0)))?;
        let mut dout = d.zeros::<T>(out.len())?;
        d.gemm_with(&da, &dw, make_out(&mut dout), self.path)?;
        d.download(&dout, out)
    }
}

impl Int8Gemm for CudaBackend {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn layout(&self) -> PackedLayout {
        PackedLayout::RowMajor
    }

    fn gemm_i32_out(&self, x_q: &[i8], m: usize, w: &PackedInt8, out: &mut [i32]) -> Result<()> {
        self.run("gemm_i32_out", x_q, m, None, w, out, |o| {
            GemmOut::I32(o.as_view_mut())
        })
    }

    fn gemm_f32_out(
        &self,
        x_q: &[i8],
        m: usize,
        x_scales: ActScales<'_>,
        w: &PackedInt8,
        out: &mut [f32],
    ) -> Result<()> {
        self.run("gemm_f32_out", x_q, m, Some(x_scales), w, out, |o| {
            GemmOut::F32(o.as_view_mut())
        })
    }

    fn gemm_i8_out(
        &self,
        x_q: &[i8],
        m: usize,
        x_scales: ActScales<'_>,
        w: &PackedInt8,
        out_scale: f32,
        out: &mut [i8],
    ) -> Result<()> {
        check_out_scale("gemm_i8_out", out_scale)?;
        self.run("gemm_i8_out", x_q, m, Some(x_scales), w, out, |o| {
            GemmOut::I8 {
                out: o.as_view_mut(),
                out_scale,
            }
        })
    }

    fn bmm(
        &self,
        a: BatchedI8<'_>,
        b: BatchedI8<'_>,
        b_transposed: bool,
        out: BmmOutput<'_>,
    ) -> Result<()> {
        validate_bmm("bmm", &a, &b, b_transposed, &out)?;
        let d = &self.device;
        let (da, db) = (d.upload(a.data)?, d.upload(b.data)?);
        let batched = |data, x: &BatchedI8<'_>| DeviceBatched {
            data,
            batch: x.batch,
            rows: x.rows,
            cols: x.cols,
            batch_stride: x.batch_stride,
            row_stride: x.row_stride,
        };
        let (a_dev, b_dev) = (
            batched(da.slice(..a.data.len()), &a),
            batched(db.slice(..b.data.len()), &b),
        );
        // Elements between the strided rows keep their values: upload the output as it is.
        match out {
            BmmOutput::I32 {
                data,
                batch_stride,
                row_stride,
            } => {
                let mut dout = d.upload(data)?;
                let len = data.len();
                d.bmm(
                    a_dev,
                    b_dev,
                    b_transposed,
                    DeviceBmmOut::I32 {
                        data: dout.slice_mut(..len),
                        batch_stride,
                        row_stride,
                    },
                )?;
                d.download(&dout, data)
            }
            BmmOutput::F32 {
                data,
                batch_stride,
                row_stride,
                scale,
            } => {
                let mut dout = d.upload(data)?;
                let len = data.len();
                d.bmm(
                    a_dev,
                    b_dev,
                    b_transposed,
                    DeviceBmmOut::F32 {
                        data: dout.slice_mut(..len),
                        batch_stride,
                        row_stride,
                        scale,
                    },
                )?;
                d.download(&dout, data)
            }
        }
    }
}
