//! The run config as written: TOML plus `--set section.key=value` overrides.
//!
//! [`RawConfig`] mirrors the file one-to-one (`deny_unknown_fields` on every
//! section). Only `[model]` is required, and inside it only the shape keys;
//! every other key has the default given in its doc, so a file with only
//! `[model]` and `[moe]` is a valid config. Cross-field rules are checked
//! later by [`crate::Plan::resolve`].
//!
//! Overrides are applied to the parsed TOML document *before* deserialising,
//! so an override is checked by exactly the same schema as the file.

use crate::error::{PlanError, Result};
use crate::modes::{
    Activation, AuxLossKind, ConcatOrder, DropPolicy, GateKind, LrSchedule, MomentDtype, MtpMode,
    MuonScale, OffloadTargets, OptimizerKind, Precision, Recompute, RouterOrder, ScoreFn,
    SkipPenalty,
};
use crate::ScheduleKind;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The whole run config, as deserialised from TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[model]`: transformer shape (required).
    pub model: ModelSection,
    /// `[moe]`: routed/shared experts; absent (or routed_experts = 0) = dense model.
    #[serde(default)]
    pub moe: Option<MoeSection>,
    /// `[gateskip]`: residual gating with a token budget; absent = off.
    #[serde(default)]
    pub gateskip: Option<GateSkipSection>,
    /// `[flexidepth]`: adaptive layer skipping with adapters; absent = off.
    #[serde(default)]
    pub flexidepth: Option<FlexiDepthSection>,
    /// `[mtp]`: multi-token prediction; absent = off.
    #[serde(default)]
    pub mtp: Option<MtpSection>,
    /// `[parallel]`: layout and pipeline schedule (default: one device).
    #[serde(default)]
    pub parallel: ParallelSection,
    /// `[train]`: batch, steps, precision, recompute.
    #[serde(default)]
    pub train: TrainSection,
    /// `[optim]`: optimizer and learning rate.
    #[serde(default)]
    pub optim: OptimSection,
}

/// `[model]`: the transformer's shape. The keys without a default are required.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Vocabulary size V (required, ≥ 1; 256 for the built-in byte tokenizer).
    pub vocab_size: usize,
    /// Hidden size H (required; divisible by n_heads, head dim even for RoPE).
    pub d_model: usize,
    /// Transformer blocks L (required, ≥ 1; divisible by the pipeline stages).
    pub n_layers: usize,
    /// Attention (query) heads (required; divisible by n_kv_heads and parallel.tp).
    pub n_heads: usize,
    /// Key/value heads for GQA. Default: n_heads (plain multi-head attention).
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    /// Dense FFN hidden width (required) — used by dense layers, MTP blocks and adapters.
    pub ffn_hidden: usize,
    /// Sequence length T in tokens (required, ≥ 2).
    pub seq_len: usize,
    /// RoPE base θ. Default 10000.0; > 0.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm ε. Default 1e-5; > 0.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Share the embedding matrix with the LM head. Default false.
    #[serde(default)]
    pub tie_embeddings: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}

/// `[moe]`: routed and shared experts (see docs/moe.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeSection {
    /// Routed experts E. Default 0 = MoE off (dense model). Divisible by parallel.ep.
    pub routed_experts: usize,
    /// Experts per token k. Default 2; 1..=routed_experts.
    pub top_k: usize,
    /// Routed expert hidden width h. Default: model.ffn_hidden.
    pub expert_hidden: Option<usize>,
    /// Expert activation (also used by the dense FFN layers). Default "swiglu".
    pub activation: Activation,
    /// Router score function. Default "softmax".
    pub score_fn: ScoreFn,
    /// Softmax over all experts before top-k (true) or over the k chosen logits (false).
    /// Default false (Megatron). Only meaningful for score_fn = "softmax".
    pub pre_softmax: bool,
    /// Renormalise the chosen gates to sum to 1. Default: true for sigmoid and for
    /// softmax with pre_softmax and top_k > 1, else false.
    pub normalize: Option<bool>,
    /// Multiplier on the gates after normalisation. Default 1.0 (DeepSeek-V3: 2.5); > 0.
    pub route_scale: f64,
    /// Expert groups G for group-limited routing. Default 1 (off); divides routed_experts.
    pub n_groups: usize,
    /// Groups M kept per token. Default: n_groups; 1..=n_groups.
    pub topk_groups: Option<usize>,
    /// Aux-loss-free balancing bias on selection scores. Default false.
    pub expert_bias: bool,
    /// Bias step γ per optimizer step. Default 1e-3; ≥ 0.
    pub bias_update_rate: f64,
    /// Null-slot target share ρ in (0, 1]. Default: absent = off (same as 1.0).
    pub null_rho: Option<f64>,
    /// Capacity factor (> 0). Default: absent = dropless.
    pub capacity_factor: Option<f64>,
    /// Which assignments to keep over capacity. Default "probs".
    pub drop_policy: DropPolicy,
    /// Pad every expert buffer to exactly `capacity` rows (static shapes). Default false;
    /// needs capacity_factor.
    pub pad_to_capacity: bool,
    /// Shared experts n_s (one dense FFN of width n_s·shared_expert_hidden). Default 0.
    pub shared_experts: usize,
    /// Width of one shared expert. Default: expert_hidden.
    pub shared_expert_hidden: Option<usize>,
    /// Learned sigmoid gate on the shared path. Default false; needs shared_experts ≥ 1.
    pub shared_expert_gate: bool,
    /// Balancing loss kind. Default "aux".
    pub aux_loss: AuxLossKind,
    /// Balancing loss weight. Default 0.01; ≥ 0.
    pub aux_loss_weight: f64,
    /// Router z-loss weight. Default 1e-3; ≥ 0.
    pub z_loss_weight: f64,
    /// Layer l is MoE iff l ≥ first_dense_layers and l % layer_freq == 0 (DeepSeek rule).
    /// Default 1 (every layer); ≥ 1.
    pub layer_freq: usize,
    /// Leading dense layers. Default 0.
    pub first_dense_layers: usize,
}

impl Default for MoeSection {
    fn default() -> Self {
        MoeSection {
            routed_experts: 0,
            top_k: 2,
            expert_hidden: None,
            activation: Activation::SwiGlu,
            score_fn: ScoreFn::Softmax,
            pre_softmax: false,
            normalize: None,
            route_scale: 1.0,
            n_groups: 1,
            topk_groups: None,
            expert_bias: false,
            bias_update_rate: 1e-3,
            null_rho: None,
            capacity_factor: None,
            drop_policy: DropPolicy::Probs,
            pad_to_capacity: false,
            shared_experts: 0,
            shared_expert_hidden: None,
            shared_expert_gate: false,
            aux_loss: AuxLossKind::Aux,
            aux_loss_weight: 0.01,
            z_loss_weight: 1e-3,
            layer_freq: 1,
            first_dense_layers: 0,
        }
    }
}

/// `[gateskip]`: residual gates on every attention and FFN branch with a skip budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateSkipSection {
    /// On when the section is present, unless set false. Default true.
    pub enabled: bool,
    /// Gate shape. Default "vector".
    pub gate: GateKind,
    /// Share of tokens skipped per module at step 0, in [0, 1). Default 0.0.
    pub budget_start: f64,
    /// Share skipped after warmup, in [0, 1). Default 0.25.
    pub budget_end: f64,
    /// Steps of linear budget warmup (0 = budget_end from the start). Default 1000.
    pub budget_warmup_steps: usize,
    /// λ_s of the sparsity loss. Default 0.01; ≥ 0.
    pub sparsity_weight: f64,
    /// Sparsity penalty. Default "l2".
    pub penalty: SkipPenalty,
    /// Gate bias init b_g (σ(5) ≈ 0.9933). Default 5.0.
    pub init_bias: f64,
    /// Gate weight init std. Default 0.01; ≥ 0.
    pub init_std: f64,
}

impl Default for GateSkipSection {
    fn default() -> Self {
        GateSkipSection {
            enabled: true,
            gate: GateKind::Vector,
            budget_start: 0.0,
            budget_end: 0.25,
            budget_warmup_steps: 1000,
            sparsity_weight: 0.01,
            penalty: SkipPenalty::L2,
            init_bias: 5.0,
            init_std: 0.01,
        }
    }
}

/// `[flexidepth]`: the last `adaptive_layers` layers may be skipped per token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlexiDepthSection {
    /// On when the section is present, unless set false. Default true.
    pub enabled: bool,
    /// Number of trailing adaptive layers. Default: n_layers / 2 (at least 1); ≤ n_layers.
    pub adaptive_layers: Option<usize>,
    /// Router bottleneck reduction r (hidden = max(1, d_model / r)). Default 16; ≥ 1.
    pub reduction: usize,
    /// Full path iff router score > τ. Default 0.5; in (0, 1).
    pub threshold: f64,
    /// α of the skip loss (Σ_l g_l)²/L. Default 1e-3; ≥ 0.
    pub skip_loss_weight: f64,
    /// Adapter hidden = ffn_hidden / adapter_reduction. Default 16; ≤ ffn_hidden.
    pub adapter_reduction: usize,
    /// Router op order. Default "paper".
    pub router_order: RouterOrder,
}

impl Default for FlexiDepthSection {
    fn default() -> Self {
        FlexiDepthSection {
            enabled: true,
            adaptive_layers: None,
            reduction: 16,
            threshold: 0.5,
            skip_loss_weight: 1e-3,
            adapter_reduction: 16,
            router_order: RouterOrder::Paper,
        }
    }
}

/// `[mtp]`: multi-token prediction heads on the last stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtpSection {
    /// Prediction depths K. Default 3 when the section is present; 0 = off; < seq_len.
    pub depth: usize,
    /// One shared block or one block per depth. Default "shared".
    pub mode: MtpMode,
    /// Step-weight decay β: w_k = β^k / Σ_j β^j. Default 0.6; in (0, 1].
    pub decay: f64,
    /// λ, weight of the MTP loss. Default 0.3; ≥ 0.
    pub loss_weight: f64,
    /// Input concat order. Default "hidden_first".
    pub concat_order: ConcatOrder,
}

impl Default for MtpSection {
    fn default() -> Self {
        MtpSection {
            depth: 3,
            mode: MtpMode::Shared,
            decay: 0.6,
            loss_weight: 0.3,
            concat_order: ConcatOrder::HiddenFirst,
        }
    }
}

/// `[parallel]`: the device mesh and pipeline schedule.
///
/// World = pp·dp·ep·cp·tp ranks, rank order (pp, dp, ep, cp, tp) with tp
/// fastest (see [`crate::Mesh`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelSection {
    /// Data-parallel replicas (of the dense layers: dp·ep, since EP ranks see different data). Default 1.
    pub dp: usize,
    /// ZeRO level 0-3 over each parameter's data-parallel group (3 = FSDP). Default 0.
    pub fsdp: u8,
    /// Tensor-parallel ranks (Megatron column/row split; experts split on their hidden dim). Default 1.
    pub tp: usize,
    /// Sequence parallelism inside TP regions (norms/dropout split on T). Default false.
    pub sp: bool,
    /// Pipeline-parallel ranks P. Default 1.
    pub pp: usize,
    /// Virtual stages (model chunks) per rank for schedule "interleaved". Default 1.
    pub vpp: usize,
    /// Expert-parallel ranks. Default 1; divides moe.routed_experts.
    pub ep: usize,
    /// Context-parallel ranks (sequence split for attention). Default 1; divides seq_len.
    pub cp: usize,
    /// Micro-batches per optimizer step per rank (gradient accumulation / pipeline). Default 1.
    pub microbatches: usize,
    /// Pipeline schedule. Default "1f1b".
    pub schedule: ScheduleKind,
}

impl Default for ParallelSection {
    fn default() -> Self {
        ParallelSection {
            dp: 1,
            fsdp: 0,
            tp: 1,
            sp: false,
            pp: 1,
            vpp: 1,
            ep: 1,
            cp: 1,
            microbatches: 1,
            schedule: ScheduleKind::OneFOneB,
        }
    }
}

/// `[train]`: the training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Global batch in sequences per optimizer step. Default 8; divisible by dp·ep·microbatches.
    pub global_batch: usize,
    /// Optimizer steps. Default 200; ≥ 1.
    pub steps: usize,
    /// Seed of the counter-based parameter init and data order. Default 1234.
    pub seed: u64,
    /// Evaluate every N steps (0 = never). Default 50.
    pub eval_every: usize,
    /// Batches per evaluation. Default 4.
    pub eval_batches: usize,
    /// Checkpoint every N steps (0 = only at the end). Default 0.
    pub checkpoint_every: usize,
    /// Log every N steps. Default 10; ≥ 1.
    pub log_every: usize,
    /// Stop (exit 1) after this many consecutive non-finite steps (0 = at the first). Default 3.
    pub max_nonfinite_steps: usize,
    /// Activation recomputation. Default "none".
    pub recompute: Recompute,
    /// Parameter/activation precision. Default "f32".
    pub dtype: Precision,
    /// Saved activations moved to pinned host memory between forward and backward
    /// (GPU only). Default [] (none).
    pub offload: OffloadTargets,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            global_batch: 8,
            steps: 200,
            seed: 1234,
            eval_every: 50,
            eval_batches: 4,
            checkpoint_every: 0,
            log_every: 10,
            max_nonfinite_steps: 3,
            recompute: Recompute::None,
            dtype: Precision::F32,
            offload: OffloadTargets::default(),
        }
    }
}

/// `[optim]`: optimizer, learning rate and clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    /// Optimizer. Default "adamw".
    pub name: OptimizerKind,
    /// Peak AdamW learning rate. Default 3e-4; > 0.
    pub lr: f64,
    /// Final learning rate of the decay. Default 3e-5; in [0, lr].
    pub min_lr: f64,
    /// Linear warmup steps. Default 20.
    pub warmup_steps: usize,
    /// Decay after warmup. Default "cosine".
    pub lr_schedule: LrSchedule,
    /// Decoupled weight decay λ. Default 0.1; ≥ 0.
    pub weight_decay: f64,
    /// AdamW β1. Default 0.9; in [0, 1).
    pub beta1: f64,
    /// AdamW β2. Default 0.95; in [0, 1).
    pub beta2: f64,
    /// AdamW ε. Default 1e-8; > 0.
    pub eps: f64,
    /// Element type of AdamW's moments. Default "f32"; "bf16" needs β1, β2 ≤ 1 − 2⁻⁸.
    pub moment_dtype: MomentDtype,
    /// Global gradient-norm clip (0 = off). Default 1.0; ≥ 0.
    pub grad_clip: f64,
    /// Muon momentum β. Default 0.95; in [0, 1).
    pub muon_momentum: f64,
    /// Nesterov momentum in Muon. Default true.
    pub muon_nesterov: bool,
    /// Muon update scale. Default "keller".
    pub muon_scale: MuonScale,
    /// Muon peak learning rate. Default: 0.02 for "keller", optim.lr for "moonlight"; > 0.
    pub muon_lr: Option<f64>,
}

impl Default for OptimSection {
    fn default() -> Self {
        OptimSection {
            name: OptimizerKind::AdamW,
            lr: 3e-4,
            min_lr: 3e-5,
            warmup_steps: 20,
            lr_schedule: LrSchedule::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            moment_dtype: MomentDtype::F32,
            grad_clip: 1.0,
            muon_momentum: 0.95,
            muon_nesterov: true,
            muon_scale: MuonScale::Keller,
            muon_lr: None,
        }
    }
}

/// One `--set section.key=value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as given (for error messages).
    pub arg: String,
    /// Section name (`parallel`).
    pub section: String,
    /// Key inside the section (`ep`).
    pub key: String,
    /// The value: parsed as a TOML value; a bare word that is not valid TOML is a string.
    pub value: toml::Value,
}

impl Override {
    /// Parses `section.key=value`.
    ///
    /// ```
    /// use megamoe_plan::Override;
    /// let o = Override::parse("moe.activation=gelu").unwrap();
    /// assert_eq!(o.value, toml::Value::String("gelu".into()));
    /// let o = Override::parse("parallel.ep=2").unwrap();
    /// assert_eq!(o.value, toml::Value::Integer(2));
    /// ```
    pub fn parse(arg: &str) -> Result<Override> {
        let bad = |rule| PlanError::BadOverride {
            arg: arg.to_string(),
            rule,
        };
        let (path, text) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected section.key=value"))?;
        let (section, key) = path
            .trim()
            .split_once('.')
            .ok_or_else(|| bad("expected section.key=value (the key needs its section)"))?;
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !ident(section) || !ident(key) {
            return Err(bad("section and key must be plain names like parallel.ep"));
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(bad("the value is empty"));
        }
        if text.chars().any(char::is_control) {
            return Err(bad(
                "the value contains a line break or control character (one value per --set)",
            ));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {text}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(text.to_string()));
        Ok(Override {
            arg: arg.to_string(),
            section: section.to_string(),
            key: key.to_string(),
            value,
        })
    }

    /// Sets this key in a parsed TOML document, creating the section if needed.
    fn apply(&self, doc: &mut toml::Table) -> Result<()> {
        let section = doc
            .entry(self.section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section {
            toml::Value::Table(t) => {
                t.insert(self.key.clone(), self.value.clone());
                Ok(())
            }
            _ => Err(PlanError::OverrideRejected {
                arg: self.arg.clone(),
                message: format!("`{}` is not a section", self.section),
            }),
        }
    }
}

impl RawConfig {
    /// Parses a TOML config (no overrides).
    pub fn from_toml_str(text: &str) -> Result<RawConfig> {
        toml::from_str::<RawConfig>(text).map_err(|e| toml_error(text, &e))
    }

    /// Parses a TOML config and applies `--set` overrides (strings `section.key=value`).
    ///
    /// The overrides are applied to the TOML document before deserialising, so
    /// they meet the same schema as the file. Errors in the file carry its line
    /// number; errors caused by an override name the override.
    pub fn from_toml_str_with_overrides(text: &str, overrides: &[String]) -> Result<RawConfig> {
        let overrides = overrides
            .iter()
            .map(|s| Override::parse(s))
            .collect::<Result<Vec<_>>>()?;
        Self::from_toml_with(text, &overrides)
    }

    /// Like [`from_toml_str_with_overrides`](Self::from_toml_str_with_overrides) with parsed overrides.
    pub fn from_toml_with(text: &str, overrides: &[Override]) -> Result<RawConfig> {
        if overrides.is_empty() {
            return Self::from_toml_str(text);
        }
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let file_only = doc.clone();
        for o in overrides {
            o.apply(&mut doc)?;
        }
        match toml::Value::Table(doc).try_into::<RawConfig>() {
            Ok(raw) => Ok(raw),
            Err(merged_err) => {
                // Blame the file first (it has line numbers), then the first
                // override after which the document stops deserialising.
                Self::from_toml_str(text)?;
                let mut doc = file_only;
                for o in overrides {
                    o.apply(&mut doc)?;
                    if let Err(e) = toml::Value::Table(doc.clone()).try_into::<RawConfig>() {
                        return Err(PlanError::OverrideRejected {
                            arg: o.arg.clone(),
                            message: one_line(e.message()),
                        });
                    }
                }
                Err(PlanError::OverrideRejected {
                    arg: overrides
                        .iter()
                        .map(|o| o.arg.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    message: one_line(merged_err.message()),
                })
            }
        }
    }

    /// Reads a config file and applies `--set` overrides.
    pub fn from_path(path: &Path, overrides: &[String]) -> Result<RawConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml_str_with_overrides(&text, overrides)
    }
}

/// Collapses a multi-line parser message into one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Turns a toml error into [`PlanError::Toml`] with the 1-based line and the
/// `section.key` found at the error's span.
fn toml_error(text: &str, err: &toml::de::Error) -> PlanError {
    let message = one_line(err.message());
    let Some(span) = err.span() else {
        return PlanError::Toml {
            line: 1,
            key: "?".to_string(),
            message,
        };
    };
    let start = span.start.min(text.len());
    let line_idx = text[..start].matches('\n').count();
    let lines: Vec<&str> = text.lines().collect();
    let line_text = lines.get(line_idx).copied().unwrap_or("").trim();
    let section = lines[..line_idx.min(lines.len())]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = if line_text.starts_with('[') {
        // The span covers a whole table (e.g. a missing key): name the table.
        line_text
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string()
    } else {
        let k = line_text
            .split_once('=')
            .map(|(k, _)| k.trim())
            .unwrap_or(line_text);
        match section {
            Some(s) => format!("{s}.{k}"),
            None => k.to_string(),
        }
    };
    PlanError::Toml {
        line: line_idx + 1,
        key,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\nvocab_size = 256\nd_model = 64\nn_layers = 4\nn_heads = 4\nffn_hidden = 256\nseq_len = 64\n";

    #[test]
    fn minimal_model_only_config_takes_documented_defaults() {
        let raw = RawConfig::from_toml_str(MINIMAL).unwrap();
        assert_eq!(raw.model.n_kv_heads, None);
        assert_eq!(raw.model.rope_theta, 10_000.0);
        assert_eq!(raw.parallel, ParallelSection::default());
        assert_eq!(raw.parallel.schedule, ScheduleKind::OneFOneB);
        assert_eq!(raw.train.global_batch, 8);
        assert!(raw.moe.is_none());
    }

    #[test]
    fn unknown_key_error_names_line_and_key() {
        let text = format!("{MINIMAL}[parallel]\ntp = 1\nexperts = 3\n");
        let err = RawConfig::from_toml_str(&text).unwrap_err();
        match &err {
            PlanError::Toml { line, key, message } => {
                // MINIMAL has 7 lines, [parallel] is line 8, tp line 9, experts line 10.
                assert_eq!(*line, 10);
                assert_eq!(key, "parallel.experts");
                assert!(message.contains("unknown field"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn wrong_type_error_names_line_and_key() {
        let text = format!("{MINIMAL}[parallel]\nep = \"two\"\n");
        let err = RawConfig::from_toml_str(&text).unwrap_err();
        match &err {
            PlanError::Toml { line, key, message } => {
                assert_eq!(*line, 9);
                assert_eq!(key, "parallel.ep");
                assert!(message.contains("invalid type"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unknown_enum_name_is_an_error_with_line() {
        let text = format!("{MINIMAL}[moe]\nrouted_experts = 8\nactivation = \"tanh\"\n");
        let err = RawConfig::from_toml_str(&text).unwrap_err();
        assert!(
            matches!(&err, PlanError::Toml { line: 10, key, .. } if key == "moe.activation"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_model_key_is_an_error() {
        let text = MINIMAL.replace("seq_len = 64\n", "");
        let err = RawConfig::from_toml_str(&text).unwrap_err();
        assert!(err.to_string().contains("seq_len"), "{err}");
    }

    #[test]
    fn overrides_are_typed_like_the_file() {
        let sets = vec![
            "parallel.ep=2".to_string(),
            "moe.routed_experts=8".to_string(),
            "moe.activation=gelu".to_string(),
            "optim.lr=1".to_string(),
            "train.dtype=\"bf16\"".to_string(),
        ];
        let raw = RawConfig::from_toml_str_with_overrides(MINIMAL, &sets).unwrap();
        assert_eq!(raw.parallel.ep, 2);
        let moe = raw.moe.unwrap();
        assert_eq!(moe.routed_experts, 8);
        assert_eq!(moe.activation, Activation::Gelu);
        assert_eq!(raw.optim.lr, 1.0);
        assert_eq!(raw.train.dtype, Precision::Bf16);
    }

    #[test]
    fn override_with_wrong_type_or_unknown_key_is_rejected_by_name() {
        let err =
            RawConfig::from_toml_str_with_overrides(MINIMAL, &["parallel.ep=two".to_string()])
                .unwrap_err();
        assert!(
            matches!(&err, PlanError::OverrideRejected { arg, .. } if arg == "parallel.ep=two"),
            "{err}"
        );
        let err = RawConfig::from_toml_str_with_overrides(MINIMAL, &["parallel.epp=2".to_string()])
            .unwrap_err();
        assert!(err.to_string().contains("epp"), "{err}");
        let err =
            RawConfig::from_toml_str_with_overrides(MINIMAL, &["ep=2".to_string()]).unwrap_err();
        assert!(matches!(err, PlanError::BadOverride { .. }), "{err}");
    }

    #[test]
    fn override_with_a_line_break_is_refused_not_truncated() {
        for arg in [
            "train.steps=5\nfoo",
            "optim.name=adamw\r[x]",
            "model.seq_len=3\t2",
        ] {
            let err =
                RawConfig::from_toml_str_with_overrides(MINIMAL, &[arg.to_string()]).unwrap_err();
            assert!(
                matches!(err, PlanError::BadOverride { rule, .. } if rule.contains("line break")),
                "{arg:?}: {err}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
        }
    }

    #[test]
    fn override_may_supply_a_key_missing_from_the_file() {
        let text = MINIMAL.replace("seq_len = 64\n", "");
        let raw = RawConfig::from_toml_str_with_overrides(&text, &["model.seq_len=32".to_string()])
            .unwrap();
        assert_eq!(raw.model.seq_len, 32);
    }
}
