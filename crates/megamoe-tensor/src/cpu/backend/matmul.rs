//! [`MatmulKernels`] on the CPU: the `gemm` crate behind `cpu/matmul.rs`. Group spans are
//! read from the [`RowGroups`] tensors on the host (free on the CPU).

use crate::backend::CpuBackend;
use crate::cpu::matmul::{self as kernel, Operand};
use crate::ops::groups::RowGroups;
use crate::ops::matmul::MatmulKernels;
use crate::ops::matmul::{grouped_dims, wgrad_dims};
use crate::{Result, Tensor};

/// Logical `(rows, cols)` of a rank-2 operand, transposed if `trans`.
fn logical(t: &Tensor, trans: bool) -> Result<(usize, usize)> {
    let (a, b) = t.dims2()?;
    Ok(if trans { (b, a) } else { (a, b) })
}

/// `None` for `beta == 0` (overwrite), else `Some(beta)`.
fn beta_of(beta: f32) -> Option<f32> {
    if beta == 0.0 {
        None
    } else {
        Some(beta)
    }
}

impl MatmulKernels for CpuBackend {
    fn matmul(&self, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
        const OP: &str = "matmul";
        let (m, k) = logical(a, trans_a)?;
        let (_, n) = logical(b, trans_b)?;
        let ad = a.cpu_f32(OP, "a")?;
        let bd = b.cpu_f32(OP, "b")?;
        let mut out = vec![0.0f32; m * n];
        let (a, b) = (
            Operand {
                data: &ad,
                trans: trans_a,
            },
            Operand {
                data: &bd,
                trans: trans_b,
            },
        );
        kernel::gemm_into(&mut out, m, n, k, a, b, None, true);
        Ok(Tensor::cpu_f32_from(out, [m, n]))
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
        let ad = a.cpu_f32(OP, "a")?;
        let bd = b.cpu_f32(OP, "b")?;
        let o = out.cpu_f32_mut(OP)?;
        let (a, b) = (
            Operand {
                data: &ad,
                trans: trans_a,
            },
            Operand {
                data: &bd,
                trans: trans_b,
            },
        );
        kernel::gemm_into(o, m, n, k, a, b, beta_of(beta), true);
        Ok(())
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
        let ad = a.cpu_f32(OP, "a")?;
        let bd = b.cpu_f32(OP, "b")?;
        let out = kernel::bmm(
            batch,
            m,
            n,
            k,
            Operand {
                data: &ad,
                trans: trans_a,
            },
            Operand {
                data: &bd,
                trans: trans_b,
            },
            b_shared,
        );
        Ok(Tensor::cpu_f32_from(out, [batch, m, n]))
    }

    fn grouped_matmul(
        &self,
        x: &Tensor,
        groups: &RowGroups,
        w: &Tensor,
        trans_w: bool,
    ) -> Result<Tensor> {
        const OP: &str = "grouped_matmul";
        let (rows, n, k) = grouped_dims(OP, x, groups, w, trans_w)?;
        let spans = groups.cpu_spans(OP, rows)?;
        let xd = x.cpu_f32(OP, "x")?;
        let wd = w.cpu_f32(OP, "w")?;
        let mut out = vec![0.0f32; rows * n];
        kernel::grouped_into(&mut out, &xd, &spans, &wd, trans_w, n, k, None);
        Ok(Tensor::cpu_f32_from(out, [rows, n]))
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
        const OP: &str = "grouped_matmul_acc";
        let (rows, n, k) = grouped_dims(OP, x, groups, w, trans_w)?;
        let spans = groups.cpu_spans(OP, rows)?;
        let xd = x.cpu_f32(OP, "x")?;
        let wd = w.cpu_f32(OP, "w")?;
        let o = out.cpu_f32_mut(OP)?;
        kernel::grouped_into(o, &xd, &spans, &wd, trans_w, n, k, beta_of(beta));
        Ok(())
    }

    fn grouped_matmul_wgrad(&self, dy: &Tensor, x: &Tensor, groups: &RowGroups) -> Result<Tensor> {
        const OP: &str = "grouped_matmul_wgrad";
        let (rows, n, k) = wgrad_dims(OP, dy, x, groups)?;
        let spans = groups.cpu_spans(OP, rows)?;
        let dyd = dy.cpu_f32(OP, "dy")?;
        let xd = x.cpu_f32(OP, "x")?;
        let mut out = vec![0.0f32; spans.len() * n * k];
        kernel::grouped_wgrad_into(&mut out, &dyd, &xd, &spans, n, k, None);
        Ok(Tensor::cpu_f32_from(out, [spans.len(), n, k]))
    }

    fn grouped_matmul_wgrad_acc(
        &self,
        out: &mut Tensor,
        dy: &Tensor,
        x: &Tensor,
        groups: &RowGroups,
        beta: f32,
    ) -> Result<()> {
        const OP: &str = "grouped_matmul_wgrad_acc";
        let (rows, n, k) = wgrad_dims(OP, dy, x, groups)?;
        let spans = groups.cpu_spans(OP, rows)?;
        let dyd = dy.cpu_f32(OP, "dy")?;
        let xd = x.cpu_f32(OP, "x")?;
        let o = out.cpu_f32_mut(OP)?;
        kernel::grouped_wgrad_into(o, &dyd, &xd, &spans, n, k, beta_of(beta));
        Ok(())
    }
}
