//! Token embedding: `x[n] = W[ids[n]]` for `W [V, H]`, `ids [N]` (i32). Backward is a
//! deterministic scatter-add `dW[ids[n]] += dx[n]` (each row sums its sources in increasing
//! `n`, so the result does not depend on thread count). Saves only `ids`.

use megamoe_tensor::Tensor;

use crate::error::Result;

/// Gathers rows: `w [V, H]`, `ids [N]` → `[N, H]`. Out-of-vocabulary ids are an
/// `IndexOutOfRange` error naming the position.
pub fn embedding_forward(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    Ok(w.index_select(ids)?)
}

/// Accumulates (+=) `dW[ids[n]] += d_x[n]` into `d_w [V, H]`.
pub fn embedding_backward(d_w: &mut Tensor, ids: &Tensor, d_x: &Tensor) -> Result<()> {
    d_w.index_add_rows_acc(ids, d_x, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad_check::{check, randn, Probe};
    use megamoe_tensor::{DType, Device};

    #[test]
    fn embedding_backward_matches_finite_differences_with_repeated_ids() {
        let w = randn(1, &[7, 4], 1.0);
        let ids = Tensor::from_vec_i32(vec![3, 0, 3, 6, 3], [5], Device::Cpu).unwrap();
        let probe = Probe::new(2, &[5, 4]);
        let mut d_w = Tensor::zeros([7, 4], DType::F32, Device::Cpu).unwrap();
        embedding_backward(&mut d_w, &ids, &probe.r).unwrap();
        check("d_w", &w, &d_w, |t| {
            probe.loss(&embedding_forward(t, &ids).unwrap())
        });
    }

    #[test]
    fn embedding_out_of_vocab_id_is_an_error() {
        let w = randn(1, &[4, 2], 1.0);
        let ids = Tensor::from_vec_i32(vec![1, 4], [2], Device::Cpu).unwrap();
        assert!(embedding_forward(&w, &ids).is_err());
    }
}
