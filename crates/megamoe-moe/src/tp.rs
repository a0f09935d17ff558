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
