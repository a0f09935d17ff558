//! The deterministic combine steps every engine shares: a reduction in rank order and the
//! row bookkeeping of gather / scatter / all-to-all. Engines move bytes; these functions
//! decide what the bytes mean, so thread ranks and MPI give identical bits.

use megamoe_tensor::{DType, Tensor};

use crate::communicator::ReduceOp;
use crate::error::{CommError, Result};

/// Reduces `parts` (one per rank, indexed by rank) in rank order: `((p0 ∘ p1) ∘ p2) ∘ …`.
///
/// Float parts only (f32 math; a bf16 input is widened, reduced in f32 and rounded back once).
/// The fixed order makes the result identical on every rank and independent of arrival
/// order; it differs from a single-rank sum of the same numbers only by float reassociation.
pub fn reduce_in_rank_order(parts: &[Tensor], op: ReduceOp) -> Result<Tensor> {
    const OP: &str = "reduce_in_rank_order";
    let first = parts.first().ok_or(CommError::InvalidArgument {
        op: OP,
        arg: "parts",
        value: "[]".into(),
        rule: "needs one tensor per rank",
    })?;
    let dtype = first.dtype();
    if !dtype.is_float() {
        return Err(CommError::InvalidArgument {
            op: OP,
            arg: "dtype",
            value: dtype.to_string(),
            rule: "reductions need a float tensor (f32 or bf16)",
        });
    }
    let mut acc = first.clone();
    for p in &parts[1..] {
        acc = match op {
            ReduceOp::Sum | ReduceOp::Mean => acc.add(p)?,
            ReduceOp::Max => acc.maximum(p)?,
        };
    }
    if op == ReduceOp::Mean && parts.len() > 1 {
        acc = acc.scale(1.0 / parts.len() as f32)?;
    }
    Ok(acc.to_dtype(dtype)?)
}

/// Checks every rank passed the same shape and dtype (`what` names the collective).
pub(crate) fn check_same_layout(rank: usize, what: &'static str, parts: &[Tensor]) -> Result<()> {
    let Some(first) = parts.first() else {
        return Ok(());
    };
    for (r, p) in parts.iter().enumerate() {
        if p.dims() != first.dims() || p.dtype() != first.dtype() {
            return Err(CommError::Mismatch {
                rank,
                op: what,
                detail: format!(
                    "rank 0 passed {:?} {} but rank {r} passed {:?} {}",
                    first.dims(),
                    first.dtype(),
                    p.dims(),
                    p.dtype()
                ),
            });
        }
    }
    Ok(())
}

/// Rows `[block·c, (block+1)·c)` of `x` where `c = dim0 / blocks`; errors unless dim 0 is a
/// multiple of `blocks`.
pub(crate) fn row_block(x: &Tensor, blocks: usize, block: usize) -> Result<Tensor> {
    let rows = leading_rows("reduce_scatter", x)?;
    if rows % blocks != 0 {
        return Err(CommError::InvalidArgument {
            op: "reduce_scatter",
            arg: "x.dims()[0]",
            value: rows.to_string(),
            rule:
                "must be a multiple of the communicator size (pad to the chunk rule's padded rows)",
        });
    }
    let c = rows / blocks;
    Ok(x.narrow(0, block * c, c)?)
}

/// Dim 0 of `x` (rank ≥ 1 required).
pub(crate) fn leading_rows(op: &'static str, x: &Tensor) -> Result<usize> {
    x.dims().first().copied().ok_or(CommError::InvalidArgument {
        op,
        arg: "x",
        value: "a rank-0 tensor".into(),
        rule: "needs at least one dimension (rows are dim 0)",
    })
}

/// Checks `x` has `Σ counts` rows.
pub(crate) fn check_rows_sum(op: &'static str, x: &Tensor, counts: &[usize]) -> Result<()> {
    let rows = leading_rows(op, x)?;
    let total: usize = counts.iter().sum();
    if rows != total {
        return Err(CommError::InvalidArgument {
            op,
            arg: "send_rows",
            value: format!("{counts:?} (sum {total})"),
            rule: "must sum to x.dims()[0]",
        });
    }
    Ok(())
}

/// The rows of `x` destined for `dst` under `send_rows`.
pub(crate) fn rows_for(x: &Tensor, send_rows: &[usize], dst: usize) -> Result<Tensor> {
    let start: usize = send_rows[..dst].iter().sum();
    Ok(x.narrow(0, start, send_rows[dst])?)
}

/// Concatenates `pieces` along dim 0; an empty list becomes `[0, rest...]` of `dtype`.
pub(crate) fn cat_rows(pieces: &[Tensor], rest: &[usize], dtype: DType) -> Result<Tensor> {
    if pieces.is_empty() {
        let mut dims = vec![0];
        dims.extend_from_slice(rest);
        return Ok(Tensor::zeros(dims, dtype, megamoe_tensor::Device::Cpu)?);
    }
    let refs: Vec<&Tensor> = pieces.iter().collect();
    Ok(Tensor::cat(&refs, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use megamoe_tensor::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v, [v.len()], Device::Cpu).unwrap()
    }

    #[test]
    fn sum_is_left_to_right_in_rank_order() {
        // 1e8 + 1 - 1e8 in f32: (1e8 + 1) rounds to 1e8, so rank order gives 0, while
        // 1e8 - 1e8 + 1 would give 1. The result must be the rank-order one.
        let parts = [t(&[1e8]), t(&[1.0]), t(&[-1e8])];
        let got = reduce_in_rank_order(&parts, ReduceOp::Sum).unwrap();
        assert_eq!(got.to_host_f32().unwrap(), vec![0.0]);
        let swapped = [t(&[1e8]), t(&[-1e8]), t(&[1.0])];
        let got = reduce_in_rank_order(&swapped, ReduceOp::Sum).unwrap();
        assert_eq!(got.to_host_f32().unwrap(), vec![1.0]);
    }

    #[test]
    fn mean_and_max() {
        let parts = [t(&[1.0, -2.0]), t(&[3.0, -4.0])];
        let mean = reduce_in_rank_order(&parts, ReduceOp::Mean).unwrap();
        assert_eq!(mean.to_host_f32().unwrap(), vec![2.0, -3.0]);
        let max = reduce_in_rank_order(&parts, ReduceOp::Max).unwrap();
        assert_eq!(max.to_host_f32().unwrap(), vec![3.0, -2.0]);
    }

    #[test]
    fn integer_reduction_is_a_named_error() {
        let i = Tensor::from_vec_i32(vec![1], [1], Device::Cpu).unwrap();
        let err = reduce_in_rank_order(&[i.clone(), i], ReduceOp::Sum).unwrap_err();
        assert!(err.to_string().contains("dtype=i32"), "{err}");
    }

    #[test]
    fn bf16_is_reduced_in_f32_and_rounded_once() {
        // 256 + 1 + 1 in bf16 (8 mantissa bits): stepwise bf16 rounding would give 256 twice
        // (256+1 -> 256); one f32 sum gives 258, which bf16 represents exactly.
        let b = |x: f32| {
            Tensor::from_vec_f32(vec![x], [1], Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let got = reduce_in_rank_order(&[b(256.0), b(1.0), b(1.0)], ReduceOp::Sum).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(got.to_host_f32().unwrap(), vec![258.0]);
    }
}
