//! RMSNorm, RoPE, cross-entropy, AdamW (megamoe-cuda's step `Ops`: f32 parity path, or bf16
//! storage with f32 math in bf16-activation mode, where norm and RoPE outputs, the norm's
//! input gradient and the logit gradient are bf16 and row statistics, losses and weight
//! gradients f32) and the index / copy family (`megamoe_cuda::tensor` kernels and 2-D
//! device copies).

use megamoe_cuda::AdamWParams;

use super::{dev, view, CudaBackend};
use crate::ops::index::IndexKernels;
use crate::ops::loss::LossKernels;
use crate::ops::norm::{NormKernels, RmsNormResidualGrads};
use crate::ops::optim::{AdamWStep, OptimKernels};
use crate::ops::rope::RopeKernels;
use crate::{DType, Error, Result, Shape, Tensor};

impl NormKernels for CudaBackend {
    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rms_norm";
        let (xf, wf) = (self.as_act(x)?, self.as_act(w)?);
        let h = w.numel();
        let rows = x.numel().checked_div(h).unwrap_or(0);
        let e = self.engine(OP)?;
        let (y, _) = self.empty(&e, x.shape().clone(), self.act())?;
        let (rstd, _) = self.empty(&e, [rows].into(), DType::F32)?;
        if rows > 0 {
            let (xv, wv, yv, rv) = (
                view(OP, &xf)?,
                view(OP, &wf)?,
                view(OP, &y)?,
                view(OP, &rstd)?,
            );
            self.ck(
                OP,
                e.ops(self.act())
                    .rms_norm(&e.gpu, &xv, &wv, &yv, &rv, rows, h, eps),
            )?;
        }
        Ok((y, rstd))
    }

    fn rms_norm_backward_input(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
    ) -> Result<Tensor> {
        const OP: &str = "rms_norm_backward_input";
        let (df, xf, wf) = (self.as_act(dy)?, self.as_act(x)?, self.as_act(w)?);
        let h = w.numel();
        let rows = rstd.numel();
        let e = self.engine(OP)?;
        let (dx, _) = self.empty(&e, x.shape().clone(), self.act())?;
        if rows > 0 {
            let v = (
                view(OP, &df)?,
                view(OP, &xf)?,
                view(OP, &wf)?,
                view(OP, rstd)?,
                view(OP, &dx)?,
            );
            self.ck(
                OP,
                e.ops(self.act())
                    .rms_norm_backward_input(&e.gpu, &v.0, &v.1, &v.2, &v.3, &v.4, rows, h),
            )?;
        }
        Ok(dx)
    }

    fn rms_norm_backward_weight(&self, dy: &Tensor, x: &Tensor, rstd: &Tensor) -> Result<Tensor> {
        const OP: &str = "rms_norm_backward_weight";
        let (df, xf) = (self.as_act(dy)?, self.as_act(x)?);
        let h = x.dims().last().copied().unwrap_or(1);
        let rows = rstd.numel();
        let e = self.engine(OP)?;
        let (dw, dwd) = self.empty(&e, [h].into(), DType::F32)?;
        if rows == 0 {
            // SAFETY: `dw` holds h elements.
            self.ck(OP, unsafe { e.tk.fill(&e.gpu, dwd, h, 0.0) })?;
            return Ok(dw);
        }
        let v = (
            view(OP, &df)?,
            view(OP, &xf)?,
            view(OP, rstd)?,
            view(OP, &dw)?,
        );
        self.ck(
            OP,
            e.ops(self.act())
                .rms_norm_backward_weight(&e.gpu, &v.0, &v.1, &v.2, &v.3, rows, h, false),
        )?;
        Ok(dw)
    }

    fn rms_norm_backward_add(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        residual: &Tensor,
        act: bool,
    ) -> Result<RmsNormResidualGrads> {
        const OP: &str = "rms_norm_backward_add";
        // dy is read as stored when it is f32 (a sum kept in f32) or the activation dtype.
        let df = if dy.dtype() == DType::F32 {
            dy.clone()
        } else {
            self.as_act(dy)?
        };
        let (xf, wf, rf) = (self.as_act(x)?, self.as_act(w)?, self.as_f32(residual)?);
        let h = w.numel();
        let rows = rstd.numel();
        let act_copy = act && self.act() != DType::F32;
        let e = self.engine(OP)?;
        let (sum, _) = self.empty(&e, x.shape().clone(), DType::F32)?;
        let act_t = if act_copy {
            Some(self.empty(&e, x.shape().clone(), self.act())?.0)
        } else {
            None
        };
        let (d_w, _) = self.empty(&e, [h].into(), DType::F32)?;
        let ptrs = [&df, &xf, &wf, &rf, &sum]
            .into_iter()
            .chain(act_t.as_ref())
            .map(|t| dev(OP, t).map(|d| d.ptr))
            .collect::<Result<Vec<u64>>>()?;
        if rows == 0 || !megamoe_cuda::Ops::rms_norm_backward_add_fits(h, &ptrs) {
            drop(e);
            return self.rms_norm_backward_add_unfused(dy, x, w, rstd, residual, act);
        }
        let av = act_t.as_ref().map(|t| view(OP, t)).transpose()?;
        let v = (
            view(OP, &df)?,
            view(OP, &xf)?,
            view(OP, &wf)?,
            view(OP, rstd)?,
            view(OP, &rf)?,
            view(OP, &sum)?,
            view(OP, &d_w)?,
        );
        self.ck(
            OP,
            e.ops(self.act()).rms_norm_backward_add(
                &e.gpu,
                (&v.0, df.dtype() == DType::F32),
                &v.1,
                &v.2,
                &v.3,
                &v.4,
                &v.5,
                av.as_ref().map(|a| a as &dyn megamoe_cuda::DeviceMem),
                &v.6,
                rows,
                h,
            ),
        )?;
        drop(e);
        let act = act_t.unwrap_or_else(|| sum.clone());
        Ok(RmsNormResidualGrads { sum, act, d_w })
    }
}

impl CudaBackend {
    /// [`NormKernels::rms_norm_backward_add`] by the unfused ops (a row the fused kernel
    /// does not take: `h` not a multiple of 8, above 12288, or an unaligned view).
    fn rms_norm_backward_add_unfused(
        &self,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        residual: &Tensor,
        act: bool,
    ) -> Result<RmsNormResidualGrads> {
        let dx = self.rms_norm_backward_input(dy, x, w, rstd)?;
        let mut sum = self.as_f32(residual)?;
        crate::ops::elementwise::ElementwiseKernels::axpy(self, &mut sum, 1.0, &dx)?;
        let act = if act { self.as_act(&sum)? } else { sum.clone() };
        Ok(RmsNormResidualGrads {
            sum,
            act,
            d_w: self.rms_norm_backward_weight(dy, x, rstd)?,
        })
    }
}

impl RopeKernels for CudaBackend {
    fn rope(&self, x: &Tensor, theta: f32, sign: f32) -> Result<Tensor> {
        const OP: &str = "rope";
        let (b, t, nh, d) = x.dims4()?;
        let xf = self.as_act(x)?;
        let e = self.engine(OP)?;
        let (y, _) = self.empty(&e, x.shape().clone(), self.act())?;
        if x.numel() > 0 {
            let (xv, yv) = (view(OP, &xf)?, view(OP, &y)?);
            self.ck(
                OP,
                e.ops(self.act())
                    .rope(&e.gpu, &xv, &yv, (b, t, nh, d), theta, sign < 0.0),
            )?;
        }
        Ok(y)
    }

    fn rope_leading_in_place(
        &self,
        x: &mut Tensor,
        theta: f32,
        sign: f32,
        rotated: usize,
    ) -> Result<()> {
        const OP: &str = "rope_leading_in_place";
        let (b, t, nh, d) = x.dims4()?;
        let act = self.act();
        x.make_unique_as(act, |t| {
            self.as_act(t)
                .and_then(|a| crate::backend::HostTransfer::copy(self, &a))
        })?;
        if x.numel() == 0 {
            return Ok(());
        }
        let xv = view(OP, x)?;
        let e = self.engine(OP)?;
        self.ck(
            OP,
            e.ops(act)
                .rope_leading(&e.gpu, &xv, &xv, (b, t, nh, d), rotated, theta, sign < 0.0),
        )
    }
}

impl LossKernels for CudaBackend {
    /// Targets are checked on the device in every build: a target outside `0..V` (other than
    /// `ignore_index`) makes its row's loss and gradient NaN and is reported as an
    /// `IndexOutOfRange` error naming `cross_entropy` at the next synchronising read (the
    /// step's stats read), with no host read here.
    fn cross_entropy(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "cross_entropy";
        let (n, v) = logits.dims2()?;
        super::routing::ids(OP, "targets", targets)?;
        let lf = self.as_act(logits)?;
        let e = self.engine(OP)?;
        let (loss, _) = self.empty(&e, Shape::from(Vec::new()), DType::F32)?;
        let (grad, gd) = self.empty(&e, [n, v].into(), self.act())?;
        if n == 0 || v == 0 {
            // SAFETY: `loss` holds one element, `grad` n·v.
            self.ck(OP, unsafe {
                e.tk.fill(&e.gpu, super::dev(OP, &loss)?, 1, 0.0)
            })?;
            self.ck(OP, unsafe { e.tk.fill(&e.gpu, gd, n * v, 0.0) })?;
            return Ok((loss, grad));
        }
        let (lv, tv, gv, sv) = (
            view(OP, &lf)?,
            view(OP, targets)?,
            view(OP, &grad)?,
            view(OP, &loss)?,
        );
        self.ck(
            OP,
            e.ops(self.act()).cross_entropy(
                &e.gpu,
                &lv,
                &tv,
                &gv,
                &sv,
                (n, v),
                ignore_index,
                e.err.ptr(),
            ),
        )?;
        Ok((loss, grad))
    }
}

impl OptimKernels for CudaBackend {
    fn adamw(
        &self,
        param: &mut Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        grad: &Tensor,
        h: &AdamWStep,
    ) -> Result<()> {
        const OP: &str = "adamw_step";
        let fresh = |t: &Tensor| crate::backend::HostTransfer::to_dtype(self, t, DType::F32);
        param.make_unique_f32(fresh)?;
        // The moments keep their dtype (both f32 or both bf16).
        let moments = super::flat_optim::moment_type(OP, m, v)?;
        let dtype = super::flat_optim::moment_dtype(moments);
        for t in [&mut *m, &mut *v] {
            t.make_unique_as_or_write_through(dtype, |t| {
                crate::backend::HostTransfer::to_dtype(self, t, dtype)
            })?;
        }
        let n = grad.numel();
        if n == 0 {
            return Ok(());
        }
        let hp = AdamWParams {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            t: h.t,
        };
        let e = self.engine(OP)?;
        let ops = if grad.dtype() == DType::BF16 {
            &e.ops_bf16
        } else {
            &e.ops_f32
        };
        let (pv, mv, vv, gv) = (
            view(OP, param)?,
            view(OP, m)?,
            view(OP, v)?,
            view(OP, grad)?,
        );
        self.ck(
            OP,
            ops.adamw(&e.gpu, &pv, &mv, &vv, &gv, None, (n, moments), &hp),
        )
    }
}

impl IndexKernels for CudaBackend {
    fn index_select(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_select";
        let (&n, rest) = x
            .dims()
            .split_first()
            .ok_or_else(|| x.rank_error(OP, "x", 1))?;
        let row: usize = rest.iter().product();
        let r = idx.numel();
        let (xd, ip) = (dev(OP, x)?, super::routing::ids(OP, "idx", idx)?);
        let mut shape = vec![r];
        shape.extend_from_slice(rest);
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, shape.into(), x.dtype())?;
        // SAFETY: `x` holds n rows of `row` elements (ids checked on the device), the output
        // r rows.
        self.ck(OP, unsafe {
            e.tk.gather_rows(&e.gpu, (xd, n), ip, d.ptr, r, row, e.err.ptr())
        })?;
        Ok(t)
    }

    fn index_add_rows(
        &self,
        dst: &mut Tensor,
        idx: &Tensor,
        src: &Tensor,
        weights: Option<&Tensor>,
    ) -> Result<()> {
        const OP: &str = "index_add_rows";
        let m = dst.dims().first().copied().unwrap_or(0);
        let row: usize = dst.dims().iter().skip(1).product();
        let n = idx.numel();
        let (ip, sd) = (super::routing::ids(OP, "idx", idx)?, dev(OP, src)?);
        let wf = weights.map(|w| self.as_f32(w)).transpose()?;
        let wd = wf.as_ref().map(|w| dev(OP, w)).transpose()?.map(|d| d.ptr);
        // SAFETY: `dst` is a unique f32 [m, row] buffer, `src` [n, row], `idx` and `w` [n]
        // (ids checked on the device).
        self.in_place(OP, dst, |e, d| unsafe {
            e.tk.index_add_rows(&e.gpu, d.ptr, (m, row), ip, sd, wd, n, e.err.ptr())
        })
    }

    fn gather_cols(&self, x: &Tensor, idx: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather_cols";
        let (n, e_) = x.dims2()?;
        let (_, k) = idx.dims2()?;
        let (xd, ip) = (dev(OP, x)?, super::routing::ids(OP, "idx", idx)?);
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [n, k].into(), DType::F32)?;
        // SAFETY: `x` [n, e], `idx` and the output [n, k] (ids checked on the device).
        self.ck(OP, unsafe {
            e.tk.gather_cols(&e.gpu, xd, ip, d.ptr, n, e_, k, e.err.ptr())
        })?;
        Ok(t)
    }

    fn scatter_cols(&self, src: &Tensor, idx: &Tensor, n_cols: usize) -> Result<Tensor> {
        const OP: &str = "scatter_cols";
        let (n, k) = src.dims2()?;
        let (sd, ip) = (dev(OP, src)?, super::routing::ids(OP, "idx", idx)?);
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [n, n_cols].into(), DType::F32)?;
        // SAFETY: `src` and `idx` [n, k], the output [n, n_cols] (ids checked on the device).
        self.ck(OP, unsafe {
            e.tk.scatter_cols(&e.gpu, sd, ip, d.ptr, n, n_cols, k, e.err.ptr())
        })?;
        Ok(t)
    }

    fn narrow_copy(&self, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        const OP: &str = "narrow";
        let (outer, size, inner) = x.shape().split_at_dim(OP, dim)?;
        let mut shape = x.dims().to_vec();
        shape[dim] = len;
        let es = x.dtype().size_in_bytes();
        let xd = dev(OP, x)?;
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, shape.into(), x.dtype())?;
        // SAFETY: `outer` rows of `size·inner` elements in `x`, of `len·inner` in the output.
        self.ck(OP, unsafe {
            e.gpu.copy_2d(
                d.ptr,
                len * inner * es,
                xd.ptr + (start * inner * es) as u64,
                size * inner * es,
                len * inner * es,
                outer,
            )
        })?;
        Ok(t)
    }

    fn cat(&self, tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        const OP: &str = "cat";
        let Some(first) = tensors.first() else {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "tensors",
                value: "[]".into(),
                rule: "needs at least one tensor",
            });
        };
        let (outer, _, inner) = first.shape().split_at_dim(OP, dim)?;
        let total: usize = tensors.iter().map(|t| t.dims()[dim]).sum();
        let mut shape = first.dims().to_vec();
        shape[dim] = total;
        let es = first.dtype().size_in_bytes();
        let srcs = tensors
            .iter()
            .map(|t| {
                if t.dtype() != first.dtype() {
                    return Err(Error::DTypeMismatch {
                        op: OP,
                        arg: "tensors",
                        expected: "one dtype for all",
                        got: t.dtype(),
                    });
                }
                Ok((dev(OP, t)?, t.dims()[dim]))
            })
            .collect::<Result<Vec<_>>>()?;
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, shape.into(), first.dtype())?;
        let mut at = 0usize;
        for (s, size) in srcs {
            // SAFETY: `outer` rows of `size·inner` elements in the source, of `total·inner`
            // in the output, written at column `at`.
            self.ck(OP, unsafe {
                e.gpu.copy_2d(
                    d.ptr + (at * inner * es) as u64,
                    total * inner * es,
                    s.ptr,
                    size * inner * es,
                    size * inner * es,
                    outer,
                )
            })?;
            at += size;
        }
        Ok(t)
    }

    fn permute(&self, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
        const OP: &str = "permute";
        let shape: Vec<usize> = perm.iter().map(|&p| x.dims()[p]).collect();
        let xd = dev(OP, x)?;
        let dims = x.dims().to_vec();
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, shape.into(), x.dtype())?;
        // SAFETY: `x` and the output hold the same number of elements.
        self.ck(OP, unsafe { e.tk.permute(&e.gpu, xd, d.ptr, &dims, perm) })?;
        Ok(t)
    }
}
