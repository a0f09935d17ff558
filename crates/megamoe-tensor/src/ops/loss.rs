//! Cross-entropy loss over logits with integer targets and an ignore index, fused with its
//! gradient (the LM head's loss; llm.c's `crossentropy_softmax_backward`).

use crate::cpu::loss as kernel;
use crate::{Error, Result, Shape, Tensor};

/// The PyTorch default ignore index: rows whose target equals it contribute nothing.
pub const IGNORE_INDEX: i32 = -100;

impl Tensor {
    /// Mean cross-entropy of `logits [N, V]` (self) against `targets [N]` (i32): returns
    /// `(loss, d_logits)` where `loss` is a rank-0 tensor
    /// `L = (1/n_valid) Σ_{valid n} (logsumexp(x_n) − x_n[t_n])` and `d_logits = ∂L/∂x`
    /// `[N, V]` = `(softmax(x_n) − onehot(t_n)) / n_valid` for valid rows, 0 for rows whose
    /// target is `ignore_index`. With no valid row, `L = 0` and `d_logits = 0`.
    /// A target outside `0..V` (other than `ignore_index`) is an
    /// [`Error::IndexOutOfRange`].
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: i32) -> Result<(Tensor, Tensor)> {
        const OP: &str = "cross_entropy";
        self.same_device(OP, targets)?;
        let (n, v) = self.dims2().map_err(|_| self.rank_error(OP, "logits", 2))?;
        if targets.dims() != [n] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: targets.dims().to_vec(),
                rule: "targets must be [N] for logits [N, V]",
            });
        }
        let t = targets.cpu_i32(OP, "targets")?;
        let mut valid = 0usize;
        for (position, &ti) in t.iter().enumerate() {
            if ti == ignore_index {
                continue;
            }
            if ti < 0 || ti as usize >= v {
                return Err(Error::IndexOutOfRange {
                    op: OP,
                    index: ti as i64,
                    position,
                    bound: v,
                });
            }
            valid += 1;
        }
        let scale = if valid == 0 { 0.0 } else { 1.0 / valid as f64 };
        let x = self.cpu_f32(OP, "logits")?;
        let target = |r: usize| {
            if t[r] == ignore_index {
                None
            } else {
                Some(t[r] as usize)
            }
        };
        let (losses, grad) = kernel::cross_entropy(&x, v, target, scale);
        let loss = losses.iter().sum::<f64>() * scale;
        Ok((
            Tensor::cpu_f32_from(vec![loss as f32], Shape::from(Vec::new())),
            Tensor::cpu_f32_from(grad, [n, v]),
        ))
    }
}
