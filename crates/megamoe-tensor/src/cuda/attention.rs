//! Attention on the GPU. In bf16-activation mode, for head dims megamoe-cuda's
//! [`FlashAttention`] supports (multiples of 16 up to 128), the fused tensor-core kernels:
//! bf16 q, k, v, o and gradients, f32 log-sum-exp `[BH, T]` as the saved state, no `[T, T]`
//! matrix in memory, when fused attention is on ([`CudaBackend::set_fused_attention`]).
//! Otherwise (the f32 parity path, other head dims, fused attention off) the unfused ops,
//! as on the CPU, with the probabilities `[BH, T, T]` as the saved state.

use megamoe_cuda::FlashAttention;

use super::{dev, view, CudaBackend};
use crate::backend::HostTransfer;
use crate::ops::attention::{unfused_backward, unfused_forward, AttentionKernels};
use crate::{DType, Result, Tensor};

impl CudaBackend {
    /// Whether attention of head dim `d` over `bh` rows runs fused.
    fn attention_runs_fused(&self, bh: usize, d: usize) -> bool {
        self.fused_attention()
            && self.bf16_activations()
            && FlashAttention::supports(d)
            && bh <= 65535
    }

    /// `t` as a bf16 tensor whose first element is 16-byte aligned (what the fused
    /// kernels load with vector reads): itself, or a converted or copied buffer.
    fn bf16_aligned(&self, op: &'static str, t: &Tensor) -> Result<Tensor> {
        let t = if t.dtype() == DType::BF16 {
            t.clone()
        } else {
            self.to_dtype(t, DType::BF16)?
        };
        if dev(op, &t)?.ptr % 16 == 0 {
            Ok(t)
        } else {
            self.copy(&t)
        }
    }

    /// Runs `f` with the fused kernels of head dim `d` (compiled on first use).
    fn with_flash<T>(
        &self,
        op: &'static str,
        d: usize,
        f: impl FnOnce(&FlashAttention, &megamoe_cuda::Gpu) -> megamoe_cuda::Result<T>,
    ) -> Result<T> {
        let mut e = self.engine(op)?;
        let e = &mut *e;
        if !e.flash.iter().any(|k| k.head_dim() == d) {
            let k = self.ck(op, FlashAttention::new(&mut e.gpu, d))?;
            e.flash.push(k);
        }
        let k = e.flash.iter().find(|k| k.head_dim() == d).ok_or_else(|| {
            self.err(
                op,
                megamoe_cuda::Error::invalid("head_dim", d, "no kernels"),
            )
        })?;
        self.ck(op, f(k, &e.gpu))
    }
}

impl AttentionKernels for CudaBackend {
    fn causal_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "causal_attention";
        let (bh, t, d) = q.dims3()?;
        if !self.attention_runs_fused(bh, d) || t == 0 {
            return unfused_forward(q, k, v, scale);
        }
        let (qb, kb, vb) = (
            self.bf16_aligned(OP, q)?,
            self.bf16_aligned(OP, k)?,
            self.bf16_aligned(OP, v)?,
        );
        let (o, lse) = {
            let e = self.engine(OP)?;
            let (o, _) = self.empty(&e, q.shape().clone(), DType::BF16)?;
            let (lse, _) = self.empty(&e, [bh, t].into(), DType::F32)?;
            (o, lse)
        };
        let v_ = (
            view(OP, &qb)?,
            view(OP, &kb)?,
            view(OP, &vb)?,
            view(OP, &o)?,
            view(OP, &lse)?,
        );
        self.with_flash(OP, d, |f, gpu| {
            f.forward(gpu, &v_.0, &v_.1, &v_.2, &v_.3, &v_.4, (bh, t), scale)
        })?;
        Ok((o, lse))
    }

    fn causal_attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        saved: &Tensor,
        d_o: &Tensor,
        scale: f32,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "causal_attention_backward";
        let (bh, t, d) = q.dims3()?;
        // The saved state says which forward ran: probabilities [BH, T, T] (unfused) or
        // the log-sum-exp [BH, T] (fused).
        if saved.rank() == 3 {
            return unfused_backward(q, k, v, saved, d_o, scale);
        }
        let b = |x: &Tensor| self.bf16_aligned(OP, x);
        let (qb, kb, vb, ob, gb) = (b(q)?, b(k)?, b(v)?, b(o)?, b(d_o)?);
        let lse = self.as_f32(saved)?;
        let (dq, dk, dv) = {
            let e = self.engine(OP)?;
            let (dq, _) = self.empty(&e, q.shape().clone(), DType::BF16)?;
            let (dk, _) = self.empty(&e, q.shape().clone(), DType::BF16)?;
            let (dv, _) = self.empty(&e, q.shape().clone(), DType::BF16)?;
            (dq, dk, dv)
        };
        let ins = (view(OP, &qb)?, view(OP, &kb)?, view(OP, &vb)?);
        let (ov, gv, lv) = (view(OP, &ob)?, view(OP, &gb)?, view(OP, &lse)?);
        let outs = (view(OP, &dq)?, view(OP, &dk)?, view(OP, &dv)?);
        self.with_flash(OP, d, |f, gpu| {
            f.backward(
                gpu,
                (&ins.0, &ins.1, &ins.2),
                &ov,
                &gv,
                &lv,
                (&outs.0, &outs.1, &outs.2),
                (bh, t),
                scale,
            )
        })?;
        Ok((dq, dk, dv))
    }
}
