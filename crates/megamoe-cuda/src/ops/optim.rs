//! Fused AdamW over f32 master weights and moments, with an optional copy of the updated
//! weights in the storage type (the bf16 weights the next forward reads).

use super::{need, positive, stride_grid, Ops, BLOCK};
use crate::device::{arg, Gpu};
use crate::error::{Error, Result};
use crate::pool::DeviceMem;

/// Scalars of one AdamW step (PyTorch `torch.optim.AdamW` order).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// Learning rate η.
    pub lr: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε added to √v̂.
    pub eps: f64,
    /// Decoupled weight decay λ (0 for none).
    pub weight_decay: f64,
    /// 1-based step count for the bias corrections (0 counts as 1).
    pub t: u64,
}

/// Layout of `AdamWConsts` in kernels.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AdamWConsts {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_bc2: f32,
    eps: f32,
    decay: f32,
    step: f32,
    has_decay: i32,
}

impl AdamWParams {
    /// The constants [`Ops::adamw_device`] reads, as the nine 32-bit words of the kernel's
    /// `AdamWConsts` (f32 bits, then `has_decay`): what [`Ops::adamw`] passes by value.
    pub fn device_words(&self) -> Result<[i32; 9]> {
        let c = self.consts()?;
        let f = |x: f32| x.to_bits() as i32;
        Ok([
            f(c.beta1),
            f(c.one_minus_beta1),
            f(c.beta2),
            f(c.one_minus_beta2),
            f(c.inv_bc2),
            f(c.eps),
            f(c.decay),
            f(c.step),
            c.has_decay,
        ])
    }

    /// The f32 constants, rounded as megamoe-tensor's `adamw_step` rounds them.
    fn consts(&self) -> Result<AdamWConsts> {
        for (field, v) in [
            ("adamw lr", self.lr),
            ("adamw beta1", self.beta1),
            ("adamw beta2", self.beta2),
            ("adamw eps", self.eps),
            ("adamw weight_decay", self.weight_decay),
        ] {
            if !v.is_finite() {
                return Err(Error::invalid(field, v, "must be finite"));
            }
        }
        let t = self.t.clamp(1, i32::MAX as u64) as i32;
        Ok(AdamWConsts {
            beta1: self.beta1 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            inv_bc2: (1.0 / (1.0 - self.beta2.powi(t))) as f32,
            eps: self.eps as f32,
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            step: (-self.lr / (1.0 - self.beta1.powi(t))) as f32,
            has_decay: i32::from(self.weight_decay != 0.0),
        })
    }
}

impl Ops {
    /// One fused AdamW update in place over `n` elements: `p`, `m`, `v` f32, `grad` in the
    /// storage type; `p_copy` (if given) receives the updated weights in the storage type.
    /// Per element the same f32 operations, unfused and in the same order, as
    /// megamoe-tensor's `adamw_step`, so f32 results match it bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        gpu: &Gpu,
        p: &impl DeviceMem,
        m: &impl DeviceMem,
        v: &impl DeviceMem,
        grad: &impl DeviceMem,
        p_copy: Option<&dyn DeviceMem>,
        n: usize,
        h: &AdamWParams,
    ) -> Result<()> {
        positive("adamw elements", n)?;
        let c = h.consts()?;
        need("adamw p", p, n, 4)?;
        need("adamw m", m, n, 4)?;
        need("adamw v", v, n, 4)?;
        need("adamw grad", grad, n, self.elem.size())?;
        if let Some(pc) = p_copy {
            need("adamw p_copy", pc, n, self.elem.size())?;
        }
        let copy = p_copy.map_or(0u64, |b| b.ptr());
        unsafe {
            gpu.launch(
                self.k.adamw,
                stride_grid(n),
                BLOCK,
                &mut [
                    arg(&p.ptr()),
                    arg(&m.ptr()),
                    arg(&v.ptr()),
                    arg(&grad.ptr()),
                    arg(&copy),
                    arg(&n),
                    arg(&c),
                ],
            )
        }
    }

    /// [`Ops::adamw`] with its constants read from device memory (`consts`: the nine
    /// words of [`AdamWParams::device_words`]) and a go-ahead `apply` (one f32; 0 leaves
    /// `p`, `m` and `v` untouched), so a captured graph replays it with new values. No
    /// weight copy.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_device(
        &self,
        gpu: &Gpu,
        p: &impl DeviceMem,
        m: &impl DeviceMem,
        v: &impl DeviceMem,
        grad: &impl DeviceMem,
        n: usize,
        consts: &impl DeviceMem,
        apply: &impl DeviceMem,
    ) -> Result<()> {
        positive("adamw elements", n)?;
        need("adamw p", p, n, 4)?;
        need("adamw m", m, n, 4)?;
        need("adamw v", v, n, 4)?;
        need("adamw grad", grad, n, self.elem.size())?;
        need("adamw consts", consts, 9, 4)?;
        need("adamw apply", apply, 1, 4)?;
        unsafe {
            gpu.launch(
                self.k.adamw_dev,
                stride_grid(n),
                BLOCK,
                &mut [
                    arg(&p.ptr()),
                    arg(&m.ptr()),
                    arg(&v.ptr()),
                    arg(&grad.ptr()),
                    arg(&n),
                    arg(&consts.ptr()),
                    arg(&apply.ptr()),
                ],
            )
        }
    }
}
