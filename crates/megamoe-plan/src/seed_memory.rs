//! The seed's simple memory formulas, kept as named functions with their exact
//! constants (seeds `memory_budget_sample.py`, `ep_capacity_planning.py`,
//! `fsdp_sharding_sample.py`). The bucketed model in [`crate::memory`] is
//! what the planner uses; these stay for comparison and scripting.

use serde::{Deserialize, Serialize};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Inputs of [`estimate_fsdp_memory`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FsdpMemoryInputs {
    /// Total parameter memory (GB) before sharding.
    pub total_param_gb: f64,
    /// Total optimizer memory (GB) before sharding.
    pub total_optimizer_gb: f64,
    /// Activation GB per unit of device batch size at `base_seq_len`.
    pub activations_per_dbs_gb: f64,
    /// Device batch size.
    pub dbs: usize,
    /// Sequence length.
    pub seq_len: usize,
    /// Data-parallel ranks.
    pub dp: usize,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// FSDP on.
    pub fsdp_enabled: bool,
}

/// Seed `estimate_fsdp_memory` (base_seq_len 4096, overhead 1.5 GB):
/// sharding = dp if fsdp and dp > 1 else 1; params and optimizer / sharding;
/// activations = dbs · (seq_len / 4096) · per_dbs / max(tp, 1); + 1.5.
pub fn estimate_fsdp_memory(i: &FsdpMemoryInputs) -> f64 {
    const BASE_SEQ_LEN: f64 = 4096.0;
    const OVERHEAD_GB: f64 = 1.5;
    let sharding = if i.fsdp_enabled && i.dp > 1 {
        i.dp.max(1)
    } else {
        1
    } as f64;
    let params = i.total_param_gb / sharding;
    let optimizer = i.total_optimizer_gb / sharding;
    let activations = i.dbs as f64 * (i.seq_len as f64 / BASE_SEQ_LEN) * i.activations_per_dbs_gb
        / i.tp.max(1) as f64;
    params + optimizer + activations + OVERHEAD_GB
}

/// Output of [`estimate_memory_per_device`] (GiB).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerDeviceMemory {
    /// Parameter GiB.
    pub params_gb: f64,
    /// Optimizer GiB.
    pub optimizer_gb: f64,
    /// Sum.
    pub total_gb: f64,
}

/// Seed `estimate_memory_per_device` (tp_shardable_frac 0.65; seed defaults
/// bytes_per_param 2.0, optimizer_multiplier 10.0):
/// per stage = P / pp; TP reduction 1 − 0.65·(1 − 1/tp); FSDP 1/dp;
/// params = … · bytes_per_param, optimizer = … · optimizer_multiplier, in GiB.
pub fn estimate_memory_per_device(
    pp: usize,
    dp: usize,
    tp: usize,
    total_params: u64,
    bytes_per_param: f64,
    optimizer_multiplier: f64,
) -> PerDeviceMemory {
    const TP_SHARDABLE_FRAC: f64 = 0.65;
    let per_stage = total_params as f64 / pp.max(1) as f64;
    let tp_reduction = 1.0 - TP_SHARDABLE_FRAC * (1.0 - 1.0 / tp.max(1) as f64);
    let per_device = per_stage * tp_reduction;
    let fsdp = 1.0 / dp.max(1) as f64;
    let params_gb = per_device * bytes_per_param * fsdp / GIB;
    let optimizer_gb = per_device * optimizer_multiplier * fsdp / GIB;
    PerDeviceMemory {
        params_gb,
        optimizer_gb,
        total_gb: params_gb + optimizer_gb,
    }
}

/// Output of [`estimate_rank_memory`] (GiB, each rounded to 2 places).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankMemoryEstimate {
    /// Always 1.0 in the seed (meta-init on).
    pub meta_init: f64,
    /// Parameter shard.
    pub param_shard_gb: f64,
    /// Optimizer state.
    pub optimizer_state_gb: f64,
    /// Activations (passed through).
    pub activation_gb: f64,
    /// Communication buffers (passed through).
    pub comm_buffer_gb: f64,
    /// Sum (rounded after summing unrounded parts).
    pub total_rank_gb: f64,
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Seed `estimate_rank_memory` (defaults bytes_per_param 2, optimizer_multiplier 4.0):
/// shard = P·1e9·bytes / world / GiB; optimizer = shard · multiplier; rounded to 2 places.
pub fn estimate_rank_memory(
    total_params_billion: f64,
    world_size: usize,
    bytes_per_param: f64,
    optimizer_multiplier: f64,
    activation_gb: f64,
    comm_buffer_gb: f64,
) -> RankMemoryEstimate {
    let param_bytes = total_params_billion * 1e9 * bytes_per_param;
    let shard = param_bytes / world_size.max(1) as f64 / GIB;
    let optimizer = shard * optimizer_multiplier;
    let total = shard + optimizer + activation_gb + comm_buffer_gb;
    RankMemoryEstimate {
        meta_init: 1.0,
        param_shard_gb: round2(shard),
        optimizer_state_gb: round2(optimizer),
        activation_gb: round2(activation_gb),
        comm_buffer_gb: round2(comm_buffer_gb),
        total_rank_gb: round2(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsdp_memory_matches_seed_formula() {
        // params 16/4 = 4, optimizer 32/4 = 8, activations 2·(8192/4096)·3/2 = 6, + 1.5 → 19.5.
        let i = FsdpMemoryInputs {
            total_param_gb: 16.0,
            total_optimizer_gb: 32.0,
            activations_per_dbs_gb: 3.0,
            dbs: 2,
            seq_len: 8192,
            dp: 4,
            tp: 2,
            fsdp_enabled: true,
        };
        assert!((estimate_fsdp_memory(&i) - 19.5).abs() < 1e-12);
        // FSDP off: no sharding → 16 + 32 + 6 + 1.5 = 55.5.
        let off = FsdpMemoryInputs {
            fsdp_enabled: false,
            ..i
        };
        assert!((estimate_fsdp_memory(&off) - 55.5).abs() < 1e-12);
    }

    #[test]
    fn memory_per_device_matches_seed_formula() {
        // 8e9 params, pp 2, tp 4, dp 2: per stage 4e9; tp_reduction = 1 − 0.65·0.75 = 0.5125;
        // per device 2.05e9; params 2.05e9·2/2 = 2.05e9 B = 1.90921 GiB;
        // optimizer 2.05e9·10/2 = 1.025e10 B = 9.54606 GiB.
        let m = estimate_memory_per_device(2, 2, 4, 8_000_000_000, 2.0, 10.0);
        assert!((m.params_gb - 2.05e9 / GIB).abs() < 1e-9);
        assert!((m.params_gb - 1.90921).abs() < 1e-5);
        assert!((m.optimizer_gb - 9.54606).abs() < 1e-5);
        assert!((m.total_gb - (m.params_gb + m.optimizer_gb)).abs() < 1e-12);
    }

    #[test]
    fn rank_memory_matches_seed_and_rounds_two_places() {
        // 7B params, 8 ranks, 2 B/param: 14e9/8 = 1.75e9 B = 1.62981 GiB → 1.63;
        // optimizer ×4 = 6.51926 → 6.52; total 1.62981+6.51926+2+0.5 = 10.64907 → 10.65.
        let r = estimate_rank_memory(7.0, 8, 2.0, 4.0, 2.0, 0.5);
        assert_eq!(r.param_shard_gb, 1.63);
        assert_eq!(r.optimizer_state_gb, 6.52);
        assert_eq!(r.total_rank_gb, 10.65);
        assert_eq!(r.meta_init, 1.0);
    }
}
