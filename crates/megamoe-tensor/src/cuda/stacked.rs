//! The stacked projections (`matmul_stacked`, its input and weight gradients) on cuBLAS:
//! one GEMM over all the weights — in bf16-matmul mode over their bf16 copies, which the
//! weight cache lays out back to back for weights registered one after the other
//! (`weights.rs`, [`CudaBackend::bf16_joint`]; unregistered weights are cast and stacked
//! by one `cat`), in f32 where the weights are adjacent views of one buffer; the weight
//! gradients when they are adjacent views of one buffer (a model's flat gradients) — else
//! one GEMM per weight reading and writing its column block of the `[M, Σ N_i]` operand in
//! place through the leading dimension (no copy).
//!
//! bf16 rounding: in bf16-activation mode the one input-gradient GEMM accumulates the
//! `K = Σ N_i` products in f32 and rounds once, where the per-weight form rounds the bf16
//! result after each weight's product (so the two differ by bf16 rounding, each
//! deterministic). `MEGAMOE_CUDA_QKV=unfused` (read when the backend opens) or
//! [`CudaBackend::set_joint_projections`] forces the per-weight GEMMs, for A/B timing.

use std::sync::atomic::Ordering;

use megamoe_cuda::Operand;

use super::matmul::{elem, operand};
use super::{dev, CudaBackend};
use crate::ops::stacked::{blocks, StackedKernels};
use crate::{DType, Result, Tensor};

/// The initial [`CudaBackend::set_joint_projections`]: off when the environment sets
/// `MEGAMOE_CUDA_QKV=unfused`.
pub(crate) fn joint_from_env() -> bool {
    std::env::var("MEGAMOE_CUDA_QKV").as_deref() != Ok("unfused")
}

impl CudaBackend {
    /// With `on` (the default unless `MEGAMOE_CUDA_QKV=unfused` was set when the backend
    /// opened), stacked projections run as one GEMM where their operands lie back to back
    /// (see the module doc); off, always one GEMM per weight (the same math; in bf16 the
    /// input gradient rounds after each weight).
    pub fn set_joint_projections(&self, on: bool) {
        self.joint_projections.store(on, Ordering::Relaxed);
    }

    fn joint_allowed(&self) -> bool {
        self.joint_projections.load(Ordering::Relaxed)
    }

    /// The weights `ws` as one `[Σ N_i, K]` GEMM operand: in bf16-matmul mode their joint
    /// bf16 copies, or — weights not registered so (weight copies off, weights outside a
    /// training step) — their casts stacked by one `cat`, so the product is the same one
    /// GEMM on the same bf16 operand either way (the same bits with or without weight
    /// copies); otherwise the tensors themselves when they are adjacent views of one
    /// buffer. `None`: one GEMM per weight.
    fn stacked_weights(&self, ws: &[&Tensor]) -> Result<Option<Tensor>> {
        if !self.joint_allowed() {
            return Ok(None);
        }
        if self.bf16_matmul() && ws.iter().any(|w| w.dtype() != DType::BF16) {
            if let Some(joint) = self.bf16_joint(ws)? {
                return Ok(Some(joint));
            }
            let casts = ws
                .iter()
                .map(|w| match w.dtype() {
                    DType::BF16 => Ok((*w).clone()),
                    _ => self.bf16_operand(w),
                })
                .collect::<Result<Vec<_>>>()?;
            let casts: Vec<&Tensor> = casts.iter().collect();
            return Ok(Some(Tensor::cat(&casts, 0)?));
        }
        let rows = ws.iter().map(|w| w.dims()[0]).sum::<usize>();
        Ok(Tensor::joined(ws, [rows, ws[0].dims()[1]]))
    }
}

impl StackedKernels for CudaBackend {
    fn matmul_stacked(&self, x: &Tensor, ws: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "matmul_stacked";
        let (m, k) = x.dims2()?;
        let n: usize = ws.iter().map(|w| w.dims()[0]).sum();
        if m == 0 || k == 0 || n == 0 {
            return crate::ops::stacked::stacked_forward(x, ws);
        }
        let dtype = self.product_dtype(false);
        if let Some(w) = self.stacked_weights(ws)? {
            let (x, w) = self.gemm_pair(x, &w)?;
            let (xd, wd) = (dev(OP, &x)?, dev(OP, &w)?);
            let e = self.engine(OP)?;
            let (t, d) = self.empty(&e, [m, n].into(), dtype)?;
            let (oa, ob) = (
                operand(&x, xd.ptr, false, k, 0),
                operand(&w, wd.ptr, true, k, 0),
            );
            self.gemm(&e, OP, (m, n, k), oa, ob, (d.ptr, elem(dtype)), 0, 1, 0.0)?;
            return Ok(t);
        }
        let pairs = ws
            .iter()
            .map(|w| self.gemm_pair(x, w))
            .collect::<Result<Vec<_>>>()?;
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [m, n].into(), dtype)?;
        for ((x, w), (col, ni)) in pairs.iter().zip(blocks(ws)) {
            let (xd, wd) = (dev(OP, x)?, dev(OP, w)?);
            let oa = operand(x, xd.ptr, false, k, 0);
            let ob = operand(w, wd.ptr, true, k, 0);
            // column block `col..col + ni` of the [m, n] output: leading dimension n
            let c = Operand::dense(
                d.ptr + (col * dtype.size_in_bytes()) as u64,
                elem(dtype),
                n,
                0,
            );
            self.ck(OP, e.gpu.gemm(m, ni, k, oa, ob, c, 1, 1.0, 0.0))?;
        }
        Ok(t)
    }

    fn matmul_stacked_input_grad(&self, d_y: &Tensor, ws: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "matmul_stacked_input_grad";
        let (m, n) = d_y.dims2()?;
        let k = ws[0].dims()[1];
        if m == 0 || k == 0 || ws.iter().any(|w| w.dims()[0] == 0) {
            return crate::ops::stacked::stacked_input_grad(d_y, ws);
        }
        let dtype = self.product_dtype(false);
        if let Some(w) = self.stacked_weights(ws)? {
            let (g, w) = self.gemm_pair(d_y, &w)?;
            let (gd, wd) = (dev(OP, &g)?, dev(OP, &w)?);
            let e = self.engine(OP)?;
            let (t, d) = self.empty(&e, [m, k].into(), dtype)?;
            let (oa, ob) = (
                operand(&g, gd.ptr, false, n, 0),
                operand(&w, wd.ptr, false, k, 0),
            );
            self.gemm(&e, OP, (m, k, n), oa, ob, (d.ptr, elem(dtype)), 0, 1, 0.0)?;
            return Ok(t);
        }
        let pairs = ws
            .iter()
            .map(|w| self.gemm_pair(d_y, w))
            .collect::<Result<Vec<_>>>()?;
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [m, k].into(), dtype)?;
        for (i, ((g, w), (col, ni))) in pairs.iter().zip(blocks(ws)).enumerate() {
            let (gd, wd) = (dev(OP, g)?, dev(OP, w)?);
            // column block `col..col + ni` of d_y: leading dimension n
            let oa = operand(
                g,
                gd.ptr + (col * g.dtype().size_in_bytes()) as u64,
                false,
                n,
                0,
            );
            let ob = operand(w, wd.ptr, false, k, 0);
            let beta = if i == 0 { 0.0 } else { 1.0 };
            self.gemm(&e, OP, (m, k, ni), oa, ob, (d.ptr, elem(dtype)), 0, 1, beta)?;
        }
        Ok(t)
    }

    fn matmul_stacked_wgrad_acc(
        &self,
        gs: &mut [&mut Tensor],
        d_y: &Tensor,
        x: &Tensor,
    ) -> Result<()> {
        const OP: &str = "matmul_stacked_wgrad_acc";
        let (m, n) = d_y.dims2()?;
        let k = x.dims()[1];
        if m == 0 || k == 0 || gs.iter().any(|g| g.dims()[0] == 0) {
            return crate::ops::stacked::stacked_wgrad_acc(gs, d_y, x);
        }
        // Deferred zeros (each gradient's first contribution of a step) are overwritten.
        let betas: Vec<f32> = gs
            .iter()
            .map(|g| if g.take_deferred() { 0.0 } else { 1.0 })
            .collect();
        let (dy, x) = self.gemm_pair(d_y, x)?;
        let (dd, xd) = (dev(OP, &dy)?, dev(OP, &x)?);
        let ob = operand(&x, xd.ptr, false, k, 0);
        let refs: Vec<&Tensor> = gs.iter().map(|g| &**g).collect();
        let cols = blocks(&refs);
        let same_beta = betas.iter().all(|&b| b == betas[0]);
        let joint = Tensor::joined(&refs, [n, k]).filter(|j| {
            same_beta && self.joint_allowed() && j.is_write_through() && j.dtype() == DType::F32
        });
        drop(refs);
        if let Some(mut joint) = joint {
            // one [Σ N_i, K] gradient: written where it is (a write-through view)
            let c = self.acc_target(OP, &mut joint)?;
            let e = self.engine(OP)?;
            let oa = operand(&dy, dd.ptr, true, n, 0);
            return self.gemm(&e, OP, (n, k, m), oa, ob, c, 0, 1, betas[0]);
        }
        for ((g, (col, ni)), beta) in gs.iter_mut().zip(cols).zip(betas) {
            let c = self.acc_target(OP, g)?;
            let e = self.engine(OP)?;
            // column block `col..col + ni` of d_y, transposed: leading dimension n
            let oa = operand(
                &dy,
                dd.ptr + (col * dy.dtype().size_in_bytes()) as u64,
                true,
                n,
                0,
            );
            self.gemm(&e, OP, (ni, k, m), oa, ob, c, 0, 1, beta)?;
        }
        Ok(())
    }
}
