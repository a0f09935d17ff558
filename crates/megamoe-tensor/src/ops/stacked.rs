//! Several linear layers on one input as ONE product: `x · [W_0; W_1; …]ᵀ` with the
//! outputs side by side `[M, Σ N_i]` (a fused q|k|v projection), its input gradient
//! `d_y · [W_0; W_1; …]` and its weight gradients `g_i += d_y[:, block i]ᵀ · x`. The weights
//! stay separate tensors (`[N_i, K]` each); a backend whose weights (or their low-precision
//! copies) and gradients lie back to back in memory runs each as one GEMM of `N = Σ N_i`
//! (or `K = Σ N_i`), and otherwise one GEMM per weight on column blocks.
//!
//! The default kernels (the CPU backend's) are the per-weight ops themselves — the outputs
//! `matmul`'d one by one and concatenated, the input gradient one `matmul` and `matmul_acc`
//! per weight in order, the weight gradients one `matmul_acc` each — so their bits are
//! exactly those of running the layers separately.

use crate::backend::CpuBackend;
use crate::{Error, Result, Tensor};

/// The stacked-projection kernel family of a [`Backend`](crate::backend::Backend); shapes
/// as in the matching [`Tensor`] ops, validated by them. Every method has the per-weight
/// ops as its default body.
pub trait StackedKernels {
    /// `x · [w_0; …]ᵀ`: `[M, Σ N_i]`.
    fn matmul_stacked(&self, x: &Tensor, ws: &[&Tensor]) -> Result<Tensor> {
        stacked_forward(x, ws)
    }

    /// `d_y · [w_0; …]`: `[M, K]`.
    fn matmul_stacked_input_grad(&self, d_y: &Tensor, ws: &[&Tensor]) -> Result<Tensor> {
        stacked_input_grad(d_y, ws)
    }

    /// `g_i += d_y[:, block i]ᵀ · x` for every `i` (deferred zeros overwritten, as
    /// [`Tensor::matmul_acc`] does).
    fn matmul_stacked_wgrad_acc(
        &self,
        gs: &mut [&mut Tensor],
        d_y: &Tensor,
        x: &Tensor,
    ) -> Result<()> {
        stacked_wgrad_acc(gs, d_y, x)
    }
}

impl StackedKernels for CpuBackend {}

/// The column block of each weight: `(first column, N_i)`.
pub(crate) fn blocks(ws: &[&Tensor]) -> Vec<(usize, usize)> {
    let mut col = 0;
    ws.iter()
        .map(|w| {
            let n = w.dims()[0];
            col += n;
            (col - n, n)
        })
        .collect()
}

/// The default [`StackedKernels::matmul_stacked`]: one `matmul` per weight, concatenated.
pub(crate) fn stacked_forward(x: &Tensor, ws: &[&Tensor]) -> Result<Tensor> {
    let ys = ws
        .iter()
        .map(|w| x.matmul(w, false, true))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&ys.iter().collect::<Vec<_>>(), 1)
}

/// The default [`StackedKernels::matmul_stacked_input_grad`]: `matmul` of the first block,
/// `matmul_acc` of the others, in order.
pub(crate) fn stacked_input_grad(d_y: &Tensor, ws: &[&Tensor]) -> Result<Tensor> {
    let mut d_x: Option<Tensor> = None;
    for (w, (col, n)) in ws.iter().zip(blocks(ws)) {
        let block = d_y.narrow(1, col, n)?;
        match d_x.as_mut() {
            None => d_x = Some(block.matmul(w, false, false)?),
            Some(acc) => acc.matmul_acc(&block, w, false, false, 1.0)?,
        }
    }
    d_x.ok_or(Error::InvalidArgument {
        op: "matmul_stacked_input_grad",
        arg: "ws",
        value: "0 weights".into(),
        rule: "at least one weight",
    })
}

/// The default [`StackedKernels::matmul_stacked_wgrad_acc`]: one `matmul_acc` per weight.
pub(crate) fn stacked_wgrad_acc(gs: &mut [&mut Tensor], d_y: &Tensor, x: &Tensor) -> Result<()> {
    let mut col = 0;
    for g in gs.iter_mut() {
        let n = g.dims()[0];
        g.matmul_acc(&d_y.narrow(1, col, n)?, x, true, false, 1.0)?;
        col += n;
    }
    Ok(())
}

/// Checks `ws` (at least one; `[N_i, K]` each, `K` = `k`, on `x`'s device) and returns
/// `Σ N_i`.
fn check_weights(op: &'static str, x: &Tensor, ws: &[&Tensor], k: usize) -> Result<usize> {
    if ws.is_empty() {
        return Err(Error::InvalidArgument {
            op,
            arg: "ws",
            value: "0 weights".into(),
            rule: "at least one weight",
        });
    }
    let mut n = 0;
    for w in ws {
        x.same_device(op, w)?;
        match *w.dims() {
            [r, c] if c == k => n += r,
            _ => {
                return Err(Error::ShapeMismatch {
                    op,
                    lhs: x.dims().to_vec(),
                    rhs: w.dims().to_vec(),
                    rule: "every weight must be [N_i, K] with K the input's columns",
                })
            }
        }
    }
    Ok(n)
}

impl Tensor {
    /// `x · [w_0; w_1; …]ᵀ` for `x [M, K]` (`self`) and weights `w_i [N_i, K]` (Linear
    /// layout `[out, in]`): the layers' outputs side by side, `[M, Σ N_i]` (columns
    /// `Σ_{j<i} N_j ..` are `x · w_iᵀ`). One GEMM where the backend finds the weights back to
    /// back (see the module doc).
    pub fn matmul_stacked(&self, ws: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "matmul_stacked";
        let (_, k) = self.dims2().map_err(|_| self.rank_error(OP, "x", 2))?;
        check_weights(OP, self, ws, k)?;
        self.backend().matmul_stacked(self, ws)
    }

    /// Input gradient of [`Tensor::matmul_stacked`]: `d_y [M, Σ N_i]` (`self`) times
    /// `[w_0; w_1; …]`, `[M, K]` (fresh).
    pub fn matmul_stacked_input_grad(&self, ws: &[&Tensor]) -> Result<Tensor> {
        const OP: &str = "matmul_stacked_input_grad";
        let (_, n) = self.dims2().map_err(|_| self.rank_error(OP, "d_y", 2))?;
        let k = ws
            .first()
            .map_or(0, |w| w.dims().get(1).copied().unwrap_or(0));
        if check_weights(OP, self, ws, k)? != n {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: vec![k, n],
                rule: "d_y must have Σ N_i columns",
            });
        }
        self.backend().matmul_stacked_input_grad(self, ws)
    }

    /// Weight gradients of [`Tensor::matmul_stacked`], accumulated in place:
    /// `g_i += d_y[:, block i]ᵀ · x` for `d_y [M, Σ N_i]`, `x [M, K]` and `g_i [N_i, K]`
    /// (copy-on-write where a buffer is shared; a `g_i` that is exactly one deferred-zero
    /// range is overwritten, as [`Tensor::matmul_acc`] does). One GEMM where the backend
    /// finds the gradients back to back in one buffer (a model's flat gradients).
    pub fn matmul_stacked_wgrad_acc(
        gs: &mut [&mut Tensor],
        d_y: &Tensor,
        x: &Tensor,
    ) -> Result<()> {
        const OP: &str = "matmul_stacked_wgrad_acc";
        let (m, n) = d_y.dims2().map_err(|_| d_y.rank_error(OP, "d_y", 2))?;
        let (mx, k) = x.dims2().map_err(|_| x.rank_error(OP, "x", 2))?;
        let refs: Vec<&Tensor> = gs.iter().map(|g| &**g).collect();
        if m != mx || check_weights(OP, d_y, &refs, k)? != n {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: d_y.dims().to_vec(),
                rhs: x.dims().to_vec(),
                rule: "d_y [M, Σ N_i] and x [M, K] for gradients [N_i, K]",
            });
        }
        if gs.iter().any(|g| g.overlaps(d_y) || g.overlaps(x)) {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "gs",
                value: "a gradient overlapping d_y or x".into(),
                rule: "the gradients must not share elements with the operands",
            });
        }
        d_y.backend().matmul_stacked_wgrad_acc(gs, d_y, x)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::test_bits as bits;
    use crate::{Device, Tensor};

    fn r(seed: u64, dims: &[usize]) -> Tensor {
        Tensor::randn_named(seed, "x", dims.to_vec(), 1.0, Device::Cpu).unwrap()
    }

    #[test]
    fn stacked_products_are_the_per_weight_products_bitwise() {
        let (x, wq, wk, d_y) = (r(1, &[6, 5]), r(2, &[4, 5]), r(3, &[2, 5]), r(4, &[6, 8]));
        let wv = r(5, &[2, 5]);
        let ws = [&wq, &wk, &wv];
        let y = x.matmul_stacked(&ws).unwrap();
        assert_eq!(y.dims(), [6, 8]);
        for (w, col, n) in [(&wq, 0, 4), (&wk, 4, 2), (&wv, 6, 2)] {
            let want = x.matmul(w, false, true).unwrap();
            assert_eq!(bits(&y.narrow(1, col, n).unwrap()), bits(&want));
        }
        let d_x = d_y.matmul_stacked_input_grad(&ws).unwrap();
        let mut want = d_y
            .narrow(1, 0, 4)
            .unwrap()
            .matmul(&wq, false, false)
            .unwrap();
        want.matmul_acc(&d_y.narrow(1, 4, 2).unwrap(), &wk, false, false, 1.0)
            .unwrap();
        want.matmul_acc(&d_y.narrow(1, 6, 2).unwrap(), &wv, false, false, 1.0)
            .unwrap();
        assert_eq!(bits(&d_x), bits(&want));
        let (mut gq, mut gk, mut gv) = (r(6, &[4, 5]), r(7, &[2, 5]), r(8, &[2, 5]));
        let old = [gq.clone(), gk.clone(), gv.clone()];
        Tensor::matmul_stacked_wgrad_acc(&mut [&mut gq, &mut gk, &mut gv], &d_y, &x).unwrap();
        for ((g, mut o), (col, n)) in [gq, gk, gv].iter().zip(old).zip([(0, 4), (4, 2), (6, 2)]) {
            o.matmul_acc(&d_y.narrow(1, col, n).unwrap(), &x, true, false, 1.0)
                .unwrap();
            assert_eq!(bits(g), bits(&o));
        }
    }

    #[test]
    fn stacked_shape_errors_name_the_rule() {
        let (x, w, bad) = (r(1, &[6, 5]), r(2, &[4, 5]), r(3, &[4, 3]));
        let e = x.matmul_stacked(&[&w, &bad]).unwrap_err().to_string();
        assert!(e.contains("[N_i, K]"), "{e}");
        let e = x.matmul_stacked(&[]).unwrap_err().to_string();
        assert!(e.contains("at least one weight"), "{e}");
        let e = r(4, &[6, 7])
            .matmul_stacked_input_grad(&[&w])
            .unwrap_err()
            .to_string();
        assert!(e.contains("Σ N_i columns"), "{e}");
    }
}
