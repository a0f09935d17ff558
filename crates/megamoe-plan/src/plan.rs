//! The validated plan: [`Plan::resolve`] turns a [`RawConfig`] into enums and
//! derived numbers, checking every rule of the specs. Each failure is one
//! [`PlanError`] variant; soft problems are [`PlanWarning`]s returned as data.

use crate::bounds::{check_memory_bounds, MemoryLimit, MAX_WORLD};
use crate::error::{PlanError, Result};
use crate::mesh::Mesh;
use crate::modes::{
    Activation, ConcatOrder, GateKind, LrSchedule, MomentDtype, MtpMode, MuonScale, OffloadTargets,
    OptimizerKind, Precision, Recompute, RouterOrder, SkipPenalty, ZeroLevel,
};
pub use crate::moe_plan::{MoePlan, RoutingPlan, SharedExpertsPlan};
use crate::raw::RawConfig;
use crate::stages::{stage_count, PipelineLayout};
use crate::tp::{partition_qkv_heads, HeadPartition};
use crate::ScheduleKind;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A validated run: every field resolved, every rule checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Transformer shape.
    pub model: ModelPlan,
    /// MoE layers; `None` for a dense model.
    pub moe: Option<MoePlan>,
    /// GateSkip; `None` when off.
    pub gate_skip: Option<GateSkipPlan>,
    /// FlexiDepth; `None` when off.
    pub flexi_depth: Option<FlexiDepthPlan>,
    /// MTP; `None` when off (depth 0 or no section).
    pub mtp: Option<MtpPlan>,
    /// Parallel layout.
    pub parallel: ParallelPlan,
    /// Rank layout.
    pub mesh: Mesh,
    /// Layers → stages → pipeline ranks.
    pub stages: PipelineLayout,
    /// Batch arithmetic.
    pub batch: BatchPlan,
    /// Training loop settings.
    pub train: TrainPlan,
    /// Optimizer settings.
    pub optim: OptimPlan,
    /// Soft problems (the CLI prints them to stderr).
    pub warnings: Vec<PlanWarning>,
}

/// `[model]`, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPlan {
    /// V.
    pub vocab_size: usize,
    /// H.
    pub d_model: usize,
    /// L.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (defaults to n_heads).
    pub n_kv_heads: usize,
    /// d_model / n_heads.
    pub head_dim: usize,
    /// Dense FFN width.
    pub ffn_hidden: usize,
    /// Dense FFN activation: moe.activation when [moe] is present, else SwiGLU.
    pub dense_activation: Activation,
    /// T.
    pub seq_len: usize,
    /// RoPE θ.
    pub rope_theta: f64,
    /// RMSNorm ε.
    pub norm_eps: f64,
    /// Embedding shared with the LM head.
    pub tie_embeddings: bool,
    /// Heads per TP rank.
    pub tp_heads: HeadPartition,
}

/// `[gateskip]`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateSkipPlan {
    /// Gate shape.
    pub gate: GateKind,
    /// Budget at step 0.
    pub budget_start: f64,
    /// Budget after warmup.
    pub budget_end: f64,
    /// Warmup steps.
    pub budget_warmup_steps: usize,
    /// λ_s.
    pub sparsity_weight: f64,
    /// Penalty.
    pub penalty: SkipPenalty,
    /// b_g init.
    pub init_bias: f64,
    /// W_g init std.
    pub init_std: f64,
}

/// `[flexidepth]`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlexiDepthPlan {
    /// Trailing adaptive layers.
    pub adaptive_layers: usize,
    /// First adaptive layer index (n_layers − adaptive_layers).
    pub first_adaptive_layer: usize,
    /// Router bottleneck max(1, d_model / reduction) (seed `flexidepth_router_shape`).
    pub router_hidden: usize,
    /// τ.
    pub threshold: f64,
    /// α.
    pub skip_loss_weight: f64,
    /// Adapter SwiGLU width ffn_hidden / adapter_reduction.
    pub adapter_hidden: usize,
    /// Router op order.
    pub router_order: RouterOrder,
}

/// `[mtp]`, resolved (depth ≥ 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MtpPlan {
    /// K depths.
    pub depth: usize,
    /// Shared or sequential blocks.
    pub mode: MtpMode,
    /// β.
    pub decay: f64,
    /// λ.
    pub loss_weight: f64,
    /// Concat order.
    pub concat_order: ConcatOrder,
    /// w_k = β^k / Σ_j β^j, k = 0..K−1 (seed `compute_step_weights`).
    pub step_weights: Vec<f64>,
}

/// `[parallel]`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelPlan {
    /// Data-parallel replicas.
    pub dp: usize,
    /// ZeRO level over each parameter's DP group (see [`Mesh`]).
    pub zero: ZeroLevel,
    /// TP.
    pub tp: usize,
    /// Sequence parallel.
    pub sp: bool,
    /// PP ranks.
    pub pp: usize,
    /// Chunks per rank (interleaved); 1 otherwise.
    pub vpp: usize,
    /// EP.
    pub ep: usize,
    /// CP.
    pub cp: usize,
    /// Micro-batches per step.
    pub microbatches: usize,
    /// Schedule.
    pub schedule: ScheduleKind,
}

/// Batch arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// Sequences per optimizer step, all ranks.
    pub global_batch: usize,
    /// Distinct data streams dp·ep.
    pub data_replicas: usize,
    /// Micro-batches per step.
    pub microbatches: usize,
    /// Sequences per rank per micro-batch: global_batch / (dp·ep·microbatches).
    pub micro_batch_size: usize,
    /// Tokens per rank per micro-batch: micro_batch_size · seq_len / cp.
    pub tokens_per_micro_batch: usize,
    /// Tokens per optimizer step, all ranks: global_batch · seq_len.
    pub tokens_per_step: usize,
}

/// `[train]`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainPlan {
    /// Optimizer steps.
    pub steps: usize,
    /// Seed.
    pub seed: u64,
    /// Eval period; `None` = never.
    pub eval_every: Option<usize>,
    /// Batches per eval.
    pub eval_batches: usize,
    /// Checkpoint period; `None` = only at the end.
    pub checkpoint_every: Option<usize>,
    /// Log period.
    pub log_every: usize,
    /// Non-finite steps tolerated in a row before stopping.
    pub max_nonfinite_steps: usize,
    /// Recompute.
    pub recompute: Recompute,
    /// Precision.
    pub precision: Precision,
    /// Saved activations moved to pinned host memory between forward and backward.
    #[serde(default)]
    pub offload: OffloadTargets,
}

/// `[optim]`, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimPlan {
    /// AdamW or Muon.
    pub kind: OptimizerKind,
    /// AdamW peak lr.
    pub lr: f64,
    /// Final lr.
    pub min_lr: f64,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Decay shape.
    pub lr_schedule: LrSchedule,
    /// λ.
    pub weight_decay: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Element type of AdamW's two moments (Muon's momentum stays f32).
    pub moment_dtype: MomentDtype,
    /// Clip norm; `None` = off.
    pub grad_clip: Option<f64>,
    /// Muon settings when kind = Muon.
    pub muon: Option<MuonPlan>,
}

/// Muon settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MuonPlan {
    /// β.
    pub momentum: f64,
    /// Nesterov.
    pub nesterov: bool,
    /// Update scale.
    pub scale: MuonScale,
    /// Peak lr for Muon matrices (0.02 for keller, optim.lr for moonlight by default).
    pub lr: f64,
}

/// A soft problem: the plan is valid but probably not what was meant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PlanWarning {
    /// microbatches < pp leaves pipeline ranks idle (seed `validate_3d_config`).
    MicrobatchesBelowPp {
        /// parallel.microbatches.
        microbatches: usize,
        /// parallel.pp.
        pp: usize,
    },
    /// sp = true with tp = 1 does nothing.
    SequenceParallelWithoutTp,
    /// ZeRO level > 0 with a data-parallel group of one rank shards nothing.
    ZeroWithoutDataParallel {
        /// parallel.fsdp.
        level: u8,
    },
    /// Capacity below one slot per expert drops almost everything.
    CapacityBelowTopK {
        /// Computed capacity.
        capacity: usize,
    },
}

impl fmt::Display for PlanWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanWarning::MicrobatchesBelowPp { microbatches, pp } => write!(
                f,
                "parallel.microbatches={microbatches} < parallel.pp={pp} reduces pipeline overlap"
            ),
            PlanWarning::SequenceParallelWithoutTp => {
                f.write_str("parallel.sp=true has no effect with parallel.tp=1")
            }
            PlanWarning::ZeroWithoutDataParallel { level } => write!(
                f,
                "parallel.fsdp={level} shards nothing: every data-parallel group has one rank"
            ),
            PlanWarning::CapacityBelowTopK { capacity } => write!(
                f,
                "expert capacity {capacity} per micro-batch is tiny; most assignments will be dropped"
            ),
        }
    }
}

pub(crate) fn positive(field: &'static str, value: usize) -> Result<usize> {
    if value == 0 {
        return Err(PlanError::Invalid {
            field,
            value: "0".into(),
            rule: "must be >= 1",
        });
    }
    Ok(value)
}

pub(crate) fn finite_in(field: &'static str, v: f64, ok: bool, rule: &'static str) -> Result<f64> {
    if !v.is_finite() || !ok {
        return Err(PlanError::Invalid {
            field,
            value: v.to_string(),
            rule,
        });
    }
    Ok(v)
}

/// The product of named factors, or [`PlanError::SizeOverflow`] naming them.
pub(crate) fn checked_product(what: &'static str, factors: &[(&str, usize)]) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &(_, f)| acc.checked_mul(f))
        .ok_or_else(|| PlanError::SizeOverflow {
            what,
            expr: factors
                .iter()
                .map(|(name, v)| format!("{name}={v}"))
                .collect::<Vec<_>>()
                .join(" x "),
        })
}

pub(crate) fn divisible(
    field: &'static str,
    value: usize,
    divisor_field: &'static str,
    divisor: usize,
) -> Result<()> {
    if divisor == 0 || !value.is_multiple_of(divisor) {
        return Err(PlanError::NotDivisible {
            field,
            value,
            divisor_field,
            divisor,
        });
    }
    Ok(())
}

impl Plan {
    /// Validates `raw` and derives the plan. `devices`, when given, must equal
    /// the mesh's world size. Every size product is checked; see
    /// [`Plan::resolve_within`] to also bound memory.
    pub fn resolve(raw: &RawConfig, devices: Option<usize>) -> Result<Plan> {
        Plan::resolve_bounded(raw, devices, None)
    }

    /// [`Plan::resolve`], and refuses a config that cannot fit in `limit` per
    /// rank ([`PlanError::ExceedsMemory`]) before any per-layer work: the
    /// check is constant-time in every size.
    pub fn resolve_within(
        raw: &RawConfig,
        devices: Option<usize>,
        limit: &MemoryLimit,
    ) -> Result<Plan> {
        Plan::resolve_bounded(raw, devices, Some(limit))
    }

    fn resolve_bounded(
        raw: &RawConfig,
        devices: Option<usize>,
        limit: Option<&MemoryLimit>,
    ) -> Result<Plan> {
        let mut warnings = Vec::new();
        let parallel = resolve_parallel(raw, devices, &mut warnings)?;
        let mesh = Mesh {
            pp: parallel.pp,
            dp: parallel.dp,
            ep: parallel.ep,
            cp: parallel.cp,
            tp: parallel.tp,
        };
        let model = resolve_model(raw, &parallel)?;
        crate::moe_plan::check_expert_split(raw, &parallel)?;
        let batch = resolve_batch(raw, &parallel)?;
        if let Some(limit) = limit {
            check_memory_bounds(raw, &model, &parallel, &batch, limit)?;
        }
        let stages = resolve_stages(&model, &parallel)?;
        let moe = crate::moe_plan::resolve_moe(raw, &model, &parallel, &batch, &mut warnings)?;
        let gate_skip = crate::features::resolve_gate_skip(raw)?;
        let flexi_depth = crate::features::resolve_flexi_depth(raw, &model)?;
        let mtp = crate::features::resolve_mtp(raw, &model)?;
        let train = resolve_train(raw)?;
        let optim = resolve_optim(raw)?;
        if optim.warmup_steps > train.steps {
            return Err(PlanError::WarmupExceedsSteps {
                warmup_steps: optim.warmup_steps,
                steps: train.steps,
            });
        }
        Ok(Plan {
            model,
            moe,
            gate_skip,
            flexi_depth,
            mtp,
            parallel,
            mesh,
            stages,
            batch,
            train,
            optim,
            warnings,
        })
    }

    /// Parses TOML text with `--set` overrides and resolves it.
    pub fn from_toml_str(text: &str, overrides: &[String], devices: Option<usize>) -> Result<Plan> {
        let raw = RawConfig::from_toml_str_with_overrides(text, overrides)?;
        Plan::resolve(&raw, devices)
    }

    /// Whether layer `l` is an MoE layer (constant time).
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.is_moe_layer(l))
    }
}

fn resolve_parallel(
    raw: &RawConfig,
    devices: Option<usize>,
    warnings: &mut Vec<PlanWarning>,
) -> Result<ParallelPlan> {
    let p = &raw.parallel;
    let dp = positive("parallel.dp", p.dp)?;
    let tp = positive("parallel.tp", p.tp)?;
    let pp = positive("parallel.pp", p.pp)?;
    let vpp = positive("parallel.vpp", p.vpp)?;
    let ep = positive("parallel.ep", p.ep)?;
    let cp = positive("parallel.cp", p.cp)?;
    let m = positive("parallel.microbatches", p.microbatches)?;
    let zero = ZeroLevel::from_level(p.fsdp).ok_or(PlanError::Invalid {
        field: "parallel.fsdp",
        value: p.fsdp.to_string(),
        rule: "must be a ZeRO level 0, 1, 2 or 3",
    })?;
    let schedule = p.schedule;
    let world = checked_product(
        "world size",
        &[
            ("parallel.pp", pp),
            ("parallel.dp", dp),
            ("parallel.ep", ep),
            ("parallel.cp", cp),
            ("parallel.tp", tp),
        ],
    )?;
    if world > MAX_WORLD {
        return Err(PlanError::WorldTooLarge {
            world,
            max: MAX_WORLD,
        });
    }
    if let Some(devices) = devices {
        if devices != world {
            return Err(PlanError::WorldMismatch {
                world,
                devices,
                pp,
                dp,
                ep,
                cp,
                tp,
            });
        }
    }
    match schedule {
        ScheduleKind::Interleaved => {
            if vpp < 2 {
                return Err(PlanError::VppMismatch {
                    vpp,
                    schedule,
                    rule: "interleaved needs parallel.vpp >= 2 chunks per rank",
                });
            }
            if m % pp != 0 {
                return Err(PlanError::InterleavedMicrobatches {
                    microbatches: m,
                    pp,
                });
            }
            // Rank 0 warmup (pipeline spec): min(2(P−1) + (v−1)·P, m·v).
            let total = m.saturating_mul(vpp);
            let warmup = (2 * (pp - 1))
                .saturating_add((vpp - 1).saturating_mul(pp))
                .min(total);
            if pp > 1 && warmup >= total {
                return Err(PlanError::AllWarmupRegime {
                    warmup,
                    total,
                    microbatches: m,
                    vpp,
                });
            }
        }
        _ if vpp != 1 => {
            return Err(PlanError::VppMismatch {
                vpp,
                schedule,
                rule: "parallel.vpp > 1 needs schedule \"interleaved\"",
            });
        }
        ScheduleKind::DualPipe => {
            if pp % 2 != 0 {
                return Err(PlanError::DualPipeOddPp { pp, schedule });
            }
            if m < 2 * pp {
                return Err(PlanError::TooFewMicrobatches {
                    microbatches: m,
                    min: 2 * pp,
                    reason: "2·parallel.pp",
                    schedule,
                });
            }
            if m % 2 != 0 {
                return Err(PlanError::OddMicrobatches {
                    microbatches: m,
                    schedule,
                });
            }
        }
        ScheduleKind::DualPipeV if m < 2 * pp => {
            return Err(PlanError::TooFewMicrobatches {
                microbatches: m,
                min: 2 * pp,
                reason: "2·parallel.pp",
                schedule,
            });
        }
        _ => {}
    }
    if pp > 1 && m < pp {
        warnings.push(PlanWarning::MicrobatchesBelowPp {
            microbatches: m,
            pp,
        });
    }
    if p.sp && tp == 1 {
        warnings.push(PlanWarning::SequenceParallelWithoutTp);
    }
    if zero > ZeroLevel::Replicated && dp * ep * cp == 1 {
        warnings.push(PlanWarning::ZeroWithoutDataParallel { level: p.fsdp });
    }
    Ok(ParallelPlan {
        dp,
        zero,
        tp,
        sp: p.sp,
        pp,
        vpp,
        ep,
        cp,
        microbatches: m,
        schedule,
    })
}

fn resolve_model(raw: &RawConfig, par: &ParallelPlan) -> Result<ModelPlan> {
    let m = &raw.model;
    let vocab_size = positive("model.vocab_size", m.vocab_size)?;
    let d_model = positive("model.d_model", m.d_model)?;
    let n_layers = positive("model.n_layers", m.n_layers)?;
    let n_heads = positive("model.n_heads", m.n_heads)?;
    let n_kv_heads = positive("model.n_kv_heads", m.n_kv_heads.unwrap_or(n_heads))?;
    let ffn_hidden = positive("model.ffn_hidden", m.ffn_hidden)?;
    if m.seq_len < 2 {
        return Err(PlanError::Invalid {
            field: "model.seq_len",
            value: m.seq_len.to_string(),
            rule: "must be >= 2 (next-token targets)",
        });
    }
    divisible("model.d_model", d_model, "model.n_heads", n_heads)?;
    let head_dim = d_model / n_heads;
    if head_dim % 2 != 0 {
        return Err(PlanError::Invalid {
            field: "model.d_model",
            value: d_model.to_string(),
            rule: "d_model / n_heads must be even (RoPE rotates pairs)",
        });
    }
    divisible("model.n_heads", n_heads, "model.n_kv_heads", n_kv_heads)?;
    finite_in(
        "model.rope_theta",
        m.rope_theta,
        m.rope_theta > 0.0,
        "must be > 0",
    )?;
    finite_in(
        "model.norm_eps",
        m.norm_eps,
        m.norm_eps > 0.0,
        "must be > 0",
    )?;
    let tp_heads = partition_qkv_heads(n_heads, n_kv_heads, par.tp)?;
    if par.tp > 1 {
        divisible("model.ffn_hidden", ffn_hidden, "parallel.tp", par.tp)?;
        divisible("model.vocab_size", vocab_size, "parallel.tp", par.tp)?;
    }
    divisible("model.seq_len", m.seq_len, "parallel.cp", par.cp)?;
    if par.sp && par.tp > 1 {
        divisible(
            "model.seq_len",
            m.seq_len / par.cp,
            "parallel.tp (sequence parallel)",
            par.tp,
        )?;
    }
    Ok(ModelPlan {
        vocab_size,
        d_model,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        ffn_hidden,
        dense_activation: raw
            .moe
            .as_ref()
            .map_or(Activation::SwiGlu, |s| s.activation),
        seq_len: m.seq_len,
        rope_theta: m.rope_theta,
        norm_eps: m.norm_eps,
        tie_embeddings: m.tie_embeddings,
        tp_heads,
    })
}

fn resolve_batch(raw: &RawConfig, par: &ParallelPlan) -> Result<BatchPlan> {
    let gb = raw.train.global_batch;
    let divisor = checked_product(
        "data-parallel micro-batch count",
        &[
            ("parallel.dp", par.dp),
            ("parallel.ep", par.ep),
            ("parallel.microbatches", par.microbatches),
        ],
    )?;
    if gb == 0 || !gb.is_multiple_of(divisor) {
        return Err(PlanError::MicroBatchNotInteger {
            global_batch: gb,
            dp: par.dp,
            ep: par.ep,
            microbatches: par.microbatches,
            divisor,
        });
    }
    let mbs = gb / divisor;
    let seq = ("model.seq_len", raw.model.seq_len);
    let tokens_per_step = checked_product("tokens per step", &[("train.global_batch", gb), seq])?;
    let micro_tokens =
        checked_product("tokens per micro-batch", &[("micro-batch size", mbs), seq])?;
    Ok(BatchPlan {
        global_batch: gb,
        data_replicas: par.dp * par.ep,
        microbatches: par.microbatches,
        micro_batch_size: mbs,
        tokens_per_micro_batch: micro_tokens / par.cp,
        tokens_per_step,
    })
}

fn resolve_stages(model: &ModelPlan, par: &ParallelPlan) -> Result<PipelineLayout> {
    let stages = stage_count(par.schedule, par.pp, par.vpp);
    if !model.n_layers.is_multiple_of(stages) {
        return Err(PlanError::LayersNotDivisibleByStages {
            n_layers: model.n_layers,
            stages,
            pp: par.pp,
            stages_per_rank: par.schedule.stages_per_rank(par.vpp),
            schedule: par.schedule,
        });
    }
    Ok(PipelineLayout::new(
        par.schedule,
        par.pp,
        par.vpp,
        model.n_layers,
    ))
}

fn resolve_train(raw: &RawConfig) -> Result<TrainPlan> {
    let t = &raw.train;
    Ok(TrainPlan {
        steps: positive("train.steps", t.steps)?,
        seed: t.seed,
        eval_every: (t.eval_every > 0).then_some(t.eval_every),
        eval_batches: positive("train.eval_batches", t.eval_batches)?,
        checkpoint_every: (t.checkpoint_every > 0).then_some(t.checkpoint_every),
        log_every: positive("train.log_every", t.log_every)?,
        max_nonfinite_steps: t.max_nonfinite_steps,
        recompute: t.recompute,
        precision: t.dtype,
        offload: t.offload,
    })
}

/// The largest β1 / β2 allowed with bf16 moments: 1 − 2⁻⁸.
pub const BF16_MOMENT_MAX_BETA: f64 = 1.0 - 1.0 / 256.0;

/// Why a larger β is refused with bf16 moments.
const BF16_MOMENT_RULE: &str =
    "must be <= 0.99609375 (1 - beta >= 2^-8) with optim.moment_dtype = \"bf16\": \
     each step moves a moment by (1 - beta) times its distance to the new value, and a bf16 \
     moment only moves when that change exceeds half its rounding step (2^-9 relative), so with \
     a smaller 1 - beta the stored moment stalls (use \"f32\" moments for such betas)";

fn resolve_optim(raw: &RawConfig) -> Result<OptimPlan> {
    let o = &raw.optim;
    finite_in("optim.lr", o.lr, o.lr > 0.0, "must be > 0")?;
    finite_in(
        "optim.min_lr",
        o.min_lr,
        o.min_lr >= 0.0 && o.min_lr <= o.lr,
        "must be in [0, optim.lr]",
    )?;
    finite_in(
        "optim.weight_decay",
        o.weight_decay,
        o.weight_decay >= 0.0,
        "must be >= 0",
    )?;
    finite_in(
        "optim.beta1",
        o.beta1,
        (0.0..1.0).contains(&o.beta1),
        "must be in [0, 1)",
    )?;
    finite_in(
        "optim.beta2",
        o.beta2,
        (0.0..1.0).contains(&o.beta2),
        "must be in [0, 1)",
    )?;
    finite_in("optim.eps", o.eps, o.eps > 0.0, "must be > 0")?;
    if o.moment_dtype == MomentDtype::Bf16 {
        for (field, beta) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            finite_in(field, beta, beta <= BF16_MOMENT_MAX_BETA, BF16_MOMENT_RULE)?;
        }
    }
    finite_in(
        "optim.grad_clip",
        o.grad_clip,
        o.grad_clip >= 0.0,
        "must be >= 0 (0 = off)",
    )?;
    finite_in(
        "optim.muon_momentum",
        o.muon_momentum,
        (0.0..1.0).contains(&o.muon_momentum),
        "must be in [0, 1)",
    )?;
    let muon_lr = o.muon_lr.unwrap_or(match o.muon_scale {
        MuonScale::Keller => 0.02,
        MuonScale::Moonlight => o.lr,
    });
    finite_in("optim.muon_lr", muon_lr, muon_lr > 0.0, "must be > 0")?;
    Ok(OptimPlan {
        kind: o.name,
        lr: o.lr,
        min_lr: o.min_lr,
        warmup_steps: o.warmup_steps,
        lr_schedule: o.lr_schedule,
        weight_decay: o.weight_decay,
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        moment_dtype: o.moment_dtype,
        grad_clip: (o.grad_clip > 0.0).then_some(o.grad_clip),
        muon: (o.name == OptimizerKind::Muon).then_some(MuonPlan {
            momentum: o.muon_momentum,
            nesterov: o.muon_nesterov,
            scale: o.muon_scale,
            lr: muon_lr,
        }),
    })
}
