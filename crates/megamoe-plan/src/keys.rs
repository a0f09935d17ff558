//! The config reference: every key a run config accepts, its default and what
//! it does, as printed by `megamoe config --defaults`.
//!
//! Defaults are not written here: they are read from the [`RawConfig`]
//! defaults themselves, so this list cannot disagree with the parser. A test
//! checks that the list names every key of the schema and nothing else.

use crate::raw::{
    FlexiDepthSection, GateSkipSection, MoeSection, MtpSection, OptimSection, ParallelSection,
    RawConfig, TrainSection,
};

/// One config key and its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyDoc {
    /// `section.key`.
    pub key: &'static str,
    /// What the key does, its allowed values, and (where the default depends on
    /// other keys) how the default is derived.
    pub meaning: &'static str,
}

/// The sections in file order, with what each one is for.
pub const SECTIONS: &[(&str, &str)] = &[
    ("model", "the transformer's shape (required section)"),
    (
        "moe",
        "routed and shared experts; leave out for a dense model",
    ),
    (
        "gateskip",
        "residual gates that let tokens skip a branch; leave out = off",
    ),
    (
        "flexidepth",
        "tokens may skip whole trailing layers; leave out = off",
    ),
    ("mtp", "multi-token prediction heads; leave out = off"),
    ("parallel", "device layout and pipeline schedule"),
    ("train", "batch, steps, evaluation, checkpoints, precision"),
    ("optim", "optimizer, learning rate, clipping"),
];

macro_rules! keys {
    ($($key:literal => $meaning:literal,)+) => {
        /// Every key of the run config, in file order.
        pub const KEYS: &[KeyDoc] = &[$(KeyDoc { key: $key, meaning: $meaning },)+];
    };
}

keys! {
    "model.vocab_size" => "Vocabulary size (required, >= 1; 256 for the built-in byte tokenizer).",
    "model.d_model" => "Hidden size (required; divisible by n_heads, head size even).",
    "model.n_layers" => "Transformer blocks (required, >= 1; divisible by the pipeline stages).",
    "model.n_heads" => "Attention (query) heads (required; divisible by n_kv_heads and parallel.tp).",
    "model.n_kv_heads" => "Key/value heads (grouped-query attention). Default: n_heads.",
    "model.ffn_hidden" => "Dense feed-forward width (required); also MTP blocks and FlexiDepth adapters.",
    "model.seq_len" => "Sequence length in tokens (required, >= 2).",
    "model.rope_theta" => "Rotary position embedding base (> 0).",
    "model.norm_eps" => "RMSNorm epsilon (> 0).",
    "model.tie_embeddings" => "Share the embedding matrix with the output head.",
    "moe.routed_experts" => "Routed experts E; 0 = dense model. Divisible by parallel.ep.",
    "moe.top_k" => "Experts per token, 1..=routed_experts.",
    "moe.expert_hidden" => "Hidden width of one routed expert. Default: model.ffn_hidden.",
    "moe.activation" => "Expert and dense FFN activation: swiglu, relu2 or gelu.",
    "moe.score_fn" => "Router score: softmax or sigmoid.",
    "moe.pre_softmax" => "Softmax over all experts before top-k (true) or over the k chosen (false); softmax only.",
    "moe.normalize" => "Rescale the chosen gates to sum to 1. Default: true for sigmoid, and for softmax with pre_softmax and top_k > 1; else false.",
    "moe.route_scale" => "Multiplier on the gates after normalisation (> 0; DeepSeek-V3 uses 2.5).",
    "moe.n_groups" => "Expert groups for group-limited routing (1 = off); divides routed_experts.",
    "moe.topk_groups" => "Groups kept per token, 1..=n_groups. Default: n_groups.",
    "moe.expert_bias" => "Loss-free balancing: a per-expert bias on selection scores, updated each step.",
    "moe.bias_update_rate" => "Step of the balancing bias per optimizer step (>= 0).",
    "moe.null_rho" => "Null-slot target share in (0, 1]: tokens may route to 'no expert'. Default: off.",
    "moe.capacity_factor" => "Tokens an expert may take, as a multiple of its fair share (> 0); over it tokens are dropped. Default: no limit (dropless).",
    "moe.drop_policy" => "Which assignments to keep over capacity: probs (highest gates) or position (earliest tokens).",
    "moe.pad_to_capacity" => "Pad every expert buffer to exactly its capacity (static shapes); needs capacity_factor.",
    "moe.shared_experts" => "Shared experts every token goes through (0 = none).",
    "moe.shared_expert_hidden" => "Width of one shared expert. Default: expert_hidden.",
    "moe.shared_expert_gate" => "Learned sigmoid gate on the shared-expert path; needs shared_experts >= 1.",
    "moe.aux_loss" => "Load-balancing loss: aux (per batch), seq_aux (per sequence), global_aux, or none.",
    "moe.aux_loss_weight" => "Weight of the load-balancing loss (>= 0).",
    "moe.z_loss_weight" => "Weight of the router z-loss, which keeps router logits small (>= 0).",
    "moe.layer_freq" => "Layer l is MoE iff l >= first_dense_layers and l % layer_freq == 0 (>= 1).",
    "moe.first_dense_layers" => "Leading layers that stay dense.",
    "gateskip.enabled" => "On when the section is present, unless set false.",
    "gateskip.gate" => "Gate shape: vector (one gate per channel) or scalar.",
    "gateskip.budget_start" => "Share of tokens skipped per branch at step 0, in [0, 1).",
    "gateskip.budget_end" => "Share of tokens skipped per branch after warmup, in [0, 1).",
    "gateskip.budget_warmup_steps" => "Steps of linear budget warmup (0 = budget_end from the start).",
    "gateskip.sparsity_weight" => "Weight of the gate sparsity loss (>= 0).",
    "gateskip.penalty" => "Sparsity penalty: l2 or l1.",
    "gateskip.init_bias" => "Initial gate bias (5.0 gives gates of about 0.993, nearly open).",
    "gateskip.init_std" => "Standard deviation of the initial gate weights (>= 0).",
    "flexidepth.enabled" => "On when the section is present, unless set false.",
    "flexidepth.adaptive_layers" => "Trailing layers that tokens may skip (<= n_layers). Default: n_layers / 2, at least 1.",
    "flexidepth.reduction" => "Skip-router bottleneck: hidden = max(1, d_model / reduction) (>= 1).",
    "flexidepth.threshold" => "A token takes the full layer iff its router score > threshold, in (0, 1).",
    "flexidepth.skip_loss_weight" => "Weight of the skip loss (sum of layer scores)^2 / L (>= 0).",
    "flexidepth.adapter_reduction" => "Adapter hidden width = ffn_hidden / adapter_reduction (<= ffn_hidden).",
    "flexidepth.router_order" => "Skip-router op order: paper or released.",
    "mtp.depth" => "Extra future tokens predicted per position (0 = off; < seq_len).",
    "mtp.mode" => "One shared block for every depth (shared) or one block per depth (sequential).",
    "mtp.decay" => "Depth weights w_k = decay^k / sum_j decay^j, decay in (0, 1].",
    "mtp.loss_weight" => "Weight of the MTP loss (>= 0).",
    "mtp.concat_order" => "Input order of the MTP block: hidden_first or embedding_first.",
    "parallel.dp" => "Data-parallel replicas.",
    "parallel.fsdp" => "Sharding level 0-3 over data-parallel ranks (1 optimizer state, 2 + gradients, 3 + parameters = FSDP).",
    "parallel.tp" => "Tensor-parallel ranks (matrices split across devices).",
    "parallel.sp" => "Sequence parallelism inside tensor-parallel regions.",
    "parallel.pp" => "Pipeline-parallel ranks (the layers split into stages).",
    "parallel.vpp" => "Model chunks per rank for schedule interleaved.",
    "parallel.ep" => "Expert-parallel ranks; divides moe.routed_experts.",
    "parallel.cp" => "Context-parallel ranks (attention split along the sequence); divides seq_len.",
    "parallel.microbatches" => "Micro-batches per optimizer step per rank (gradient accumulation; pipeline depth).",
    "parallel.schedule" => "Pipeline schedule: gpipe, 1f1b, interleaved, zb-h1, zbv, dualpipe or dualpipev.",
    "train.global_batch" => "Sequences per optimizer step; divisible by dp * ep * microbatches.",
    "train.steps" => "Optimizer steps of the run; the learning-rate schedule spans them (>= 1).",
    "train.seed" => "Seed of the parameter init and the data order.",
    "train.eval_every" => "Evaluate on held-out data every N steps (0 = never).",
    "train.eval_batches" => "Batches per evaluation.",
    "train.checkpoint_every" => "Save a checkpoint every N steps (0 = only at the end).",
    "train.log_every" => "Print a progress line every N steps (>= 1).",
    "train.max_nonfinite_steps" => "Stop (exit 1) after this many consecutive NaN/Inf steps (0 = at the first).",
    "train.recompute" => "Activation recomputation: none, or full (keep only each block's input, recompute it in backward). selective is refused by the CPU trainer.",
    "train.offload" => "Saved activations moved to pinned host memory between forward and backward (GPU only): a list of qkv_linear, core_attn, attn_proj, mlp, moe, expert_fc1. Default [] (none).",
    "train.dtype" => "Parameter/activation precision: f32, or bf16 (planning only: the CPU trainer refuses it).",
    "optim.name" => "Optimizer: adamw, or muon (Muon on 2-D weight matrices, AdamW on the rest).",
    "optim.lr" => "Peak AdamW learning rate (> 0).",
    "optim.min_lr" => "Learning rate at the end of the decay, in [0, lr].",
    "optim.warmup_steps" => "Linear warmup steps.",
    "optim.lr_schedule" => "Decay after warmup: cosine, linear or constant.",
    "optim.weight_decay" => "Decoupled weight decay (>= 0).",
    "optim.beta1" => "AdamW beta1, in [0, 1).",
    "optim.beta2" => "AdamW beta2, in [0, 1).",
    "optim.eps" => "AdamW epsilon (> 0).",
    "optim.moment_dtype" => "Element type of AdamW's two moments: f32, or bf16 (half the optimizer-state bytes; master weights and gradients stay f32; beta1 and beta2 must be <= 0.99609375).",
    "optim.grad_clip" => "Clip the global gradient norm to this value (0 = off).",
    "optim.muon_momentum" => "Muon momentum, in [0, 1).",
    "optim.muon_nesterov" => "Nesterov momentum in Muon.",
    "optim.muon_scale" => "Muon update scale: keller or moonlight.",
    "optim.muon_lr" => "Muon peak learning rate (> 0). Default: 0.02 for keller, optim.lr for moonlight.",
}

/// The `[model]` keys without a default (a config must set them).
pub const REQUIRED: &[&str] = &[
    "model.vocab_size",
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.ffn_hidden",
    "model.seq_len",
];

/// The default of every key that has a fixed one, as TOML values keyed by
/// `section.key`. Keys whose default is derived from other keys (and the
/// required model keys) are absent.
pub fn default_values() -> Vec<(String, toml::Value)> {
    let sections: [(&str, Option<toml::Value>); 8] = [
        ("model", Some(model_defaults())),
        ("moe", toml::Value::try_from(MoeSection::default()).ok()),
        (
            "gateskip",
            toml::Value::try_from(GateSkipSection::default()).ok(),
        ),
        (
            "flexidepth",
            toml::Value::try_from(FlexiDepthSection::default()).ok(),
        ),
        ("mtp", toml::Value::try_from(MtpSection::default()).ok()),
        (
            "parallel",
            toml::Value::try_from(ParallelSection::default()).ok(),
        ),
        ("train", toml::Value::try_from(TrainSection::default()).ok()),
        ("optim", toml::Value::try_from(OptimSection::default()).ok()),
    ];
    let mut out = Vec::new();
    for (name, value) in sections {
        if let Some(toml::Value::Table(t)) = value {
            for (k, v) in t {
                out.push((format!("{name}.{k}"), v));
            }
        }
    }
    out
}

/// The optional `[model]` keys with their defaults (read from a minimal config).
fn model_defaults() -> toml::Value {
    const MINIMAL: &str = "[model]\nvocab_size = 1\nd_model = 1\nn_layers = 1\nn_heads = 1\n\
                           ffn_hidden = 1\nseq_len = 2\n";
    let mut table = toml::Table::new();
    if let Ok(raw) = RawConfig::from_toml_str(MINIMAL) {
        if let Ok(toml::Value::Table(t)) = toml::Value::try_from(&raw.model) {
            for (k, v) in t {
                if !REQUIRED.contains(&format!("model.{k}").as_str()) {
                    table.insert(k, v);
                }
            }
        }
    }
    toml::Value::Table(table)
}

/// The reference as a commented TOML document: every section and key, the
/// default as the value (required keys and keys not set by default commented
/// out), the meaning
/// as a comment. Written for `megamoe config --defaults`.
pub fn reference_toml() -> String {
    let defaults = default_values();
    let mut out = String::from(
        "# megamoe run config: every key, its default, and what it does.\n\
         # A config needs only [model]'s required keys; every other key takes the\n\
         # default shown. Optional sections ([moe], [gateskip], [flexidepth], [mtp])\n\
         # are off unless present. Override any key with --set section.key=value.\n",
    );
    for (section, about) in SECTIONS {
        out.push_str(&format!("\n[{section}]  # {about}\n"));
        for doc in KEYS
            .iter()
            .filter(|d| d.key.split('.').next() == Some(section))
        {
            let short = &doc.key[section.len() + 1..];
            let line = match defaults.iter().find(|(k, _)| k == doc.key) {
                Some((_, v)) => format!("{short} = {v}"),
                None if REQUIRED.contains(&doc.key) => format!("# {short} = (required)"),
                None => format!("# {short} = (not set)"),
            };
            out.push_str(&format!("{line:<34} # {}\n", doc.meaning));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every key of the schema: the defaults of every section with each
    /// optional (derived-default) key set, serialised.
    fn schema_keys() -> BTreeSet<String> {
        let model = crate::ModelSection {
            n_kv_heads: Some(1),
            ..RawConfig::from_toml_str(crate::TINY_CONFIG).unwrap().model
        };
        let raw = RawConfig {
            model,
            moe: Some(MoeSection {
                expert_hidden: Some(1),
                normalize: Some(true),
                topk_groups: Some(1),
                null_rho: Some(1.0),
                capacity_factor: Some(1.0),
                shared_expert_hidden: Some(1),
                ..MoeSection::default()
            }),
            gateskip: Some(GateSkipSection::default()),
            flexidepth: Some(FlexiDepthSection {
                adaptive_layers: Some(1),
                ..FlexiDepthSection::default()
            }),
            mtp: Some(MtpSection::default()),
            parallel: ParallelSection::default(),
            train: TrainSection::default(),
            optim: OptimSection {
                muon_lr: Some(0.02),
                ..OptimSection::default()
            },
        };
        let toml::Value::Table(doc) = toml::Value::try_from(&raw).unwrap() else {
            panic!("a config serialises to a table");
        };
        let mut keys = BTreeSet::new();
        for (section, value) in doc {
            let toml::Value::Table(t) = value else {
                panic!("{section} is not a table");
            };
            keys.extend(t.keys().map(|k| format!("{section}.{k}")));
        }
        keys
    }

    #[test]
    fn the_reference_names_every_key_of_the_schema_once() {
        let listed: Vec<&str> = KEYS.iter().map(|d| d.key).collect();
        let unique: BTreeSet<String> = listed.iter().map(|k| k.to_string()).collect();
        assert_eq!(unique.len(), listed.len(), "a key is listed twice");
        assert_eq!(unique, schema_keys());
    }

    #[test]
    fn every_listed_section_key_is_accepted_and_the_defaults_parse_back() {
        // The reference printed with its commented-out lines filled from the
        // tiny config is itself a valid config equal to the defaults.
        let text = reference_toml();
        let mut filled = String::new();
        for line in text.lines() {
            match line.strip_prefix("# ") {
                Some(rest) if rest.contains("= (required)") => {
                    let key = rest.split(" =").next().unwrap().trim();
                    let tiny = RawConfig::from_toml_str(crate::TINY_CONFIG).unwrap();
                    let model = toml::Value::try_from(&tiny.model).unwrap();
                    filled.push_str(&format!("{key} = {}\n", model[key]));
                }
                _ => {
                    filled.push_str(line);
                    filled.push('\n');
                }
            }
        }
        let raw = RawConfig::from_toml_str(&filled).unwrap();
        assert_eq!(raw.parallel, ParallelSection::default());
        assert_eq!(raw.train, TrainSection::default());
        assert_eq!(raw.optim, OptimSection::default());
        assert_eq!(raw.moe, Some(MoeSection::default()));
        assert_eq!(raw.gateskip, Some(GateSkipSection::default()));
        assert_eq!(raw.flexidepth, Some(FlexiDepthSection::default()));
        assert_eq!(raw.mtp, Some(MtpSection::default()));
        assert_eq!(raw.model.rope_theta, 10_000.0);
    }

    #[test]
    fn required_and_derived_keys_are_shown_as_such() {
        let text = reference_toml();
        assert!(text.contains("# vocab_size = (required)"), "{text}");
        assert!(text.contains("# expert_hidden = (not set)"), "{text}");
        assert!(text.contains("\ntop_k = 2 "), "{text}");
        assert!(text.contains("\nlr = 0.0003 "), "{text}");
    }
}
