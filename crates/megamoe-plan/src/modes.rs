//! Every mode of the config as an enum. Strings exist only at the serde edge:
//! each enum deserialises from the lower-case name shown in its doc, and
//! [`name`](Activation::name) gives that name back.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Defines a config enum with its serde names, `name()`, `ALL` and `Display`.
macro_rules! config_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The config name of this variant.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

config_enum! {
    /// Expert (and dense FFN) activation, `moe.activation`.
    Activation {
        /// `swiglu`: y = (silu(x W_gateᵀ) ⊙ (x W_upᵀ)) W_downᵀ — three matrices.
        SwiGlu => "swiglu",
        /// `relu2`: y = relu(x W_upᵀ)² W_downᵀ — two matrices.
        Relu2 => "relu2",
        /// `gelu`: y = gelu_erf(x W_upᵀ) W_downᵀ — two matrices.
        Gelu => "gelu",
    }
}

impl Activation {
    /// Weight matrices per FFN (3 for SwiGLU: gate, up, down; else 2: up, down).
    pub fn matrices(self) -> usize {
        match self {
            Activation::SwiGlu => 3,
            Activation::Relu2 | Activation::Gelu => 2,
        }
    }
}

config_enum! {
    /// Router score function, `moe.score_fn`.
    ScoreFn {
        /// `softmax` (Mixtral, Megatron default).
        Softmax => "softmax",
        /// `sigmoid` (DeepSeek-V3).
        Sigmoid => "sigmoid",
    }
}

config_enum! {
    /// Which assignments survive when an expert is over capacity, `moe.drop_policy`.
    DropPolicy {
        /// `probs`: keep the highest gates (ties → lower token index, then lower slot).
        Probs => "probs",
        /// `position`: keep the earliest assignments in (token, slot) order.
        Position => "position",
    }
}

config_enum! {
    /// Load-balancing loss, `moe.aux_loss`.
    AuxLossKind {
        /// `aux`: Switch loss over the micro-batch.
        Aux => "aux",
        /// `seq_aux`: the same per sequence, averaged over sequences (DeepSeek).
        SeqAux => "seq_aux",
        /// `global_aux`: counts all-reduced over DP×TP×CP and the global batch.
        GlobalAux => "global_aux",
        /// `none`: no balancing loss (e.g. aux-loss-free bias only).
        None => "none",
    }
}

config_enum! {
    /// GateSkip gate shape, `gateskip.gate`.
    GateKind {
        /// `vector`: W_g [d, d], one gate per channel (default).
        Vector => "vector",
        /// `scalar`: W_g [1, d], one gate per token.
        Scalar => "scalar",
    }
}

config_enum! {
    /// GateSkip sparsity penalty, `gateskip.penalty`.
    SkipPenalty {
        /// `l2`: mean(g²) (paper default).
        L2 => "l2",
        /// `l1`: mean(|g|).
        L1 => "l1",
    }
}

config_enum! {
    /// FlexiDepth router operation order, `flexidepth.router_order`.
    RouterOrder {
        /// `paper`: σ(w_head · W_dec · tanh(RMSNorm_r(W_enc z))).
        Paper => "paper",
        /// `released`: the released weights' order, σ(w_head · W_dec · RMSNorm_r(tanh(W_enc z))).
        Released => "released",
    }
}

config_enum! {
    /// MTP module layout, `mtp.mode`.
    MtpMode {
        /// `shared`: one block reused for every depth (FastMTP).
        Shared => "shared",
        /// `sequential`: one block per depth (DeepSeek-V3).
        Sequential => "sequential",
    }
}

config_enum! {
    /// MTP input concatenation order, `mtp.concat_order`.
    ConcatOrder {
        /// `hidden_first`: proj([RMSNorm(h); RMSNorm(e)]) (FastMTP).
        HiddenFirst => "hidden_first",
        /// `embedding_first`: proj([RMSNorm(e); RMSNorm(h)]) (DeepSeek-V3, Megatron).
        EmbeddingFirst => "embedding_first",
    }
}

config_enum! {
    /// Activation recomputation, `train.recompute`.
    Recompute {
        /// `none`: keep every activation.
        None => "none",
        /// `selective`: recompute attention scores/softmax (Korthikanti et al. 2022).
        Selective => "selective",
        /// `full`: keep only each layer's input, recompute the layer in backward.
        Full => "full",
    }
}

config_enum! {
    /// Storage/compute precision of parameters and activations, `train.dtype`.
    Precision {
        /// `f32` everywhere (CPU default, the reference).
        F32 => "f32",
        /// `bf16` parameters and activations, f32 gradients, f32 master weights and moments.
        Bf16 => "bf16",
    }
}

impl Precision {
    /// Bytes per element of parameters and activations.
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

config_enum! {
    /// Element type of AdamW's two moments, `optim.moment_dtype` (master weights and
    /// gradients stay f32; Muon's momentum stays f32).
    MomentDtype {
        /// `f32` moments (4 bytes each; the default).
        F32 => "f32",
        /// `bf16` moments (2 bytes each): widened to f32 for the update, stored rounded to
        /// nearest even.
        Bf16 => "bf16",
    }
}

impl MomentDtype {
    /// Bytes per moment element.
    pub fn bytes(self) -> usize {
        match self {
            MomentDtype::F32 => 4,
            MomentDtype::Bf16 => 2,
        }
    }
}

config_enum! {
    /// Optimizer for hidden matrices, `optim.name`.
    OptimizerKind {
        /// `adamw` for every parameter.
        AdamW => "adamw",
        /// `muon` for hidden ≥2-D matrices, AdamW for embeddings, head, norms, biases.
        Muon => "muon",
    }
}

config_enum! {
    /// Muon update scale, `optim.muon_scale`.
    MuonScale {
        /// `keller`: max(1, m/n)^½ (default; use optim.muon_lr ≈ 0.02).
        Keller => "keller",
        /// `moonlight`: 0.2·√max(m, n) (reuses AdamW's lr and weight decay).
        Moonlight => "moonlight",
    }
}

config_enum! {
    /// Learning-rate schedule after warmup, `optim.lr_schedule`.
    LrSchedule {
        /// `cosine` decay from lr to min_lr over the remaining steps (default).
        Cosine => "cosine",
        /// `linear` decay from lr to min_lr.
        Linear => "linear",
        /// `constant` lr after warmup.
        Constant => "constant",
    }
}

/// Expert capacity mode, from `moe.capacity_factor` (absent = dropless).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Capacity {
    /// No token is ever dropped; buffers are ragged (bounded by the planner's worst case).
    Dropless,
    /// Capacity C = ceil(T·k / E · factor) slots per routed expert per micro-batch.
    Factor(f64),
}

/// ZeRO / FSDP level over the data-parallel group, `parallel.fsdp` (0-3).
///
/// The data-parallel group of a dense parameter is every rank with the same
/// (pp, tp) coordinates: dp·ep·cp ranks. That of an expert parameter is every
/// rank with the same (pp, ep, tp): dp·cp ranks. Level 1 shards optimizer state
/// (and f32 master weights), level 2 also gradients, level 3 (FSDP) also parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ZeroLevel {
    /// 0: plain data parallel, everything replicated.
    Replicated,
    /// 1: optimizer state sharded.
    OptimizerState,
    /// 2: optimizer state and gradients sharded.
    Gradients,
    /// 3: optimizer state, gradients and parameters sharded (FSDP2 `chunk` rule).
    Parameters,
}

impl ZeroLevel {
    /// From the config integer 0..=3; `None` for other values.
    pub fn from_level(level: u8) -> Option<Self> {
        match level {
            0 => Some(ZeroLevel::Replicated),
            1 => Some(ZeroLevel::OptimizerState),
            2 => Some(ZeroLevel::Gradients),
            3 => Some(ZeroLevel::Parameters),
            _ => None,
        }
    }

    /// The config integer.
    pub fn level(self) -> u8 {
        match self {
            ZeroLevel::Replicated => 0,
            ZeroLevel::OptimizerState => 1,
            ZeroLevel::Gradients => 2,
            ZeroLevel::Parameters => 3,
        }
    }
}

config_enum! {
    /// A saved activation that `train.offload` moves to pinned host memory between a
    /// layer's forward and its backward (GPU runs).
    OffloadTarget {
        /// `qkv_linear`: the input of the q/k/v projections (the first norm's output).
        QkvLinear => "qkv_linear",
        /// `core_attn`: the attention op's q, repeated k and v, and its saved state.
        CoreAttn => "core_attn",
        /// `attn_proj`: the input of the output projection (the heads' output).
        AttnProj => "attn_proj",
        /// `mlp`: a dense FFN's input, pre-activations and activation.
        Mlp => "mlp",
        /// `moe`: the experts' pre-activations and activation, the expert rows back at
        /// the source, and the shared experts' pre-activations and activation.
        Moe => "moe",
        /// `expert_fc1`: the routed experts' input rows (the first expert GEMM's input).
        ExpertFc1 => "expert_fc1",
    }
}

/// The set of `train.offload` targets (one bit per [`OffloadTarget`]; a TOML list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(from = "Vec<OffloadTarget>", into = "Vec<OffloadTarget>")]
pub struct OffloadTargets(u8);

impl OffloadTargets {
    fn bit(t: OffloadTarget) -> u8 {
        1 << OffloadTarget::ALL.iter().position(|&x| x == t).unwrap_or(0)
    }

    /// Whether `t` is offloaded.
    pub fn contains(self, t: OffloadTarget) -> bool {
        self.0 & Self::bit(t) != 0
    }

    /// No target.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The targets, in declaration order.
    pub fn targets(self) -> Vec<OffloadTarget> {
        OffloadTarget::ALL
            .iter()
            .copied()
            .filter(|&t| self.contains(t))
            .collect()
    }
}

impl From<Vec<OffloadTarget>> for OffloadTargets {
    fn from(v: Vec<OffloadTarget>) -> Self {
        OffloadTargets(v.into_iter().fold(0, |acc, t| acc | Self::bit(t)))
    }
}

impl From<OffloadTargets> for Vec<OffloadTarget> {
    fn from(t: OffloadTargets) -> Self {
        t.targets()
    }
}

impl fmt::Display for OffloadTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.targets().iter().map(|t| t.name()).collect();
        write!(f, "[{}]", names.join(", "))
    }
}
