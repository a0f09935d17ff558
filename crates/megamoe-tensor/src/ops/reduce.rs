//! Reductions: over everything (to a rank-0 tensor), over the last dimension, over rows.
//! Results stay on the device; read them with `to_scalar_f32` / `to_host_f32` (a sync).
//! Sums accumulate in f64 in a fixed order (see `cpu/reduce.rs`).

use crate::{Result, Tensor};

/// A reduction of every element to a rank-0 f32 tensor ([`ReduceKernels::reduce_all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceAll {
    /// Σ xᵢ (0 when empty).
    Sum,
    /// Σ xᵢ / n (NaN when empty).
    Mean,
    /// Σ xᵢ².
    SumSquares,
    /// √(Σ xᵢ²).
    Norm,
}

/// A reduction over the last dimension, `[.., H] → [..]` ([`ReduceKernels::reduce_last`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceLast {
    /// Σ (f64 accumulation).
    Sum,
    /// Mean (f64 accumulation).
    Mean,
    /// Max (−∞ for H = 0; NaN-ignoring).
    Max,
    /// `log Σ exp`, stable, in f64.
    LogSumExp,
}

/// The reduction kernel family of a [`Backend`](crate::backend::Backend).
pub trait ReduceKernels {
    /// Every element of `x` reduced by `op` (f64 accumulation), rank-0 f32.
    fn reduce_all(&self, x: &Tensor, op: ReduceAll) -> Result<Tensor>;
    /// `x [.., H]` reduced over its last dimension by `op`, f32 `[..]`.
    fn reduce_last(&self, x: &Tensor, op: ReduceLast) -> Result<Tensor>;
    /// Σ over every leading dimension of `x [.., H]`: `[H]`.
    fn sum_rows(&self, x: &Tensor) -> Result<Tensor>;
    /// Euclidean norm of each row of `x [R, ..]` (trailing dims flattened): `[R]`.
    fn norm_rows(&self, x: &Tensor) -> Result<Tensor>;
    /// Exclusive prefix sum of a rank-1 i32 tensor; errors if a partial sum leaves i32.
    fn exclusive_cumsum_i32(&self, x: &Tensor) -> Result<Tensor>;
}

impl Tensor {
    /// Exclusive prefix sum of a rank-1 i32 tensor: `out[g] = Σ_{i<g} x[i]` (`[G]` i32),
    /// e.g. group offsets from group sizes. Errors if a partial sum leaves i32.
    pub fn exclusive_cumsum_i32(&self) -> Result<Tensor> {
        self.expect_rank("exclusive_cumsum_i32", "x", 1)?;
        self.backend().exclusive_cumsum_i32(self)
    }

    /// Euclidean norm of each row of `self [R, ..]` (trailing dims flattened): `[R]`, each
    /// entry the same bits as `self.narrow(0, r, 1).norm()` (f64 sum in the same pieces).
    pub fn norm_rows(&self) -> Result<Tensor> {
        if self.rank() == 0 {
            return Err(self.rank_error("norm_rows", "x", 1));
        }
        self.backend().norm_rows(self)
    }

    /// Σ of all elements, as a rank-0 tensor (0 for an empty tensor).
    pub fn sum_all(&self) -> Result<Tensor> {
        self.backend().reduce_all(self, ReduceAll::Sum)
    }

    /// Mean of all elements, as a rank-0 tensor (NaN for an empty tensor).
    pub fn mean_all(&self) -> Result<Tensor> {
        self.backend().reduce_all(self, ReduceAll::Mean)
    }

    /// Σ xᵢ² of all elements, as a rank-0 tensor.
    pub fn sum_squares(&self) -> Result<Tensor> {
        self.backend().reduce_all(self, ReduceAll::SumSquares)
    }

    /// Euclidean norm √(Σ xᵢ²) of all elements, as a rank-0 tensor.
    pub fn norm(&self) -> Result<Tensor> {
        self.backend().reduce_all(self, ReduceAll::Norm)
    }

    fn reduce_last(&self, op: &'static str, kind: ReduceLast) -> Result<Tensor> {
        if self.rank() == 0 {
            return Err(self.rank_error(op, "x", 1));
        }
        self.backend().reduce_last(self, kind)
    }

    /// Σ over the last dimension: `[.., H] → [..]`.
    pub fn sum_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("sum_last_dim", ReduceLast::Sum)
    }

    /// Mean over the last dimension: `[.., H] → [..]`.
    pub fn mean_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("mean_last_dim", ReduceLast::Mean)
    }

    /// Max over the last dimension: `[.., H] → [..]` (−∞ for H = 0; NaN-ignoring).
    pub fn max_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("max_last_dim", ReduceLast::Max)
    }

    /// `log Σ exp` over the last dimension: `[.., H] → [..]`, computed stably in f64.
    pub fn logsumexp_last_dim(&self) -> Result<Tensor> {
        self.reduce_last("logsumexp_last_dim", ReduceLast::LogSumExp)
    }

    /// Σ over rows: `[N, .., H] → [H]` (every leading dimension summed; bias gradients).
    pub fn sum_rows(&self) -> Result<Tensor> {
        if self.rank() == 0 {
            return Err(self.rank_error("sum_rows", "x", 1));
        }
        self.backend().sum_rows(self)
    }
}
