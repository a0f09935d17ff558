//! Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): the ranks of a TP group each hold
//! a slice of every dense matrix — column-parallel `[F/tp, H]` up / gate projections,
//! row-parallel `[H, F/tp]` down projections — and meet at one all-reduce per branch.
//!
//! ```text
//! forward   x (replicated) → f = identity → local GEMMs → partial y → g = all-reduce → y
//! backward  d_y (replicated) → g' = identity → local GEMMs → partial d_x → f' = all-reduce
//! ```
//! [`TensorParallel::reduce`] is both `g` (forward) and `f'` (backward); the identities
//! need no code. The sum runs in rank order, so every rank of the group gets bit-identical
//! replicated activations, and the replicated parameters fed by them (norms, router,
//! routed experts, embedding, head) get identical gradients on every TP rank.
//!
//! Sequence parallelism (Megatron-LM, Korthikanti et al. 2022) keeps the residual stream
//! between the split branches sharded along the sequence: rank `r` holds tokens
//! `[r·T/tp, (r+1)·T/tp)` of every sequence of the micro-batch (`[B·T/tp, H]`, sequence-major
//! like the whole `[B·T, H]`). [`TensorParallel::seq_gather`] (all-gather along T) then
//! replaces `f` and [`TensorParallel::seq_reduce_scatter`] (reduce-scatter along T)
//! replaces `g`; each is the other's backward. [`TensorParallel::seq_shard`] keeps this
//! rank's rows of a replicated tensor (no communication).
//!
//! In this crate the shared experts are column/row-parallel (each rank holds `Fs/tp` of
//! their hidden units, [`TensorParallel::slice`]); the routed experts stay whole on every
//! TP rank (they are sharded over E by expert parallelism instead).

use std::ops::Range;
use std::sync::Arc;

use megamoe_comm::{Communicator, ReduceOp};
use megamoe_tensor::Tensor;

use crate::error::{Error, Result};

/// A tensor-parallel group: this rank's place in it and the all-reduce joining the slices.
#[derive(Clone)]
pub struct TensorParallel {
    comm: Arc<dyn Communicator>,
}

impl std::fmt::Debug for TensorParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorParallel")
            .field("rank", &self.rank())
            .field("size", &self.size())
            .finish()
    }
}

impl TensorParallel {
    /// The group is `comm` (its rank is the TP rank, its size the TP degree).
    pub fn new(comm: Arc<dyn Communicator>) -> TensorParallel {
        TensorParallel { comm }
    }

    /// This rank's index in the group.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The TP degree.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// The slice of `n` units (heads, hidden columns) this rank holds:
    /// `[rank·n/tp, (rank+1)·n/tp)`; `n` must divide by the TP degree (error names `field`).
    pub fn slice(&self, field: &'static str, n: usize) -> Result<Range<usize>> {
        tp_slice(field, n, self.rank(), self.size())
    }

    /// Collective over the group: the sum of every rank's partial `x` (rank order; the same
    /// tensor on every rank).
    pub fn reduce(&self, partial: &Tensor) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(partial.clone());
        }
        self.comm
            .all_reduce(partial, ReduceOp::Sum)
            .map_err(|e| Error::TensorParallel(Box::new(e)))
    }
}

impl TensorParallel {
    /// Tokens per sequence of a rank's sequence shard: `t / tp`, or a named error when the
    /// TP degree does not divide the sequence length.
    pub fn seq_shard_len(&self, t: usize) -> Result<usize> {
        let size = self.size();
        if size == 0 || !t.is_multiple_of(size) {
            return Err(Error::Config {
                field: "model.seq_len",
                value: format!("{t} (parallel.tp = {size}, parallel.sp = true)"),
                rule: "must be divisible by parallel.tp under sequence parallelism (each TP \
                       rank holds seq_len / tp tokens of every sequence)",
            });
        }
        Ok(t / size)
    }

    /// `(b, t, h)` of a whole `[b·t, h]` tensor, checked.
    fn seq_dims(x: &Tensor, b: usize, per_rank: bool, size: usize) -> Result<(usize, usize)> {
        let (rows, h) = match x.dims() {
            &[rows, h] if b > 0 && rows.is_multiple_of(b) => (rows, h),
            _ => {
                return Err(Error::Tokens {
                    tokens: x.dims().first().copied().unwrap_or(0),
                    rule: "sequence parallelism needs a [B·T, H] tensor whose rows divide \
                           into the micro-batch's B sequences"
                        .to_string(),
                })
            }
        };
        let t = rows / b * if per_rank { size } else { 1 };
        Ok((t, h))
    }

    /// This rank's sequence shard of the replicated `[b·t, h]` `full`: rows
    /// `[rank·t/tp, (rank+1)·t/tp)` of every sequence, `[b·t/tp, h]` (a copy).
    pub fn seq_shard(&self, full: &Tensor, b: usize) -> Result<Tensor> {
        let (t, h) = Self::seq_dims(full, b, false, self.size())?;
        let tl = self.seq_shard_len(t)?;
        let x = full.reshape([b, t, h])?.narrow(1, self.rank() * tl, tl)?;
        // with one sequence the narrow is a view of `full`: copy so that `full` can go
        let x = if b == 1 { x.deep_copy()? } else { x };
        Ok(x.reshape([b * tl, h])?)
    }

    /// Collective: the whole `[b·t, h]` from every rank's sequence shard `[b·t/tp, h]`
    /// (all-gather along T; the backward of [`TensorParallel::seq_reduce_scatter`]).
    pub fn seq_gather(&self, shard: &Tensor, b: usize) -> Result<Tensor> {
        let size = self.size();
        let (t, h) = Self::seq_dims(shard, b, true, size)?;
        if size == 1 {
            return Ok(shard.clone());
        }
        let all = self
            .comm
            .all_gather(shard)
            .map_err(|e| Error::TensorParallel(Box::new(e)))?;
        if b == 1 {
            return Ok(all);
        }
        // [tp, b, t/tp·h] (rank-major) → [b, tp, t/tp·h] (sequence-major)
        let tl = t / size;
        let x = all.reshape([size, b, tl * h])?.permute(&[1, 0, 2])?;
        Ok(x.reshape([b * t, h])?)
    }

    /// Collective: this rank's sequence shard `[b·t/tp, h]` of the group sum of every
    /// rank's partial `[b·t, h]` (reduce-scatter along T, rank order; the backward of
    /// [`TensorParallel::seq_gather`]).
    pub fn seq_reduce_scatter(&self, partial: &Tensor, b: usize) -> Result<Tensor> {
        let size = self.size();
        let (t, h) = Self::seq_dims(partial, b, false, size)?;
        let tl = self.seq_shard_len(t)?;
        if size == 1 {
            return Ok(partial.clone());
        }
        let rank_major = if b == 1 {
            partial.clone()
        } else {
            partial
                .reshape([b, size, tl * h])?
                .permute(&[1, 0, 2])?
                .reshape([b * t, h])?
        };
        self.comm
            .reduce_scatter(&rank_major, ReduceOp::Sum)
            .map_err(|e| Error::TensorParallel(Box::new(e)))
    }
}

/// `[rank·n/size, (rank+1)·n/size)`, or a named error when `size` does not divide `n`.
pub fn tp_slice(field: &'static str, n: usize, rank: usize, size: usize) -> Result<Range<usize>> {
    if size == 0 || !n.is_multiple_of(size) || rank >= size {
        return Err(Error::Config {
            field,
            value: format!("{n} (parallel.tp = {size})"),
            rule: "must be divisible by parallel.tp (each TP rank holds an equal slice)",
        });
    }
    let per = n / size;
    Ok(rank * per..(rank + 1) * per)
}
