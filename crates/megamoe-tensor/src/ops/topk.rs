//! Top-k over the last dimension (router expert selection).

use crate::cpu::topk as kernel;
use crate::{Error, Result, Tensor};

impl Tensor {
    /// The `k` largest entries of each row of `x [.., E]`: `(values [.., k] f32, indices
    /// [.., k] i32)`, sorted descending. Ties go to the LOWER index first (+0.0 and −0.0 are
    /// equal); NaN ranks above every number. `k = 0` gives empty outputs; `k > E` is an error.
    pub fn topk(&self, k: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "topk";
        let (lead, e) = match self.dims().split_last() {
            Some((&e, lead)) => (lead.to_vec(), e),
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
        let x = self.cpu_f32(OP, "x")?;
        let (v, i) = if e == 0 {
            (Vec::new(), Vec::new())
        } else {
            kernel::topk(&x, e, k)
        };
        let mut shape = lead;
        shape.push(k);
        Ok((
            Tensor::cpu_f32_from(v, shape.clone()),
            Tensor::cpu_i32_from(i, shape),
        ))
    }
}
