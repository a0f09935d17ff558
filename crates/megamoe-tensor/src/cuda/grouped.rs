//! Grouped matmuls over fixed-stride row groups (static-capacity expert buffers `[G·C, ·]`,
//! [`RowGroups::strided`]): one strided-batched cuBLAS GEMM over all `G` groups of `C` rows,
//! with no host read (graph-capturable). The op's contract holds for any input: rows past
//! a group's size are not multiplied — the forward zeroes them in its output, the
//! accumulating form scales them by `beta` (as the CPU backend), and the weight gradient
//! reads a copy of the narrower operand with those rows zeroed. In a MoE layer the pad rows are already zero,
//! so the masking changes no value; it only costs a pass over one operand. Results are
//! f32 in every precision mode (the static-capacity expert activations stay f32 in
//! bf16-activation mode).

use megamoe_cuda::{Elem, Operand};

use super::matmul::operand;
use super::{dev, CudaBackend};
use crate::ops::matmul::{grouped_dims, wgrad_dims};
use crate::{DType, Result, RowGroups, Tensor};

impl CudaBackend {
    /// `C[g] = op(A[g]) · op(B[g]) (+ beta · C[g])` for the `batch` entries of a
    /// strided-batched product into an f32 `C` (`c_stride` elements apart).
    #[allow(clippy::too_many_arguments)]
    fn batched(
        &self,
        op: &'static str,
        mnk: (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: u64,
        c_stride: usize,
        batch: usize,
        beta: f32,
    ) -> Result<()> {
        let e = self.engine(op)?;
        self.gemm(&e, op, mnk, a, b, (c, Elem::F32), c_stride, batch, beta)
    }

    /// Checks `G·stride ≤ rows`; returns G.
    fn strided_groups(
        &self,
        op: &'static str,
        groups: &RowGroups,
        stride: usize,
        rows: usize,
    ) -> Result<usize> {
        let g = groups.len();
        if g * stride > rows {
            return Err(crate::Error::InvalidArgument {
                op,
                arg: "groups",
                value: format!("{g} groups of stride {stride} over {rows} rows"),
                rule: "strided groups must lie inside the operand's rows",
            });
        }
        Ok(g)
    }

    /// Forward over strided groups: `out [r, n]`, group rows `x·op(w_g)`, every other row 0.
    pub(super) fn strided_matmul(
        &self,
        x: &Tensor,
        groups: &RowGroups,
        stride: usize,
        w: &Tensor,
        trans_w: bool,
    ) -> Result<Tensor> {
        const OP: &str = "grouped_matmul";
        let (r, n, kx) = grouped_dims(OP, x, groups, w, trans_w)?;
        let (w1, w2) = if trans_w { (n, kx) } else { (kx, n) };
        let g = self.strided_groups(OP, groups, stride, r)?;
        let sizes = super::routing::ids(OP, "groups.sizes", groups.sizes())?;
        let (x, w) = self.gemm_pair(x, w)?;
        let (xd, wd) = (dev(OP, &x)?, dev(OP, &w)?);
        let (out, od) = {
            let e = self.engine(OP)?;
            self.empty(&e, [r, n].into(), DType::F32)?
        };
        let body = g * stride * n;
        if r * n > body {
            let e = self.engine(OP)?;
            let tail = megamoe_cuda::tensor::Dev::f32(od.ptr + (body * 4) as u64);
            // SAFETY: the rows past the groups, inside the fresh [r, n] output.
            self.ck(OP, unsafe { e.tk.fill(&e.gpu, tail, r * n - body, 0.0) })?;
        }
        let oa = operand(&x, xd.ptr, false, kx, stride * kx);
        let ob = operand(&w, wd.ptr, trans_w, w2, w1 * w2);
        self.batched(OP, (stride, n, kx), oa, ob, od.ptr, stride * n, g, 0.0)?;
        let e = self.engine(OP)?;
        // SAFETY: out holds g·stride·n f32 in its first rows; sizes holds g i32.
        self.ck(OP, unsafe {
            e.rk.zero_pad_rows(&e.gpu, od.ptr, sizes, (g, stride, n), e.err.ptr())
        })?;
        Ok(out)
    }

    /// `out = beta · out + x·op(w_g)` on the group rows, `beta · out` on the others (the
    /// CPU backend's semantics; `beta = 0` overwrites).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn strided_matmul_acc(
        &self,
        out: &mut Tensor,
        x: &Tensor,
        groups: &RowGroups,
        stride: usize,
        w: &Tensor,
        trans_w: bool,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul";
        // The fresh product is zero outside the groups.
        let product = self.strided_matmul(x, groups, stride, w, trans_w)?;
        let pd = dev(OP, &product)?;
        let len = out.numel();
        self.in_place(OP, out, |e, od| {
            // SAFETY: out and product have the same shape ([rows, n] f32).
            unsafe { e.rk.axpby(&e.gpu, od.ptr, pd.ptr, len, beta) }
        })
    }

    /// `out[g] = beta · out[g] + dy_gᵀ · x_g` over the rows inside each group.
    pub(super) fn strided_wgrad_acc(
        &self,
        out: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        groups: &RowGroups,
        stride: usize,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul_wgrad";
        let (r, n, k) = wgrad_dims(OP, dy, x, groups)?;
        let g = self.strided_groups(OP, groups, stride, r)?;
        let sizes = super::routing::ids(OP, "groups.sizes", groups.sizes())?;
        let (dy, x) = self.gemm_pair(dy, x)?;
        // Zero the rows outside the groups in a copy of the narrower operand.
        let masked = |t: &Tensor, cols: usize| -> Result<Tensor> {
            let src = dev(OP, t)?;
            let e = self.engine(OP)?;
            let (m, md) = self.empty(&e, [g * stride, cols].into(), t.dtype())?;
            // SAFETY: t holds at least g·stride rows of `cols`, m exactly that.
            self.ck(OP, unsafe {
                e.rk.mask_rows(&e.gpu, src, md.ptr, sizes, (g, stride, cols))
            })?;
            Ok(m)
        };
        let (dy, x) = if n <= k {
            (masked(&dy, n)?, x)
        } else {
            let xm = masked(&x, k)?;
            (dy, xm)
        };
        let (dd, xd) = (dev(OP, &dy)?, dev(OP, &x)?);
        self.in_place(OP, out, |_, _| Ok(()))?;
        let od = dev(OP, out)?;
        let oa = operand(&dy, dd.ptr, true, n, stride * n);
        let ob = operand(&x, xd.ptr, false, k, stride * k);
        self.batched(OP, (n, k, stride), oa, ob, od.ptr, n * k, g, beta)
    }
}
