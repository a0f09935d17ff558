//! Per-rank memory model (docs/memory.md).
//!
//! For each pipeline rank class (all ranks with the same pp coordinate hold the
//! same shapes) the model fills the eight buckets of [`MemoryBreakdown`]:
//!
//! - **parameters**: local count × 4 B: the trainer keeps f32 parameters, which are
//!   the master weights of a bf16 run; bf16 runs add the GEMM weights' bf16 copies
//!   (2 B per matrix parameter, made once per step and kept between steps). ZeRO-3
//!   divides by the parameter's DP group and adds a gather buffer of the two largest
//!   local layers (FSDP prefetch);
//! - **gradients**: f32, 4 B/param; ZeRO ≥ 2 divides by the DP group;
//! - **optimizer**: AdamW 2 moments (8 B) or Muon 1 moment (4 B) for hidden
//!   matrices, f32; ZeRO ≥ 1 divides by the DP group.
//!   See [`zero_model_state_bytes`] for the ZeRO paper's formulas;
//! - **activations**: what the trainer keeps, tensor by tensor
//!   ([`crate::activation_store`]): the peak of one micro-batch (saved state,
//!   deferred weight-gradient work, logits, the largest workspace) plus the saved
//!   state of the other micro-batches in flight ([`in_flight_layer_microbatches`]
//!   of the schedule), less the MoE part;
//! - **moe_routing**: the MoE part of the saved state (routing, dispatch rows,
//!   expert intermediates) of every micro-batch in flight;
//! - **feature_activations**: GateSkip gates and gated outputs, FlexiDepth
//!   router and adapter activations, and MTP (one block activation + f32
//!   logits per depth, one micro-batch, head rank);
//! - **runtime_reserved**: [`RUNTIME_RESERVE_FRACTION`] of the transient buckets;
//! - **overhead**: [`OVERHEAD_GIB`] per process.
//!
//! [`RankMemory::pool_gb`] is the part a device's memory pool holds (every bucket but
//! the reserve and the per-process overhead): what `megamoe bench step` and the GPU
//! step metrics compare with the pool's measured peak. [`activation_bytes_per_layer`]
//! (Korthikanti et al. 2022) stays as the published reference formula.
//! Known simplifications: distributed Muon's transient full-matrix gather and
//! expert-parallel send/receive buffers are ignored.

use crate::activation_store::{micro_batch_peak, AttentionKernel};
use crate::mesh::Mesh;
use crate::modes::{OptimizerKind, Precision, Recompute, ZeroLevel};
use crate::params::{layer_params, rank_params, ParamCount};
use crate::plan::Plan;
use crate::triage::{dominant_pressure, oom_triage, MemoryBreakdown, MemoryBucket, OomTriage};
use crate::ScheduleKind;
use serde::{Deserialize, Serialize};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Fixed per-process overhead (CUDA context, cuBLAS workspaces, NCCL buffers),
/// the seed's `overhead_gb` of `estimate_fsdp_memory`.
pub const OVERHEAD_GIB: f64 = 1.5;

/// Allocator reserve as a share of the transient buckets (activations, MoE
/// routing, feature activations): a caching allocator keeps freed blocks and
/// splits them, so reserved exceeds allocated by roughly this much on
/// variable-shape workloads. A planning constant, to be calibrated against the
/// GPU pool's counters.
pub const RUNTIME_RESERVE_FRACTION: f64 = 0.10;

/// Bytes per parameter of the model state (ZeRO paper notation).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StateBytes {
    /// Parameter bytes.
    pub param: f64,
    /// Gradient bytes.
    pub grad: f64,
    /// Optimizer bytes (master weights + moments).
    pub optimizer: f64,
}

/// Model-state bytes per rank for Ψ parameters over a DP group of `n` ranks at
/// ZeRO `level`: 0: Ψ(p+g+o); 1: Ψ(p+g) + Ψo/n; 2: Ψp + Ψ(g+o)/n; 3: Ψ(p+g+o)/n.
/// With (p, g, o) = (2, 2, 12) this is the ZeRO paper's 16Ψ, 4Ψ + 12Ψ/N,
/// 2Ψ + 14Ψ/N and 16Ψ/N.
pub fn zero_model_state_bytes(psi: f64, n: usize, level: ZeroLevel, b: StateBytes) -> f64 {
    let n = n.max(1) as f64;
    match level {
        ZeroLevel::Replicated => psi * (b.param + b.grad + b.optimizer),
        ZeroLevel::OptimizerState => psi * (b.param + b.grad) + psi * b.optimizer / n,
        ZeroLevel::Gradients => psi * b.param + psi * (b.grad + b.optimizer) / n,
        ZeroLevel::Parameters => psi * (b.param + b.grad + b.optimizer) / n,
    }
}

/// Activation shape of one layer and micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActivationShape {
    /// s: sequence length per rank (seq_len / cp).
    pub seq: usize,
    /// b: micro-batch size.
    pub batch: usize,
    /// h: hidden size.
    pub hidden: usize,
    /// a: attention heads.
    pub heads: usize,
    /// t: tensor-parallel size.
    pub tp: usize,
    /// Sequence parallel.
    pub sp: bool,
}

/// Activation bytes (bf16) of one layer for one micro-batch (Korthikanti et al. 2022):
/// none: sbh(34 + 5as/h) at t = 1; TP: sbh(10 + 24/t + 5as/(ht)); TP+SP:
/// (sbh/t)(34 + 5as/h); selective: 34sbh/t (with SP or t = 1), sbh(10 + 24/t)
/// (TP without SP); full: 2sbh.
pub fn activation_bytes_per_layer(x: ActivationShape, recompute: Recompute) -> f64 {
    let (s, b, h, a) = (
        x.seq as f64,
        x.batch as f64,
        x.hidden as f64,
        x.heads as f64,
    );
    let t = x.tp.max(1) as f64;
    let sbh = s * b * h;
    let split = x.tp > 1;
    match recompute {
        Recompute::Full => 2.0 * sbh,
        Recompute::Selective if split && !x.sp => sbh * (10.0 + 24.0 / t),
        Recompute::Selective => 34.0 * sbh / t,
        Recompute::None if !split => sbh * (34.0 + 5.0 * a * s / h),
        Recompute::None if x.sp => sbh / t * (34.0 + 5.0 * a * s / h),
        Recompute::None => sbh * (10.0 + 24.0 / t + 5.0 * a * s / (h * t)),
    }
}

/// Layer-micro-batches whose activations are alive at the peak on pipeline rank
/// `rank` (L = n_layers, P = pp, v = vpp, m = microbatches):
/// - gpipe: m · L/P (every micro-batch);
/// - 1f1b, zb-h1: min(P − r, m) · L/P (P on rank 0);
/// - interleaved: min(w_r + 1, m·v) chunks of L/(P·v), w_r = min(2(P−r−1) + (v−1)·P, m·v)
///   (rank 0: L·(1 + (P−1)/(P·v)), the VPP factor);
/// - zbv: min(2P, 2m) chunks of L/(2P) (same peak as 1F1B);
/// - dualpipe: P + 1 stage-chunks of L/P; dualpipev: 2P + 1 chunks of L/(2P).
pub fn in_flight_layer_microbatches(
    kind: ScheduleKind,
    pp: usize,
    vpp: usize,
    microbatches: usize,
    rank: usize,
    n_layers: usize,
) -> f64 {
    let (p, v, m, r) = (
        pp.max(1),
        vpp.max(1),
        microbatches.max(1),
        rank.min(pp.max(1) - 1),
    );
    let l = n_layers as f64;
    let (chunks, layers_per_chunk) = match kind {
        ScheduleKind::GPipe => (m, l / p as f64),
        ScheduleKind::OneFOneB | ScheduleKind::ZbH1 => ((p - r).min(m), l / p as f64),
        ScheduleKind::Interleaved => {
            let w = (2 * (p - r - 1) + (v - 1) * p).min(m * v);
            ((w + 1).min(m * v), l / (p * v) as f64)
        }
        ScheduleKind::Zbv => ((2 * p).min(2 * m), l / (2 * p) as f64),
        ScheduleKind::DualPipe => ((p + 1).min(2 * m), l / p as f64),
        ScheduleKind::DualPipeV => ((2 * p + 1).min(2 * m), l / (2 * p) as f64),
    };
    chunks as f64 * layers_per_chunk
}

/// Memory of one pipeline rank class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankMemory {
    /// Pipeline rank (every rank with this pp coordinate looks the same).
    pub pp_rank: usize,
    /// Number of mesh ranks in this class (world / pp).
    pub ranks: usize,
    /// Transformer layers held (DualPipe: both copies).
    pub layers: usize,
    /// Parameters held per rank after TP/EP splits, before ZeRO.
    pub params: ParamCount,
    /// Layer-micro-batches alive at the peak.
    pub in_flight_layer_microbatches: f64,
    /// GiB per bucket.
    pub breakdown: MemoryBreakdown,
    /// Sum of the buckets, GiB.
    pub total_gb: f64,
    /// What the device's memory pool holds at the peak, GiB: the buckets without the
    /// runtime reserve and the per-process overhead.
    pub pool_gb: f64,
    /// Largest bucket.
    pub dominant: MemoryBucket,
    /// Pinned host memory `train.offload` holds at the end of the forward, GiB (not in
    /// any device bucket).
    #[serde(default)]
    pub offload_host_gb: f64,
}

/// Memory of every rank class plus triage for the worst one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanMemory {
    /// One entry per pipeline rank.
    pub ranks: Vec<RankMemory>,
    /// The pp rank with the largest total.
    pub peak_pp_rank: usize,
    /// Its total, GiB.
    pub peak_gb: f64,
    /// Its [`RankMemory::pool_gb`].
    pub peak_pool_gb: f64,
    /// Device memory to compare against, GiB (e.g. 80 for an H100).
    pub device_gb: Option<f64>,
    /// peak ≤ device, when a device size is given.
    pub fits: Option<bool>,
    /// Triage advice for the peak rank.
    pub triage: OomTriage,
}

/// Runs the memory model over every pipeline rank of `plan` (attention unfused, the
/// trainer's default).
pub fn plan_memory(plan: &Plan, device_gb: Option<f64>) -> PlanMemory {
    plan_memory_with(plan, device_gb, AttentionKernel::Unfused)
}

/// [`plan_memory`] with the attention kernel the device runs.
pub fn plan_memory_with(
    plan: &Plan,
    device_gb: Option<f64>,
    attention: AttentionKernel,
) -> PlanMemory {
    let ranks: Vec<RankMemory> = (0..plan.parallel.pp)
        .map(|r| rank_memory_with(plan, r, attention))
        .collect();
    let peak = ranks
        .iter()
        .fold(None::<&RankMemory>, |best, r| match best {
            Some(b) if b.total_gb >= r.total_gb => Some(b),
            _ => Some(r),
        });
    let (peak_pp_rank, peak_gb, peak_pool_gb, breakdown) = peak
        .map_or((0, 0.0, 0.0, MemoryBreakdown::default()), |r| {
            (r.pp_rank, r.total_gb, r.pool_gb, r.breakdown)
        });
    PlanMemory {
        peak_pp_rank,
        peak_gb,
        peak_pool_gb,
        device_gb,
        fits: device_gb.map(|d| peak_gb <= d),
        triage: oom_triage(&breakdown),
        ranks,
    }
}

/// Elements of `layers`' parameters whose optimizer class is not their sharding class
/// ([`ParamCount`]): (MoE routers `[E, d]`, counted `replicated` but stepped by Muon as
/// matrices; GateSkip's vector gates `W_g [d, d]`, counted `matrix` but stepped by AdamW as
/// gates).
fn optimizer_reclass(plan: &Plan, layers: &[usize]) -> (f64, f64) {
    let d = plan.model.d_model as f64;
    let routers = match &plan.moe {
        Some(moe) => {
            let moe_layers = layers.iter().filter(|&&l| plan.is_moe_layer(l)).count();
            moe_layers as f64 * moe.routed_experts as f64 * d
        }
        None => 0.0,
    };
    let gates = match plan.gate_skip {
        Some(g) if g.gate == crate::modes::GateKind::Vector => layers.len() as f64 * 2.0 * d * d,
        _ => 0.0,
    };
    (routers, gates)
}

/// Bytes of optimizer state per parameter (the f32 parameters are the master weights):
/// AdamW's two moments in `optim.moment_dtype`, or Muon's one f32 momentum.
fn optimizer_bytes(plan: &Plan, muon: bool) -> f64 {
    if muon {
        4.0
    } else {
        2.0 * plan.optim.moment_dtype.bytes() as f64
    }
}

/// The memory model for pipeline rank `pp_rank` (attention unfused).
pub fn rank_memory(plan: &Plan, pp_rank: usize) -> RankMemory {
    rank_memory_with(plan, pp_rank, AttentionKernel::Unfused)
}

/// The memory model for pipeline rank `pp_rank` with the device's attention kernel.
pub fn rank_memory_with(plan: &Plan, pp_rank: usize, attention: AttentionKernel) -> RankMemory {
    let par = &plan.parallel;
    let mesh: Mesh = plan.mesh;
    let precision = plan.train.precision;
    // f32 parameters (a bf16 run's master weights).
    let p_bytes = 4.0;
    let local = rank_params(plan, pp_rank).per_rank(par.tp, par.ep);
    let (nd, ne) = (mesh.dense_dp_size() as f64, mesh.expert_dp_size() as f64);
    let z = par.zero;
    let shard = |level: ZeroLevel, n: f64| if z >= level { n } else { 1.0 };

    // --- model state
    let dense = local.dense_matrix() + local.replicated + local.vocab;
    let mut params_b = dense * p_bytes / shard(ZeroLevel::Parameters, nd)
        + local.expert * p_bytes / shard(ZeroLevel::Parameters, ne);
    let layers: Vec<usize> = plan
        .stages
        .ranks
        .get(pp_rank)
        .map(|rs| rs.layers.iter().flat_map(|r| r.clone()).collect())
        .unwrap_or_default();
    if z == ZeroLevel::Parameters && nd * ne > 1.0 {
        let largest = layers
            .iter()
            .map(|&l| layer_params(plan, l).per_rank(par.tp, par.ep).total())
            .fold(0.0, f64::max);
        params_b += 2.0 * largest * p_bytes;
    }
    if precision == Precision::Bf16 {
        // bf16 copies of every GEMM weight: hidden and expert matrices and the LM head
        // (the embedding's gather reads the f32 table; a tied table is the head).
        let head = if plan.model.tie_embeddings {
            local.vocab
        } else {
            local.vocab / 2.0
        };
        params_b += 2.0 * (local.dense_matrix() + local.expert + head);
    }
    let grads_b = dense * 4.0 / shard(ZeroLevel::Gradients, nd)
        + local.expert * 4.0 / shard(ZeroLevel::Gradients, ne);
    let matrix_bytes = optimizer_bytes(plan, plan.optim.kind == OptimizerKind::Muon);
    let adamw_bytes = optimizer_bytes(plan, false);
    // The optimizer routes by role, not by TP class: routers are Muon matrices, GateSkip
    // gates AdamW parameters.
    let (routers, gates) = optimizer_reclass(plan, &layers);
    let opt_dense = (local.dense_matrix() + routers - gates) * matrix_bytes
        + (local.replicated + local.vocab - routers + gates) * adamw_bytes;
    let opt_b = opt_dense / shard(ZeroLevel::OptimizerState, nd)
        + local.expert * matrix_bytes / shard(ZeroLevel::OptimizerState, ne);

    // --- activations: one micro-batch's peak, plus the saved state of the others in flight
    let rs = plan.stages.ranks.get(pp_rank);
    let has_head = rs.is_some_and(|r| r.has_head);
    let t = plan.batch.tokens_per_micro_batch as f64;
    let shape = ActivationShape {
        seq: plan.model.seq_len / par.cp,
        batch: plan.batch.micro_batch_size,
        hidden: plan.model.d_model,
        heads: plan.model.n_heads,
        tp: par.tp,
        sp: par.sp,
    };
    let act_layer =
        activation_bytes_per_layer(shape, plan.train.recompute) * precision.bytes() as f64 / 2.0;
    let in_flight = in_flight_layer_microbatches(
        par.schedule,
        par.pp,
        par.vpp,
        par.microbatches,
        pp_rank,
        plan.model.n_layers,
    );
    let n_local_layers = layers.len().max(1) as f64;
    let share = |count: usize| count as f64 / n_local_layers;
    let micro = micro_batch_peak(plan, &layers, has_head, attention);
    let others = (in_flight / n_local_layers - 1.0).max(0.0);
    let moe_b = micro.saved_moe * (1.0 + others);
    let act_b = micro.peak + others * (micro.saved - micro.parked) - moe_b;
    let offload_b = micro.parked * (1.0 + others);
    // Every TP rank computes the whole vocabulary's logits (the head is not split).
    let logits_b = 2.0 * t * plan.model.vocab_size as f64 * 4.0;

    // --- feature activations
    let a_bytes = precision.bytes() as f64;
    let d = plan.model.d_model as f64;
    let mut feat_b = 0.0;
    if let Some(g) = plan.gate_skip {
        let gate_width = match g.gate {
            crate::modes::GateKind::Vector => d,
            crate::modes::GateKind::Scalar => 1.0,
        };
        feat_b += 2.0 * t * (gate_width + d) * a_bytes * in_flight;
    }
    if let Some(f) = plan.flexi_depth {
        let adaptive = layers
            .iter()
            .filter(|&&l| l >= f.first_adaptive_layer)
            .count();
        let per = t * f.router_hidden as f64 * 4.0 * 2.0
            + 3.0 * t * f.adapter_hidden as f64 * a_bytes
            + 2.0 * t * d * a_bytes;
        feat_b += per * in_flight * share(adaptive);
    }
    if let (Some(mtp), true) = (&plan.mtp, has_head) {
        feat_b += mtp.depth as f64 * (act_layer + logits_b);
    }

    let reserve_b = RUNTIME_RESERVE_FRACTION * (act_b + moe_b + feat_b);
    let breakdown = MemoryBreakdown {
        params_gb: params_b / GIB,
        gradients_gb: grads_b / GIB,
        optimizer_gb: opt_b / GIB,
        activations_gb: act_b / GIB,
        moe_routing_gb: moe_b / GIB,
        feature_activations_gb: feat_b / GIB,
        runtime_reserved_gb: reserve_b / GIB,
        overhead_gb: OVERHEAD_GIB,
    };
    RankMemory {
        pp_rank,
        ranks: mesh.world() / par.pp.max(1),
        layers: layers.len(),
        params: local,
        in_flight_layer_microbatches: in_flight,
        total_gb: breakdown.total_gb(),
        pool_gb: breakdown.total_gb() - breakdown.runtime_reserved_gb - breakdown.overhead_gb,
        dominant: dominant_pressure(&breakdown),
        offload_host_gb: offload_b / GIB,
        breakdown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_levels_reproduce_the_zero_paper() {
        // ZeRO paper, mixed-precision Adam: (p, g, o) = (2, 2, 12), Ψ = 1, N = 4.
        let b = StateBytes {
            param: 2.0,
            grad: 2.0,
            optimizer: 12.0,
        };
        assert_eq!(
            zero_model_state_bytes(1.0, 4, ZeroLevel::Replicated, b),
            16.0
        );
        assert_eq!(
            zero_model_state_bytes(1.0, 4, ZeroLevel::OptimizerState, b),
            4.0 + 3.0
        );
        assert_eq!(
            zero_model_state_bytes(1.0, 4, ZeroLevel::Gradients, b),
            2.0 + 3.5
        );
        assert_eq!(
            zero_model_state_bytes(1.0, 4, ZeroLevel::Parameters, b),
            4.0
        );
        // Megatron distributed optimizer, bf16 params + f32 grads: 6 + 12/d, d = 8 → 7.5.
        let m = StateBytes {
            param: 2.0,
            grad: 4.0,
            optimizer: 12.0,
        };
        assert_eq!(
            zero_model_state_bytes(1.0, 8, ZeroLevel::OptimizerState, m),
            7.5
        );
    }

    #[test]
    fn activation_formulas_match_korthikanti() {
        // s=2048, b=1, h=4096, a=32: as/h = 16 → sbh(34 + 80) = 114·sbh.
        let x = ActivationShape {
            seq: 2048,
            batch: 1,
            hidden: 4096,
            heads: 32,
            tp: 1,
            sp: false,
        };
        let sbh = 2048.0 * 4096.0;
        assert_eq!(activation_bytes_per_layer(x, Recompute::None), 114.0 * sbh);
        assert_eq!(activation_bytes_per_layer(x, Recompute::Full), 2.0 * sbh);
        assert_eq!(
            activation_bytes_per_layer(x, Recompute::Selective),
            34.0 * sbh
        );
        // t=8 without SP: 10 + 24/8 + 80/8 = 23.
        let t8 = ActivationShape { tp: 8, ..x };
        assert_eq!(activation_bytes_per_layer(t8, Recompute::None), 23.0 * sbh);
        // t=8 with SP: 114/8 = 14.25.
        let sp = ActivationShape { sp: true, ..t8 };
        assert_eq!(activation_bytes_per_layer(sp, Recompute::None), 14.25 * sbh);
        assert_eq!(
            activation_bytes_per_layer(sp, Recompute::Selective),
            34.0 / 8.0 * sbh
        );
    }

    #[test]
    fn in_flight_counts_follow_the_pipeline_spec() {
        use ScheduleKind::*;
        // 1F1B: P on rank 0 → P · L/P = L; last rank 1 · L/P.
        assert_eq!(in_flight_layer_microbatches(OneFOneB, 4, 1, 8, 0, 16), 16.0);
        assert_eq!(in_flight_layer_microbatches(OneFOneB, 4, 1, 8, 3, 16), 4.0);
        // m < P caps at m.
        assert_eq!(in_flight_layer_microbatches(OneFOneB, 4, 1, 2, 0, 16), 8.0);
        // GPipe: all m.
        assert_eq!(in_flight_layer_microbatches(GPipe, 4, 1, 8, 0, 16), 32.0);
        // Interleaved rank 0: L(1 + (P−1)/(P·v)) = 16 · (1 + 3/8) = 22.
        assert_eq!(
            in_flight_layer_microbatches(Interleaved, 4, 2, 8, 0, 16),
            22.0
        );
        // DualPipe: P+1 chunks of L/P = 5 · 4 = 20; DualPipeV: 2P+1 chunks of L/(2P) = 9 · 2 = 18.
        assert_eq!(in_flight_layer_microbatches(DualPipe, 4, 1, 8, 1, 16), 20.0);
        assert_eq!(
            in_flight_layer_microbatches(DualPipeV, 4, 1, 8, 0, 16),
            18.0
        );
        // ZBV: 2P chunks of L/(2P) = L.
        assert_eq!(in_flight_layer_microbatches(Zbv, 4, 1, 8, 2, 16), 16.0);
    }
}
