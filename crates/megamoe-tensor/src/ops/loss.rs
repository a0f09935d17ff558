//! Cross-entropy loss over logits with integer targets and an ignore index, fused with its
//! gradient (the LM head's loss; llm.c's `crossentropy_softmax_backward`).

use crate::{Error, Result, Tensor};

/// The loss kernel family of a [`Backend`](crate::backend::Backend).
pub trait LossKernels {
    /// `(mean CE over rows whose target ≠ ignore_index (rank 0), d logits [N, V])` for
    /// `logits [N, V]`, `targets [N]` i32; a target outside `0..V` (other than
    /// `ignore_index`) is an [`Error::IndexOutOfRange`].
    fn cross_entropy(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        ignore_index: i32,
    ) -> Result<(Tensor, Tensor)>;
}

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
        let (n, _) = self.dims2().map_err(|_| self.rank_error(OP, "logits", 2))?;
        if targets.dims() != [n] {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: targets.dims().to_vec(),
                rule: "targets must be [N] for logits [N, V]",
            });
        }
        self.backend().cross_entropy(self, targets, ignore_index)
    }
}
