//! FSDP2 dim-0 shard maps and the single-process form of distributed Muon (Moonlight
//! Algorithm 1).
//!
//! Row maps come from `megamoe_plan::shard` (never re-derived here):
//! - [`ShardRule::Chunk`] (FSDP2 / DTensor, parameters): `c = ceil(n/W)`, rank r holds
//!   `[r·c, min(n, (r+1)·c))`, trailing ranks may hold 0 rows, buffers padded to `c`;
//! - [`ShardRule::Even`] (seed `shard0_bounds`): `n/W` rows each, the first `n % W` one more.
//!
//! [`ShardedMuon::step`] runs Algorithm 1 over `W` shards held in one process:
//! reduce-scatter (mean) the ranks' gradients → momentum on each local shard → all-gather
//! the full `U` (bf16 when NS runs in bf16) → NS5 on the full matrix → each rank keeps its
//! row slice → update its local shard. Momentum and the update are elementwise and NS sees
//! the full matrix, so the result equals single-rank Muon (layout invariance); padding rows
//! are zeros and are cut before NS. A multi-rank version replaces the three collectives
//! with `megamoe-comm` calls.

use megamoe_plan::{chunk, local_grad_slice, shard0_bounds, RowShard};
use megamoe_tensor::{DType, Tensor};

use crate::error::{OptimError, Result};
use crate::muon::{apply_update, momentum_step, orthogonalize, MuonConfig, NsPrecision};

/// The collective a rank's sharded optimizer step needs
/// ([`Optimizer::step_sharded`](crate::Optimizer::step_sharded)): the full matrix of a
/// row-sharded Muon parameter, from every rank's rows.
///
/// Every rank gathers the full `U` and runs NS5 on it itself (the same input gives the
/// same bits on every rank), then keeps its own rows: one all-gather per matrix, no
/// broadcast back, at the price of every rank computing every NS5 (the Moonlight
/// algorithm as published; the round-robin owner alternative trades that compute for a
/// second collective).
pub trait RowGather {
    /// `local` is this rank's rows of parameter `name`'s Muon input (momentum applied).
    /// Returns the full matrix (every rank's rows in rank order, padding cut) and this
    /// rank's rows in it, or `None` when `local` already holds whole matrices (an expert
    /// bank sharded over experts, or a parameter that is not sharded). Errors must name
    /// what failed ([`OptimError::Gather`]).
    fn gather_rows(&mut self, name: &str, local: &Tensor) -> Result<Option<(Tensor, RowShard)>>;

    /// This rank's part of `o`, the orthogonalised full matrix of a [`RowGather::gather_rows`]
    /// that returned `rows`: those rows (the default). A gather along another dimension
    /// (tensor-parallel columns) cuts the same range of that dimension instead.
    fn keep(&mut self, name: &str, o: &Tensor, rows: RowShard) -> Result<Tensor> {
        let _ = name;
        Ok(o.narrow(0, rows.start, rows.len)?)
    }
}

/// A dim-0 split rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardRule {
    /// FSDP2 `chunk`: ceil(n/W) rows per rank, trailing ranks may be empty.
    Chunk,
    /// Seed `even` (`shard0_bounds`): sizes differ by at most one row.
    Even,
}

impl ShardRule {
    /// The rows of `rank` for `n` rows over `world` ranks.
    pub fn rows(self, n: usize, world: usize, rank: usize) -> RowShard {
        match self {
            ShardRule::Chunk => chunk(n, world, rank),
            ShardRule::Even => {
                let (start, len) = shard0_bounds(n, world, rank);
                RowShard {
                    start,
                    len,
                    padded_len: len,
                }
            }
        }
    }

    /// Row maps of every rank.
    pub fn map(self, n: usize, world: usize) -> Vec<RowShard> {
        (0..world.max(1)).map(|r| self.rows(n, world, r)).collect()
    }

    /// Checks that `rank` holds `local_rows` rows (even rule: seed `local_grad_slice`).
    pub fn check_local(
        self,
        n: usize,
        local_rows: usize,
        world: usize,
        rank: usize,
    ) -> Result<RowShard> {
        match self {
            ShardRule::Even => Ok(local_grad_slice(n, local_rows, world, rank)?),
            ShardRule::Chunk => {
                let s = chunk(n, world, rank);
                if s.len != local_rows {
                    return Err(OptimError::InvalidArgument {
                        field: "local shard rows",
                        value: format!("{local_rows} (rank {rank}, chunk shard length {})", s.len),
                        rule: "must equal the chunk rule's rows for this rank",
                    });
                }
                Ok(s)
            }
        }
    }
}

fn check_world(world: usize, shards: usize) -> Result<()> {
    if world == 0 || shards != world {
        return Err(OptimError::InvalidArgument {
            field: "world",
            value: format!("{world} (with {shards} shards)"),
            rule: "must be >= 1 and equal the number of shards",
        });
    }
    Ok(())
}

/// `t` with zero rows appended up to `rows` along dim 0.
fn pad_rows(t: &Tensor, rows: usize) -> Result<Tensor> {
    let have = t.dims().first().copied().unwrap_or(0);
    if have >= rows {
        return Ok(t.clone());
    }
    let mut dims = t.dims().to_vec();
    dims[0] = rows - have;
    let zeros = Tensor::zeros(dims, t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], 0)?)
}

/// Splits a full tensor into the local row shards of `rule` (unpadded).
pub fn shard_rows(full: &Tensor, rule: ShardRule, world: usize) -> Result<Vec<Tensor>> {
    let n = full.dim(0)?;
    rule.map(n, world)
        .iter()
        .map(|s| Ok(full.narrow(0, s.start, s.len)?))
        .collect()
}

/// All-gather of row shards: each is padded to its `padded_len`, the padded buffers are
/// concatenated in rank order and the result is cut to `n` rows (the unpad view).
pub fn all_gather_rows(shards: &[Tensor], rule: ShardRule, n: usize) -> Result<Tensor> {
    let world = shards.len();
    check_world(world, shards.len())?;
    let mut padded = Vec::with_capacity(world);
    for (r, s) in shards.iter().enumerate() {
        let map = rule.check_local(n, s.dim(0)?, world, r)?;
        padded.push(pad_rows(s, map.padded_len)?);
    }
    let refs: Vec<&Tensor> = padded.iter().collect();
    let cat = Tensor::cat(&refs, 0)?;
    // Even-rule buffers are unpadded, chunk-rule ones cover ≥ n rows: cut to n.
    Ok(cat.narrow(0, 0, n)?)
}

/// Reduce-scatter with mean: `rank_grads[r]` is rank r's full-size gradient; returns each
/// rank's rows of `(1/W) Σ_r rank_grads[r]`, summed in rank order over padded buffers.
pub fn reduce_scatter_mean(rank_grads: &[Tensor], rule: ShardRule) -> Result<Vec<Tensor>> {
    let world = rank_grads.len();
    check_world(world, world)?;
    let n = rank_grads[0].dim(0)?;
    let maps = rule.map(n, world);
    let padded_total: usize = maps.iter().map(|s| s.padded_len).sum::<usize>().max(n);
    let mut sum = pad_rows(&rank_grads[0].to_dtype(DType::F32)?, padded_total)?;
    for g in &rank_grads[1..] {
        sum.add_assign(&pad_rows(g, padded_total)?)?;
    }
    let mean = sum.scale(1.0 / world as f32)?;
    let mut out = Vec::with_capacity(world);
    let mut offset = 0;
    for s in &maps {
        // Rank r's padded buffer starts at Σ earlier padded lengths; its real rows lead it.
        out.push(mean.narrow(0, offset, s.len)?);
        offset += s.padded_len;
    }
    Ok(out)
}

/// Distributed Muon over `world` row shards held in one process (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardedMuon {
    /// Dim-0 split rule of the parameter.
    pub rule: ShardRule,
    /// Muon settings (momentum, Nesterov, scale, λ, NS precision).
    pub cfg: MuonConfig,
    /// Fused row blocks of the FULL matrix (empty = not fused).
    pub blocks: Vec<usize>,
}

impl ShardedMuon {
    /// One step. `param_shards[r]` / `momentum_shards[r]` are rank r's local rows (updated in
    /// place); `rank_grads[r]` is rank r's full-size gradient before the data-parallel
    /// reduction. `decay` turns λ on. Works for 2-D matrices and `[E, out, in]` expert banks
    /// (sharded over experts).
    pub fn step(
        &self,
        param_shards: &mut [Tensor],
        momentum_shards: &mut [Tensor],
        rank_grads: &[Tensor],
        lr: f64,
        decay: bool,
    ) -> Result<()> {
        let world = param_shards.len();
        check_world(world, momentum_shards.len())?;
        check_world(world, rank_grads.len())?;
        let n = rank_grads[0].dim(0)?;
        for (r, p) in param_shards.iter().enumerate() {
            self.rule.check_local(n, p.dim(0)?, world, r)?;
        }
        // 1. reduce-scatter the gradient over the DP group (mean).
        let local_grads = reduce_scatter_mean(rank_grads, self.rule)?;
        // 2. momentum on the local shard.
        let mut local_u = Vec::with_capacity(world);
        for (m, g) in momentum_shards.iter_mut().zip(&local_grads) {
            local_u.push(momentum_step(m, g, self.cfg.momentum, self.cfg.nesterov)?);
        }
        // 3. gather the full U (bf16 on the wire when NS runs in bf16).
        if self.cfg.ns_precision == NsPrecision::Bf16 {
            for u in &mut local_u {
                *u = u.to_dtype(DType::BF16)?;
            }
        }
        let full_u = all_gather_rows(&local_u, self.rule, n)?;
        // 4. NS5 on the full matrix (every rank computes the same O).
        let o = orthogonalize(&full_u, &self.blocks, self.cfg.scale, self.cfg.ns_precision)?;
        // 5. keep the local slice, 6. update the local shard.
        let wd = if decay { self.cfg.weight_decay } else { 0.0 };
        for (r, p) in param_shards.iter_mut().enumerate() {
            let s = self.rule.rows(n, world, r);
            let o_local = o.narrow(0, s.start, s.len)?;
            *p = apply_update(p, &o_local, lr, wd)?.to_dtype(p.dtype())?;
        }
        Ok(())
    }
}
