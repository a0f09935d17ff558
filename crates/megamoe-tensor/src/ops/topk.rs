//! Top-k over the last dimension (router expert selection).

use crate::{Error, Result, Tensor};

/// The top-k kernel family of a [`Backend`](crate::backend::Backend).
pub trait TopkKernels {
    /// `(values f32, indices i32)` of the `k` largest entries of each row of `x [.., E]`,
    /// descending, ties to the lower index (`k ≤ E`).
    fn topk(&self, x: &Tensor, k: usize) -> Result<(Tensor, Tensor)>;
}

impl Tensor {
    /// The `k` largest entries of each row of `x [.., E]`: `(values [.., k] f32, indices
    /// [.., k] i32)`, sorted descending. Ties go to the LOWER index first (+0.0 and −0.0 are
    /// equal); NaN ranks above every number. `k = 0` gives empty outputs; `k > E` is an error.
    pub fn topk(&self, k: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "topk";
        let e = match self.dims().last() {
            Some(&e) => e,
            None => return Err(self.rank_error(OP, "x", 1)),
        };
        if k > e {
            return Err(Error::InvalidArgument {
                op: OP,
                arg: "k",
                value: k.to_string(),
                rule: "must be <= the last dimension E",
            });
        }
        self.backend().topk(self, k)
    }
}
