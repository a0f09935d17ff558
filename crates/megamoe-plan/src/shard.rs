//! FSDP2-style dim-0 shard math. Two split rules exist; both are kept, named:
//!
//! - [`chunk`] (FSDP2 / DTensor `Shard(0)`, used for parameters): c = ceil(n/W)
//!   rows per rank; rank r gets [r·c, min(n, (r+1)·c)); trailing ranks may get 0
//!   rows; shards are padded to c rows for the collectives (unpad is a view).
//! - [`shard0_bounds`] (seed `fsdp2_muon_local_shard_sample.py`, the `even`
//!   rule, exact): base = n / W, rem = n % W, start = r·base + min(r, rem),
//!   len = base + (r < rem).

use crate::error::{PlanError, Result};
use crate::Activation;
use serde::{Deserialize, Serialize};

/// Rows of one rank's dim-0 shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowShard {
    /// First global row.
    pub start: usize,
    /// Rows held (0 allowed for trailing `chunk` ranks).
    pub len: usize,
    /// Rows of the padded buffer used in all-gather / reduce-scatter (`chunk`: c; `even`: len).
    pub padded_len: usize,
}

/// FSDP2 `chunk` rule for `n` rows over `world` ranks (`world` ≥ 1; 0 is treated as 1).
pub fn chunk(n: usize, world: usize, rank: usize) -> RowShard {
    let world = world.max(1);
    let c = n.div_ceil(world);
    let start = (rank * c).min(n);
    let end = ((rank + 1) * c).min(n);
    RowShard {
        start,
        len: end - start,
        padded_len: c,
    }
}

/// Seed `shard0_bounds(total_rows, world_size, rank)` → (start, length), the `even` rule.
/// `world_size` 0 is treated as 1.
pub fn shard0_bounds(total_rows: usize, world_size: usize, rank: usize) -> (usize, usize) {
    let world = world_size.max(1);
    let base = total_rows / world;
    let rem = total_rows % world;
    let start = rank * base + rank.min(rem);
    let len = base + usize::from(rank < rem);
    (start, len)
}

/// Seed `local_grad_slice`: the local row slice of this rank, checking that the
/// rows the caller holds equal the `even` shard length (error names both numbers).
pub fn local_grad_slice(
    total_rows: usize,
    local_rows: usize,
    world_size: usize,
    rank: usize,
) -> Result<RowShard> {
    let (start, len) = shard0_bounds(total_rows, world_size, rank);
    if len != local_rows {
        return Err(PlanError::LocalShardMismatch {
            local_rows,
            shard_len: len,
        });
    }
    Ok(RowShard {
        start,
        len,
        padded_len: len,
    })
}

/// Seed `qkv_local_split_sizes(splits, local_row_dim)`: scale the fused q/k/v
/// row split to a local shard. If full ≤ 0, local ≤ 0 or local == full, return
/// the splits unchanged; else each part = part·local // full and the remainder
/// goes to the last part.
pub fn qkv_local_split_sizes(splits: &[usize], local_row_dim: usize) -> Vec<usize> {
    let full: usize = splits.iter().sum();
    if full == 0 || local_row_dim == 0 || local_row_dim == full {
        return splits.to_vec();
    }
    let mut scaled: Vec<usize> = splits.iter().map(|p| p * local_row_dim / full).collect();
    let rem = local_row_dim - scaled.iter().sum::<usize>();
    if rem > 0 {
        if let Some(last) = scaled.last_mut() {
            *last += rem;
        }
    }
    scaled
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_rule_gives_trailing_ranks_zero_rows() {
        // n=10, W=4: c = ceil(10/4) = 3 → [0,3), [3,6), [6,9), [9,10).
        let got: Vec<_> = (0..4)
            .map(|r| chunk(10, 4, r))
            .map(|s| (s.start, s.len))
            .collect();
        assert_eq!(got, vec![(0, 3), (3, 3), (6, 3), (9, 1)]);
        assert!((0..4).all(|r| chunk(10, 4, r).padded_len == 3));
        // n=5, W=4: c = 2 → [0,2), [2,4), [4,5), [5,5) — the last rank is empty.
        assert_eq!(chunk(5, 4, 3).len, 0);
        assert_eq!(chunk(5, 4, 3).start, 5);
    }

    #[test]
    fn even_rule_matches_seed_shard0_bounds() {
        // n=10, W=4: base 2, rem 2 → (0,3), (3,3), (6,2), (8,2).
        let got: Vec<_> = (0..4).map(|r| shard0_bounds(10, 4, r)).collect();
        assert_eq!(got, vec![(0, 3), (3, 3), (6, 2), (8, 2)]);
        // The two rules differ for the same n and W (rank 2: chunk 3 rows, even 2 rows).
        assert_ne!(chunk(10, 4, 2).len, shard0_bounds(10, 4, 2).1);
    }

    #[test]
    fn local_grad_slice_checks_the_row_count() {
        let s = local_grad_slice(10, 2, 4, 3).unwrap();
        assert_eq!((s.start, s.len), (8, 2));
        let err = local_grad_slice(10, 3, 4, 3).unwrap_err();
        assert_eq!(
            err,
            PlanError::LocalShardMismatch {
                local_rows: 3,
                shard_len: 2
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("local_rows=3") && msg.contains("shard length=2"),
            "{msg}"
        );
    }

    #[test]
    fn qkv_split_scales_and_gives_remainder_to_last() {
        // GQA splits (q 512, k 128, v 128) = 768 full rows; local 384 → exact halves.
        assert_eq!(
            qkv_local_split_sizes(&[512, 128, 128], 384),
            vec![256, 64, 64]
        );
        // local 100: 512·100//768 = 66, 128·100//768 = 16, 16 → sum 98, remainder 2 → last 18.
        assert_eq!(
            qkv_local_split_sizes(&[512, 128, 128], 100),
            vec![66, 16, 18]
        );
        // Unchanged cases: local == full, local == 0, full == 0.
        assert_eq!(qkv_local_split_sizes(&[4, 2, 2], 8), vec![4, 2, 2]);
        assert_eq!(qkv_local_split_sizes(&[4, 2, 2], 0), vec![4, 2, 2]);
        assert_eq!(qkv_local_split_sizes(&[0, 0], 3), vec![0, 0]);
    }
}

/// FSDP dim-0 shard rows of one (TP-local) matrix over its data-parallel group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixShard {
    /// The trainer's parameter name (`{i}`: any layer where it repeats).
    pub name: String,
    /// Dim-0 rows of the TP-local tensor (stacked experts: local experts El).
    pub rows: usize,
    /// Elements per row.
    pub row_elems: usize,
    /// Data-parallel group size N the rows are sharded over.
    pub group: usize,
    /// `chunk` rule: rows per rank ceil(rows/N) (also the padded shard size).
    pub chunk_rows: usize,
    /// `chunk` rule: rows of the last rank (may be 0).
    pub chunk_last_rows: usize,
    /// `even` rule: fewest and most rows of a rank.
    pub even_rows: (usize, usize),
}

impl MatrixShard {
    fn new(name: &str, rows: usize, row_elems: usize, group: usize) -> MatrixShard {
        let group = group.max(1);
        let last = chunk(rows, group, group - 1);
        let min = shard0_bounds(rows, group, group - 1).1;
        let max = shard0_bounds(rows, group, 0).1;
        MatrixShard {
            name: name.to_string(),
            rows,
            row_elems,
            group,
            chunk_rows: last.padded_len,
            chunk_last_rows: last.len,
            even_rows: (min, max),
        }
    }
}

/// Shard rows of the biggest matrices of `plan` as the trainer holds them: TP-local
/// shapes (attention, dense FFN and shared experts split over TP; embedding, head, router
/// and routed experts whole on every TP rank), dense parameters over the dense DP group
/// dp·ep·cp, expert banks over dp·cp; largest first.
pub fn fsdp_shard_table(plan: &crate::Plan) -> Vec<MatrixShard> {
    let m = &plan.model;
    let tp = plan.parallel.tp;
    let (nd, ne) = (plan.mesh.dense_dp_size(), plan.mesh.expert_dp_size());
    let mut out = vec![
        MatrixShard::new("model.embed_tokens.weight", m.vocab_size, m.d_model, nd),
        MatrixShard::new(
            "model.layers.{i}.self_attn.q_proj.weight",
            m.n_heads * m.head_dim / tp,
            m.d_model,
            nd,
        ),
        MatrixShard::new(
            "model.layers.{i}.self_attn.o_proj.weight",
            m.d_model,
            m.n_heads * m.head_dim / tp,
            nd,
        ),
    ];
    if !m.tie_embeddings {
        out.push(MatrixShard::new(
            "lm_head.weight",
            m.vocab_size,
            m.d_model,
            nd,
        ));
    }
    let has_dense = plan
        .moe
        .as_ref()
        .is_none_or(|moe| moe.moe_layers.len() < m.n_layers);
    if has_dense {
        out.push(MatrixShard::new(
            "model.layers.{i}.mlp.up_proj.weight",
            m.ffn_hidden / tp,
            m.d_model,
            nd,
        ));
    }
    if let Some(moe) = &plan.moe {
        // Stacked [El, h, d] (whole on every TP rank): FSDP shards dim 0, the local
        // experts. Swiglu banks hold gate and up fused: [El, 2h, d].
        let (name, rows_in) = match moe.activation {
            Activation::SwiGlu => ("model.layers.{i}.mlp.experts.gate_up_proj", 2),
            Activation::Relu2 | Activation::Gelu => ("model.layers.{i}.mlp.experts.up_proj", 1),
        };
        out.push(MatrixShard::new(
            name,
            moe.experts_per_ep_rank,
            rows_in * moe.expert_hidden * m.d_model,
            ne,
        ));
        out.push(MatrixShard::new(
            "model.layers.{i}.mlp.router.weight",
            moe.routed_experts,
            m.d_model,
            nd,
        ));
        if let Some(s) = moe.shared {
            out.push(MatrixShard::new(
                "model.layers.{i}.mlp.shared_experts.up_proj",
                s.total_hidden / tp,
                m.d_model,
                nd,
            ));
        }
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.rows * s.row_elems));
    out
}
