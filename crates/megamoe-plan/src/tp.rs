//! Tensor-parallel head partition (seed `tp_partition_shapes.py`).
//!
//! Each TP rank holds whole query heads and whole KV heads; with tp ≤ 1 the
//! seed returns the full counts.

use crate::error::{PlanError, Result};
use serde::{Deserialize, Serialize};

/// Heads held by one TP rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadPartition {
    /// Query heads per TP rank.
    pub num_heads: usize,
    /// KV heads per TP rank.
    pub num_kv_heads: usize,
    /// TP size.
    pub tp_size: usize,
}

/// Seed `partition_mla_heads`: heads per rank; error when `num_heads % tp != 0`.
pub fn partition_heads(num_heads: usize, tp_size: usize) -> Result<usize> {
    if tp_size <= 1 {
        return Ok(num_heads);
    }
    if !num_heads.is_multiple_of(tp_size) {
        return Err(PlanError::HeadsNotDivisibleByTp {
            n_heads: num_heads,
            tp: tp_size,
        });
    }
    Ok(num_heads / tp_size)
}

/// Seed `partition_mla_qkv_projector`: query and KV heads per rank; errors name
/// the count that does not divide.
pub fn partition_qkv_heads(
    num_heads: usize,
    num_kv_heads: usize,
    tp_size: usize,
) -> Result<HeadPartition> {
    if tp_size <= 1 {
        return Ok(HeadPartition {
            num_heads,
            num_kv_heads,
            tp_size,
        });
    }
    let heads = partition_heads(num_heads, tp_size)?;
    if !num_kv_heads.is_multiple_of(tp_size) {
        return Err(PlanError::KvHeadsNotDivisibleByTp {
            n_kv_heads: num_kv_heads,
            tp: tp_size,
        });
    }
    Ok(HeadPartition {
        num_heads: heads,
        num_kv_heads: num_kv_heads / tp_size,
        tp_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_split_evenly_over_tp() {
        let p = partition_qkv_heads(32, 8, 4).unwrap();
        assert_eq!((p.num_heads, p.num_kv_heads), (8, 2));
        // tp = 1 (or 0) returns full counts, as in the seed.
        assert_eq!(partition_qkv_heads(6, 3, 1).unwrap().num_heads, 6);
        assert_eq!(partition_heads(6, 0).unwrap(), 6);
    }

    #[test]
    fn heads_not_divisible_by_tp_is_an_error() {
        assert_eq!(
            partition_heads(6, 4),
            Err(PlanError::HeadsNotDivisibleByTp { n_heads: 6, tp: 4 })
        );
        assert_eq!(
            partition_qkv_heads(8, 2, 4),
            Err(PlanError::KvHeadsNotDivisibleByTp {
                n_kv_heads: 2,
                tp: 4
            })
        );
    }
}
