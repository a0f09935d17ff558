//! The small kernel families on the CPU: device scalars and masks, fused AdamW, top-k.

use crate::backend::CpuBackend;
use crate::cpu::elementwise as ew;
use crate::cpu::mask;
use crate::cpu::optim::{self, AdamWConsts};
use crate::cpu::topk;
use crate::ops::optim::{AdamWStep, OptimKernels};
use crate::ops::scalar::ScalarKernels;
use crate::ops::topk::TopkKernels;
use crate::{DType, Result, Tensor};

impl ScalarKernels for CpuBackend {
    fn scale_by(&self, x: &Tensor, s: &Tensor) -> Result<Tensor> {
        const OP: &str = "scale_by";
        let xv = x.cpu_f32(OP, "x")?;
        let sv = s.cpu_f32(OP, "s")?[0];
        Ok(Tensor::cpu_f32_from(ew::scale(&xv, sv), x.shape().clone()))
    }

    fn scale_by_assign(&self, x: &mut Tensor, s: &Tensor) -> Result<()> {
        const OP: &str = "scale_by_assign";
        let sv = s.cpu_f32(OP, "s")?[0];
        ew::scale_in_place(x.cpu_f32_mut(OP)?, sv);
        Ok(())
    }

    fn where_cond(&self, cond: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        const OP: &str = "where_cond";
        let c = cond.cpu_f32(OP, "cond")?;
        let a = on_true.cpu_f32(OP, "on_true")?;
        let b = on_false.cpu_f32(OP, "on_false")?;
        Ok(Tensor::cpu_f32_from(
            ew::select(&c, &a, &b),
            cond.shape().clone(),
        ))
    }

    fn add_i32(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "add_i32";
        let av = a.cpu_i32(OP, "lhs")?;
        let bv = b.cpu_i32(OP, "rhs")?;
        let out = av.iter().zip(bv).map(|(x, y)| x.wrapping_add(*y)).collect();
        Ok(Tensor::cpu_i32_from(out, a.shape().clone()))
    }

    fn gt_scalar(&self, x: &Tensor, thr: f32) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let v = x32.cpu_f32("gt_scalar", "x")?;
        Ok(Tensor::cpu_f32_from(mask::gt_scalar(&v, thr), x.shape()))
    }

    fn eq_scalar(&self, x: &Tensor, value: f32) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let v = x32.cpu_f32("eq_scalar", "x")?;
        Ok(Tensor::cpu_f32_from(mask::eq_scalar(&v, value), x.shape()))
    }
}

impl OptimKernels for CpuBackend {
    fn adamw(
        &self,
        param: &mut Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        grad: &Tensor,
        h: &AdamWStep,
    ) -> Result<()> {
        const OP: &str = "adamw_step";
        // t = 0 is treated as 1, as `adamw_update` always did.
        let t = h.t.clamp(1, i32::MAX as u64) as i32;
        let consts = AdamWConsts {
            beta1: h.beta1 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            inv_bc2: (1.0 / (1.0 - h.beta2.powi(t))) as f32,
            eps: h.eps as f32,
            decay: (h.weight_decay != 0.0).then_some((1.0 - h.lr * h.weight_decay) as f32),
            step: (-h.lr / (1.0 - h.beta1.powi(t))) as f32,
        };
        let g = grad.cpu_f32(OP, "grad")?;
        // The moments' dtype (both the same) was checked by the op.
        if m.dtype() == DType::BF16 {
            let (mv, vv) = (m.cpu_bf16_mut(OP)?, v.cpu_bf16_mut(OP)?);
            optim::adamw(param.cpu_f32_mut(OP)?, mv, vv, &g, &consts);
        } else {
            let (mv, vv) = (m.cpu_f32_mut(OP)?, v.cpu_f32_mut(OP)?);
            optim::adamw(param.cpu_f32_mut(OP)?, mv, vv, &g, &consts);
        }
        Ok(())
    }
}

impl TopkKernels for CpuBackend {
    fn topk(&self, x: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
        let e = x.dims().last().copied().unwrap_or(0);
        let xv = x.cpu_f32("topk", "x")?;
        let (v, i) = if e == 0 {
            (Vec::new(), Vec::new())
        } else {
            topk::topk(&xv, e, k)
        };
        let mut shape = x.dims().to_vec();
        if let Some(last) = shape.last_mut() {
            *last = k;
        }
        Ok((
            Tensor::cpu_f32_from(v, shape.clone()),
            Tensor::cpu_i32_from(i, shape),
        ))
    }
}
