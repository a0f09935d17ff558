//! The matmul family on cuBLAS (f32 accumulation; f32 operands use no TF32, so f32 runs
//! are the parity path). Two bf16 operands run as a bf16 GEMM with an f32 result; a mixed
//! pair is widened to f32 first (the CPU backend's semantics), unless the backend is in
//! bf16-matmul mode (both rounded to bf16). Grouped matmuls over fixed-stride groups are
//! one strided-batched GEMM (`grouped.rs`, no host read); over packed groups they need the
//! group sizes on the host (given, or one counted read) and run per the plan `grouped.rs`
//! picks: one strided-batched GEMM over the groups padded to a common size, or one GEMM per
//! group.
//!
//! Results are f32, except in bf16-activation mode
//! ([`CudaBackend::set_bf16_activations`]): there `matmul` (unless `trans_a`: a weight
//! gradient `dyᵀ·x` stays f32) and `grouped_matmul` (packed or strided) write bf16 (cuBLAS rounds the f32
//! accumulator once), and the `_acc` forms accumulate into a bf16 `out` in place; `bmm`
//! (attention scores, Muon) and the weight-gradient forms stay f32.

use megamoe_cuda::{Elem, Operand, Varying};

use super::grouped::{gemm_lanes, group_gemm_bucketed, PackedPlan};
use super::{dev, CudaBackend, Engine};
use crate::ops::groups::check_spans;
use crate::ops::matmul::{grouped_dims, wgrad_dims, MatmulKernels};
use crate::{DType, Error, Result, RowGroups, Tensor};

/// How a per-group plan over `spans` runs its GEMMs: (streams, the bucketed dimension).
/// Bucketed algorithms ([`group_gemm_bucketed`]) run on one stream; else up to
/// [`gemm_lanes`] streams, never more than the non-empty groups.
fn group_gemms(
    op: &'static str,
    spans: &[(usize, usize)],
    vary: Varying,
) -> Result<(usize, Option<Varying>)> {
    if group_gemm_bucketed(op)? {
        return Ok((1, Some(vary)));
    }
    let groups = spans.iter().filter(|s| s.1 > 0).count();
    Ok((gemm_lanes(op)?.min(groups), None))
}

/// Logical `(rows, cols)` of `op(t)` for a rank-2 `t`.
fn logical(t: &Tensor, trans: bool) -> Result<(usize, usize)> {
    let (r, c) = t.dims2()?;
    Ok(if trans { (c, r) } else { (r, c) })
}

pub(super) fn elem(d: DType) -> Elem {
    if d == DType::BF16 {
        Elem::Bf16
    } else {
        Elem::F32
    }
}

impl CudaBackend {
    /// `a`, `b` as one GEMM input type: both bf16 stay bf16 (and both are rounded to bf16
    /// in bf16-matmul mode: a registered weight through its cached copy, `weights.rs`),
    /// anything else is f32.
    pub(super) fn gemm_pair(&self, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let bf = |t: &Tensor| {
            if t.dtype() == DType::BF16 {
                Ok(t.clone())
            } else {
                self.bf16_operand(t)
            }
        };
        if self.bf16_matmul() || (a.dtype() == DType::BF16 && b.dtype() == DType::BF16) {
            Ok((bf(a)?, bf(b)?))
        } else {
            Ok((self.as_f32(a)?, self.as_f32(b)?))
        }
    }

    /// `C[m, n] (c_elem) = alpha · op(A) · op(B) + beta · C` for `batch` strided entries.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        e: &Engine,
        op: &'static str,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        (c, c_elem): (u64, Elem),
        c_stride: usize,
        batch: usize,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let c = Operand::dense(c, c_elem, n, c_stride);
        if k == 0 {
            // An empty inner dimension: C = beta · C.
            let kd = if c_elem == Elem::Bf16 {
                megamoe_cuda::tensor::Dtype::Bf16
            } else {
                megamoe_cuda::tensor::Dtype::F32
            };
            let d = megamoe_cuda::tensor::Dev::new(c.ptr, kd);
            // SAFETY: C holds batch·m·n elements (its stride is m·n).
            return self.ck(op, unsafe {
                e.tk.unary(
                    &e.gpu,
                    megamoe_cuda::tensor::Unary::Affine {
                        mul: beta,
                        add: 0.0,
                    },
                    d,
                    d,
                    batch * m * n,
                )
            });
        }
        self.ck(op, e.gpu.gemm(m, n, k, a, b, c, batch, 1.0, beta))
    }

    /// The dtype of a fresh matmul result: bf16 in bf16-activation mode unless the product
    /// is a weight gradient (`trans_a`), else f32.
    pub(super) fn product_dtype(&self, trans_a: bool) -> DType {
        if trans_a {
            DType::F32
        } else {
            self.act()
        }
    }

    /// `out` made a unique buffer to accumulate into, and its GEMM element type: a bf16
    /// `out` stays bf16 in bf16-activation mode; anything else becomes a unique f32 buffer.
    pub(super) fn acc_target(&self, op: &'static str, out: &mut Tensor) -> Result<(u64, Elem)> {
        if self.bf16_activations() && out.dtype() == DType::BF16 {
            out.make_unique_as(DType::BF16, |t| crate::backend::HostTransfer::copy(self, t))?;
            Ok((dev(op, out)?.ptr, Elem::Bf16))
        } else {
            self.in_place(op, out, |_, _| Ok(()))?;
            Ok((dev(op, out)?.ptr, Elem::F32))
        }
    }
}

/// A row-major operand of logical `op(t)` at element `at` of `t`, batch stride `stride`.
pub(super) fn operand(t: &Tensor, ptr: u64, trans: bool, cols: usize, stride: usize) -> Operand {
    let mut o = Operand::dense(ptr, elem(t.dtype()), cols, stride);
    o.trans = trans;
    o
}

impl MatmulKernels for CudaBackend {
    fn gemm_weight(&self, w: &Tensor) -> Result<Tensor> {
        // `gemm_pair`'s rule (bf16 operands in bf16-matmul mode or when both are bf16): a
        // weight that is not bf16 is read as bf16 only in bf16-matmul mode.
        if w.dtype() == DType::F32 && self.bf16_matmul() {
            self.bf16_operand(w)
        } else {
            Ok(w.clone())
        }
    }

    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "matmul";
        let (m, k) = logical(a, trans_a)?;
        let (_, n) = logical(b, trans_b)?;
        let (a, b) = self.gemm_pair(a, b)?;
        let (ad, bd) = (dev(OP, &a)?, dev(OP, &b)?);
        let dtype = self.product_dtype(trans_a);
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [m, n].into(), dtype)?;
        let oa = operand(&a, ad.ptr, trans_a, a.dims()[1], 0);
        let ob = operand(&b, bd.ptr, trans_b, b.dims()[1], 0);
        self.gemm(&e, OP, (m, n, k), oa, ob, (d.ptr, elem(dtype)), 0, 1, 0.0)?;
        Ok(t)
    }

    fn matmul_acc(
        &self,
        out: &mut Tensor,
        a: &Tensor,
        b: &Tensor,
        trans_a: bool,
        trans_b: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "matmul_acc";
        let (m, k) = logical(a, trans_a)?;
        let (_, n) = logical(b, trans_b)?;
        let (a, b) = self.gemm_pair(a, b)?;
        let (ad, bd) = (dev(OP, &a)?, dev(OP, &b)?);
        let c = self.acc_target(OP, out)?;
        let e = self.engine(OP)?;
        let oa = operand(&a, ad.ptr, trans_a, a.dims()[1], 0);
        let ob = operand(&b, bd.ptr, trans_b, b.dims()[1], 0);
        self.gemm(&e, OP, (m, n, k), oa, ob, c, 0, 1, beta)
    }

    fn bmm(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "bmm";
        let (batch, a0, a1) = a.dims3()?;
        let (m, k) = if trans_a { (a1, a0) } else { (a0, a1) };
        let (b_shared, b0, b1) = match *b.dims() {
            [_, x, y] => (false, x, y),
            [x, y] => (true, x, y),
            _ => return Err(b.rank_error(OP, "b", 3)),
        };
        let n = if trans_b { b0 } else { b1 };
        let (a, b) = self.gemm_pair(a, b)?;
        let (ad, bd) = (dev(OP, &a)?, dev(OP, &b)?);
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [batch, m, n].into(), DType::F32)?;
        let oa = operand(&a, ad.ptr, trans_a, a1, a0 * a1);
        let ob = operand(&b, bd.ptr, trans_b, b1, if b_shared { 0 } else { b0 * b1 });
        self.gemm(
            &e,
            OP,
            (m, n, k),
            oa,
            ob,
            (d.ptr, Elem::F32),
            m * n,
            batch,
            0.0,
        )?;
        Ok(t)
    }

    fn grouped_matmul(
        &self,
        x: &Tensor,
        groups: &RowGroups,
        w: &Tensor,
        trans_w: bool,
    ) -> Result<Tensor> {
        const OP: &str = "grouped_matmul";
        if let Some(stride) = groups.stride() {
            return self.strided_matmul(x, groups, stride, w, trans_w);
        }
        let (r, n, _) = grouped_dims(OP, x, groups, w, trans_w)?;
        let spans = self.spans(OP, groups, r)?;
        let covered = spans.iter().map(|s| s.1).sum::<usize>() == r;
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [r, n].into(), self.act())?;
        if !covered {
            // Rows outside every group are zero; every plan writes all group rows.
            // SAFETY: the output holds r·n elements.
            self.ck(OP, unsafe { e.tk.fill(&e.gpu, d, r * n, 0.0) })?;
        }
        drop(e);
        let mut out = t;
        self.packed_matmul_acc(&mut out, x, groups, &spans, w, trans_w, 0.0)?;
        Ok(out)
    }

    fn grouped_matmul_acc(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        groups: &RowGroups,
        w: &Tensor,
        trans_w: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul";
        if let Some(stride) = groups.stride() {
            return self.strided_matmul_acc(out, x, groups, stride, w, trans_w, beta);
        }
        let (r, ..) = grouped_dims(OP, x, groups, w, trans_w)?;
        let spans = self.spans(OP, groups, r)?;
        self.packed_matmul_acc(out, x, groups, &spans, w, trans_w, beta)
    }

    fn grouped_matmul_wgrad(&self, dy: &Tensor, x: &Tensor, groups: &RowGroups) -> Result<Tensor> {
        const OP: &str = "grouped_matmul_wgrad";
        let (_, n, k) = wgrad_dims(OP, dy, x, groups)?;
        let g = groups.len();
        let e = self.engine(OP)?;
        let (t, d) = self.empty(&e, [g, n, k].into(), DType::F32)?;
        // SAFETY: the output holds g·n·k elements.
        self.ck(OP, unsafe { e.tk.fill(&e.gpu, d, g * n * k, 0.0) })?;
        drop(e);
        let mut out = t;
        self.grouped_matmul_wgrad_acc(&mut out, dy, x, groups, 0.0)?;
        Ok(out)
    }

    fn grouped_matmul_wgrad_acc(
        &self,
        out: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        groups: &RowGroups,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul_wgrad";
        if let Some(stride) = groups.stride() {
            return self.strided_wgrad_acc(out, dy, x, groups, stride, beta);
        }
        let (r, n, k) = wgrad_dims(OP, dy, x, groups)?;
        let spans = self.spans(OP, groups, r)?;
        match self.packed_plan(OP, &spans, r)? {
            PackedPlan::Padded(cap) => return self.padded_wgrad_acc(out, dy, x, groups, cap, beta),
            PackedPlan::Strided(s) => {
                // equal groups back to back over every row: one strided-batched GEMM
                let (dy, x) = self.gemm_pair(dy, x)?;
                let (dd, xd) = (dev(OP, &dy)?, dev(OP, &x)?);
                self.in_place(OP, out, |_, _| Ok(()))?;
                let od = dev(OP, out)?;
                let oa = operand(&dy, dd.ptr, true, n, s * n);
                let ob = operand(&x, xd.ptr, false, k, s * k);
                return self.batched(OP, (n, k, s), oa, ob, od.ptr, n * k, spans.len(), beta);
            }
            PackedPlan::PerGroup => {}
        }
        let (dy, x) = self.gemm_pair(dy, x)?;
        let (dd, xd) = (dev(OP, &dy)?, dev(OP, &x)?);
        self.in_place(OP, out, |_, _| Ok(()))?;
        let od = dev(OP, out)?;
        let es = x.dtype().size_in_bytes();
        let e = self.engine(OP)?;
        // Empty groups first, on the engine's stream; then the GEMMs over the lanes.
        for (g, &(_, s)) in spans.iter().enumerate() {
            let oc = od.ptr + (g * n * k * 4) as u64;
            if s == 0 && beta == 0.0 {
                // beta = 0 overwrites without reading: the block becomes exactly zero
                // (cuBLAS computes 0·C for a k = 0 product, so NaNs in C stayed; found by
                // the op suite's CUDA arm).
                let block = megamoe_cuda::tensor::Dev::f32(oc);
                // SAFETY: group g's [n, k] block lies inside the [G, n, k] output.
                self.ck(OP, unsafe { e.tk.fill(&e.gpu, block, n * k, 0.0) })?;
            } else if s == 0 {
                // An empty group's gradient is beta · its old value.
                self.gemm(
                    &e,
                    OP,
                    (n, k, 0),
                    Operand::dense(0, Elem::F32, 1, 0),
                    Operand::dense(0, Elem::F32, 1, 0),
                    (oc, Elem::F32),
                    0,
                    1,
                    beta,
                )?;
            }
        }
        let (lanes, vary) = group_gemms(OP, &spans, Varying::K)?;
        self.ck(
            OP,
            e.gpu.with_gemm_lanes(lanes, |l| {
                let mut i = 0;
                for (g, &(o, s)) in spans.iter().enumerate() {
                    if s == 0 || n == 0 || k == 0 {
                        continue;
                    }
                    let oc = od.ptr + (g * n * k * 4) as u64;
                    let oa = operand(&dy, dd.ptr + (o * n * es) as u64, true, n, 0);
                    let ob = operand(&x, xd.ptr + (o * k * es) as u64, false, k, 0);
                    let c = Operand::dense(oc, Elem::F32, k, 0);
                    l.gemm_varying(i, (n, k, s), oa, ob, c, beta, vary)?;
                    i += 1;
                }
                Ok(())
            }),
        )
    }
}

impl CudaBackend {
    /// `out = beta · out + x_g·op(w_g)` on the rows of packed groups `spans` (checked), by
    /// the plan [`CudaBackend::packed_plan`] picks; other rows untouched.
    #[allow(clippy::too_many_arguments)]
    fn packed_matmul_acc(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        groups: &RowGroups,
        spans: &[(usize, usize)],
        w: &Tensor,
        trans_w: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul";
        let (r, n, kx) = grouped_dims(OP, x, groups, w, trans_w)?;
        let c = self.acc_target(OP, out)?;
        let (w1, w2) = if trans_w { (n, kx) } else { (kx, n) };
        let stride = match self.packed_plan(OP, spans, r)? {
            PackedPlan::Padded(cap) => {
                return self.padded_matmul_acc(c, x, groups, cap, w, trans_w, beta)
            }
            PackedPlan::Strided(s) => Some(s),
            PackedPlan::PerGroup => None,
        };
        let (od, oe) = c;
        let (x, w) = self.gemm_pair(x, w)?;
        let (xd, wd) = (dev(OP, &x)?, dev(OP, &w)?);
        if let Some(s) = stride {
            // equal groups back to back over every row: one strided-batched GEMM in place
            let oa = operand(&x, xd.ptr, false, kx, s * kx);
            let ob = operand(&w, wd.ptr, trans_w, w2, w1 * w2);
            let e = self.engine(OP)?;
            return self.gemm(&e, OP, (s, n, kx), oa, ob, c, s * n, spans.len(), beta);
        }
        let (xs, ws) = (x.dtype().size_in_bytes(), w.dtype().size_in_bytes());
        if kx == 0 {
            // An empty inner dimension: every group row becomes beta · itself.
            let e = self.engine(OP)?;
            for &(o, s) in spans.iter().filter(|s| s.1 > 0) {
                let oc = od + (o * n * oe.size()) as u64;
                let none = Operand::dense(0, elem(x.dtype()), 1, 0);
                self.gemm(&e, OP, (s, n, 0), none, none, (oc, oe), 0, 1, beta)?;
            }
            return Ok(());
        }
        let (lanes, vary) = group_gemms(OP, spans, Varying::M)?;
        let e = self.engine(OP)?;
        self.ck(
            OP,
            e.gpu.with_gemm_lanes(lanes, |l| {
                let mut i = 0;
                for (g, &(o, s)) in spans.iter().enumerate() {
                    if s == 0 || n == 0 {
                        continue;
                    }
                    let oa = operand(&x, xd.ptr + (o * kx * xs) as u64, false, kx, 0);
                    let ob = operand(&w, wd.ptr + (g * w1 * w2 * ws) as u64, trans_w, w2, 0);
                    let oc = Operand::dense(od + (o * n * oe.size()) as u64, oe, n, 0);
                    l.gemm_varying(i, (s, n, kx), oa, ob, oc, beta, vary)?;
                    i += 1;
                }
                Ok(())
            }),
        )
    }

    /// The groups' `(offset, size)` on the host (one counted read unless they were given
    /// on the host, [`RowGroups::host_spans`]), checked as the CPU backend checks them.
    fn spans(
        &self,
        op: &'static str,
        groups: &RowGroups,
        rows: usize,
    ) -> Result<Vec<(usize, usize)>> {
        if let Some(h) = groups.host_spans() {
            if h.last().is_some_and(|&(o, s)| o + s > rows) {
                return Err(Error::InvalidArgument {
                    op,
                    arg: "groups",
                    value: format!("{} groups over {rows} rows", h.len()),
                    rule: "groups must be non-negative, in order, disjoint and inside the rows",
                });
            }
            return Ok(h.to_vec());
        }
        let sizes = groups.sizes().to_host_i32()?;
        crate::sync::record_host_read();
        let offsets = crate::backend::HostTransfer::to_host(self, groups.offsets())?;
        let crate::storage::CpuStorage::I32(offsets) = offsets else {
            return Err(Error::DTypeMismatch {
                op,
                arg: "groups.offsets",
                expected: "i32",
                got: groups.offsets().dtype(),
            });
        };
        check_spans(op, &offsets, &sizes, rows)
    }
}
