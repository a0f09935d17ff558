//! [`SoftmaxKernels`] on the CPU.

use crate::backend::CpuBackend;
use crate::cpu::softmax as kernel;
use crate::ops::softmax::{SoftmaxKernels, SoftmaxKind};
use crate::{Result, Tensor};

impl SoftmaxKernels for CpuBackend {
    fn softmax(&self, x: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
        let h = x.dims().last().copied().unwrap_or(1);
        let v = x.cpu_f32("softmax", "x")?;
        let out = match kind {
            SoftmaxKind::Plain => kernel::softmax(&v, h, 1.0, |_| h),
            SoftmaxKind::Log => kernel::log_softmax(&v, h),
            // Row r of the flattened [BH·T, T] view is query position r mod T; it sees
            // keys 0..=t.
            SoftmaxKind::Causal { scale } => kernel::softmax(&v, h, scale, |r| r % h + 1),
        };
        Ok(Tensor::cpu_f32_from(out, x.shape()))
    }

    fn softmax_backward(&self, y: &Tensor, dy: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
        const OP: &str = "softmax_backward";
        let h = y.dims().last().copied().unwrap_or(1);
        let yv = y.cpu_f32(OP, "y")?;
        let d = dy.cpu_f32(OP, "dy")?;
        let out = match kind {
            SoftmaxKind::Plain => kernel::softmax_backward(&yv, &d, h, 1.0),
            SoftmaxKind::Log => kernel::log_softmax_backward(&yv, &d, h),
            SoftmaxKind::Causal { scale } => kernel::softmax_backward(&yv, &d, h, scale),
        };
        Ok(Tensor::cpu_f32_from(out, y.shape()))
    }
}
