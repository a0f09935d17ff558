//! Per-step and eval metrics, and the `metrics.jsonl` file that holds them.
//!
//! One JSON object per line, tagged by `"kind"`: `run` (once per process start),
//! `step` ([`StepMetrics`]), `eval` ([`EvalMetrics`]), `goodput`
//! ([`GoodputRecord`]) and `sample` ([`SampleRecord`]). The writer appends and
//! flushes each line, so a crash loses at most the line being written; on reopen it
//! drops such a partial line. A resumed run first cuts the file back to its step
//! ([`truncate_after_step`]), so every step has one record; readers still take the
//! last record per step ([`latest_steps`]) for files written by older builds.
//!
//! Non-finite floats (a NaN loss the guard skipped, an infinite learning rate) are
//! written as the strings `"NaN"`, `"inf"` and `"-inf"`, since JSON has no such
//! numbers; readers also take `null` as NaN (what older builds wrote).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::goodput::GoodputTotals;

mod nonfinite;
mod truncate;
pub use truncate::truncate_after_step;

/// File name of the metrics log inside a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Loss components of one step, each averaged over the step's tokens and already
/// multiplied by its weight, so `total = lm + mtp + aux + z + skip`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossParts {
    /// The optimised loss.
    #[serde(with = "nonfinite")]
    pub total: f64,
    /// Next-token cross-entropy (nats/token).
    #[serde(with = "nonfinite")]
    pub lm: f64,
    /// Weighted sum of the MTP depth losses.
    #[serde(with = "nonfinite", default)]
    pub mtp: f64,
    /// MoE load-balancing loss (all layers).
    #[serde(with = "nonfinite", default)]
    pub aux: f64,
    /// Router z-loss (all layers).
    #[serde(with = "nonfinite", default)]
    pub z: f64,
    /// GateSkip sparsity + FlexiDepth skip losses.
    #[serde(with = "nonfinite", default)]
    pub skip: f64,
}

/// Routing statistics of one MoE layer over one step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MoeLayerStats {
    /// Layer index in the model.
    pub layer: usize,
    /// (E,) token-slots routed to each routed expert (before capacity drops).
    pub tokens_per_expert: Vec<u64>,
    /// max / mean of `tokens_per_expert` (1 = perfectly balanced; 0 if none routed).
    #[serde(with = "nonfinite")]
    pub max_load: f64,
    /// Token-slots dropped by capacity.
    pub dropped: u64,
    /// Fraction of top-k slots spent on null slots.
    #[serde(with = "nonfinite")]
    pub null_share: f64,
    /// Mean routed (non-null) experts per token, `K · (1 − null_share)`.
    #[serde(with = "nonfinite")]
    pub real_experts_per_token: f64,
    /// (domains, E) assignments kept after capacity per expert, split by the data
    /// domain of the token; empty if untracked (a single domain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens_per_expert_by_domain: Vec<Vec<u64>>,
    /// Mean shared-expert gate `σ(x · w_gᵀ)` over the step's tokens; `None` without
    /// `moe.shared_expert_gate`.
    #[serde(
        with = "nonfinite::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub shared_gate_mean: Option<f64>,
}

impl MoeLayerStats {
    /// Statistics from raw counts: `tokens_per_expert` (E,), `dropped` slots,
    /// `null_slots` chosen, `tokens` routed and `top_k` slots per token.
    pub fn from_counts(
        layer: usize,
        tokens_per_expert: Vec<u64>,
        dropped: u64,
        null_slots: u64,
        tokens: u64,
        top_k: usize,
    ) -> Self {
        let routed: u64 = tokens_per_expert.iter().sum();
        let max = tokens_per_expert.iter().copied().max().unwrap_or(0);
        let max_load = if routed > 0 {
            max as f64 * tokens_per_expert.len() as f64 / routed as f64
        } else {
            0.0
        };
        let slots = tokens as f64 * top_k as f64;
        let null_share = if slots > 0.0 {
            null_slots as f64 / slots
        } else {
            0.0
        };
        MoeLayerStats {
            layer,
            tokens_per_expert,
            max_load,
            dropped,
            null_share,
            real_experts_per_token: top_k as f64 * (1.0 - null_share),
            tokens_per_expert_by_domain: Vec::new(),
            shared_gate_mean: None,
        }
    }
}

/// (domains, E) routed slots per expert split by the domain of each token, for
/// [`MoeLayerStats::tokens_per_expert_by_domain`].
///
/// `token_domains` is (N,) (see [`crate::Batch::token_domains`]); `slot_experts` is
/// (N·K,) row-major, `Some(e)` for a slot routed to routed expert `e` and `None` for a
/// null slot. Slots naming an expert `≥ num_experts` or a domain `≥ num_domains` are
/// ignored (they cannot come from a consistent router).
pub fn domain_expert_counts(
    token_domains: &[crate::data::DomainId],
    slot_experts: &[Option<usize>],
    top_k: usize,
    num_domains: usize,
    num_experts: usize,
) -> Vec<Vec<u64>> {
    let mut counts = vec![vec![0u64; num_experts]; num_domains];
    if top_k == 0 {
        return counts;
    }
    for (token, slots) in slot_experts.chunks(top_k).enumerate() {
        let Some(domain) = token_domains.get(token) else {
            break;
        };
        let Some(row) = counts.get_mut(domain.0 as usize) else {
            continue;
        };
        for &e in slots.iter().flatten() {
            if let Some(c) = row.get_mut(e) {
                *c += 1;
            }
        }
    }
    counts
}

/// How much an MoE layer's routing tells about the data domain, from (domains, E)
/// counts of kept assignments ([`MoeLayerStats::tokens_per_expert_by_domain`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DomainSpecialisation {
    /// Mutual information `I(domain; expert)` in bits between the domain of a token and
    /// the expert an assignment went to, over the empirical joint distribution.
    pub mutual_information_bits: f64,
    /// `H(domain)` in bits under the same distribution; `I / H(domain)` is the share of
    /// the domain's information the routing carries (1 = the expert names the domain).
    pub domain_entropy_bits: f64,
    /// Assignments counted.
    pub assignments: u64,
}

impl DomainSpecialisation {
    /// `I / H(domain)` in [0, 1] (0 when `H(domain) = 0`).
    pub fn normalised(&self) -> f64 {
        if self.domain_entropy_bits > 0.0 {
            self.mutual_information_bits / self.domain_entropy_bits
        } else {
            0.0
        }
    }
}

/// `I(domain; expert) = Σ p(d,e) log2(p(d,e) / (p(d) p(e)))` and `H(domain)` of
/// (domains, E) counts; `None` when nothing is counted. Rows may differ in length
/// (missing entries are 0).
pub fn domain_specialisation(counts: &[Vec<u64>]) -> Option<DomainSpecialisation> {
    let total: u64 = counts.iter().flatten().sum();
    if total == 0 {
        return None;
    }
    let n = total as f64;
    let experts = counts.iter().map(Vec::len).max().unwrap_or(0);
    let p_d: Vec<f64> = counts
        .iter()
        .map(|r| r.iter().sum::<u64>() as f64 / n)
        .collect();
    let p_e: Vec<f64> = (0..experts)
        .map(|e| counts.iter().filter_map(|r| r.get(e)).sum::<u64>() as f64 / n)
        .collect();
    let mut mi = 0.0;
    for (d, row) in counts.iter().enumerate() {
        for (e, &c) in row.iter().enumerate() {
            if c > 0 {
                let p = c as f64 / n;
                mi += p * (p / (p_d[d] * p_e[e])).log2();
            }
        }
    }
    let h_d = -p_d
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| p * p.log2())
        .sum::<f64>();
    Some(DomainSpecialisation {
        mutual_information_bits: mi.max(0.0),
        domain_entropy_bits: h_d,
        assignments: total,
    })
}

/// GateSkip: fraction of tokens whose branch was kept (not skipped) in one layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GateSkipStats {
    /// Layer index.
    pub layer: usize,
    /// Kept fraction of the attention branch.
    #[serde(with = "nonfinite")]
    pub attn_kept: f64,
    /// Kept fraction of the MLP / MoE branch.
    #[serde(with = "nonfinite")]
    pub mlp_kept: f64,
}

/// FlexiDepth: how many layers tokens actually went through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FlexiDepthStats {
    /// Mean number of layers a token was processed by (not skipped).
    #[serde(with = "nonfinite")]
    pub mean_layers_used: f64,
    /// Layers in the model.
    pub num_layers: usize,
    /// (layer, fraction of tokens processed) for each layer with a depth router.
    #[serde(with = "nonfinite::pairs")]
    pub kept: Vec<(usize, f64)>,
}

/// Everything measured in one optimizer step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Step number, 1-based (step 1 is the first update).
    pub step: u64,
    /// Loss components.
    pub loss: LossParts,
    /// Global gradient norm before clipping.
    #[serde(with = "nonfinite")]
    pub grad_norm: f64,
    /// Learning rate used.
    #[serde(with = "nonfinite")]
    pub lr: f64,
    /// True when the NaN/Inf guard skipped this update.
    #[serde(default)]
    pub skipped: bool,
    /// Tokens processed in the step (global batch · T).
    pub tokens: u64,
    /// Wall seconds of the step.
    #[serde(with = "nonfinite")]
    pub step_time_s: f64,
    /// `tokens / step_time_s`.
    #[serde(with = "nonfinite")]
    pub tokens_per_s: f64,
    /// Estimated model FLOPs utilisation (see [`mfu`]); `None` when peak is unknown.
    #[serde(with = "nonfinite::option", default)]
    pub mfu: Option<f64>,
    /// Peak bytes of live tensors during the step (measured by the tensor
    /// crate's live-bytes counter): `state_bytes + activation_bytes`.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Tensor bytes alive when the step began: parameters, optimizer state and
    /// other persistent buffers (0 in records written before it was measured).
    #[serde(default)]
    pub state_bytes: u64,
    /// Peak tensor bytes the step added on top of `state_bytes`: activations
    /// kept for backward, gradients and temporaries (what recompute and
    /// micro-batching change; 0 in records written before it was measured).
    #[serde(default)]
    pub activation_bytes: u64,
    /// Per MoE layer routing stats.
    #[serde(default)]
    pub moe: Vec<MoeLayerStats>,
    /// Per layer GateSkip kept fractions.
    #[serde(default)]
    pub gate_skip: Vec<GateSkipStats>,
    /// FlexiDepth stats, if enabled.
    #[serde(default)]
    pub flexi_depth: Option<FlexiDepthStats>,
    /// Unweighted MTP cross-entropies `CE_k`, k = 1..D (empty without MTP).
    #[serde(
        with = "nonfinite::vec",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub mtp_losses: Vec<f64>,
    /// Achieved model FLOP/s: training FLOPs per token (see
    /// [`training_flops_per_token`]) times `tokens_per_s`.
    #[serde(with = "nonfinite", default)]
    pub flops_per_s: f64,
    /// Muon's learning rate this step; `None` when Muon is not in use.
    #[serde(
        with = "nonfinite::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub muon_lr: Option<f64>,
    /// Explicit device→host reads during the step (the tensor crate's process-wide
    /// counter, `megamoe_tensor::host_reads`): each is a synchronisation on a device.
    #[serde(default)]
    pub host_reads: u64,
    /// Bytes of saved activations moved to pinned host memory during the step
    /// (`train.offload`; 0 without offload or in records written before it was measured).
    #[serde(default)]
    pub offload_bytes: u64,
    /// The GPU memory pool over the step (`None` on the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_pool: Option<GpuPoolBytes>,
}

/// A GPU's stream-ordered memory pool over one step, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuPoolBytes {
    /// Held by the pool at the step's end (buffers in use plus cached free blocks).
    pub reserved: u64,
    /// In use at the step's end (parameters, optimizer state, gradient buffers).
    pub used: u64,
    /// Highest use during the step.
    pub peak: u64,
}

impl StepMetrics {
    /// Dropped slots over routed slots, all MoE layers together (0 without MoE).
    pub fn drop_fraction(&self) -> f64 {
        let routed: u64 = self.moe.iter().flat_map(|l| &l.tokens_per_expert).sum();
        let dropped: u64 = self.moe.iter().map(|l| l.dropped).sum();
        if routed > 0 {
            dropped as f64 / routed as f64
        } else {
            0.0
        }
    }

    /// Worst `max_load` over MoE layers (`None` without MoE).
    pub fn max_load(&self) -> Option<f64> {
        self.moe.iter().map(|l| l.max_load).reduce(f64::max)
    }
}

/// Held-out loss of one domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainLoss {
    /// Domain name.
    pub domain: String,
    /// Mean LM loss over its tokens (nats/token).
    #[serde(with = "nonfinite")]
    pub loss: f64,
    /// Tokens evaluated.
    pub tokens: u64,
}

/// One evaluation on held-out data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Training step after which it ran.
    pub step: u64,
    /// Mean LM loss over all held-out tokens (nats/token).
    #[serde(with = "nonfinite")]
    pub loss: f64,
    /// Tokens evaluated.
    pub tokens: u64,
    /// Loss per data domain.
    #[serde(default)]
    pub per_domain: Vec<DomainLoss>,
    /// Wall seconds the eval took.
    #[serde(with = "nonfinite")]
    pub time_s: f64,
}

/// Static facts about a run, written when a process starts (or resumes) it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Step the process starts from (0 fresh, else the resumed checkpoint's step).
    pub start_step: u64,
    /// Total steps the run aims for.
    pub total_steps: u64,
    /// Parameters in the model.
    pub params: u64,
    /// Parameters active per token (MoE: top-k experts only).
    pub active_params: u64,
    /// Data source name.
    pub data: String,
    /// Domain names, indexed by domain id.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Device description, e.g. "cpu (2 threads)".
    pub device: String,
    /// What `train.dtype` means on that device, e.g. "f32" or the bf16 mixed-precision
    /// split (empty in records written before it was recorded).
    #[serde(default)]
    pub numerics: String,
}

/// Goodput totals at a step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GoodputRecord {
    /// Step at which the totals were taken.
    pub step: u64,
    /// Totals so far (across resumed segments).
    pub totals: GoodputTotals,
}

/// A generated text sample.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// Step after which it was generated.
    pub step: u64,
    /// The prompt.
    pub prompt: String,
    /// The continuation.
    pub text: String,
}

/// One line of `metrics.jsonl`.
// A run's records are a few thousand at most (one per logged step): the step variant's
// size costs little, and boxing it would change the public variant's type.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum MetricsRecord {
    /// A process started or resumed the run.
    Run(RunInfo),
    /// One optimizer step.
    Step(StepMetrics),
    /// One held-out evaluation.
    Eval(EvalMetrics),
    /// Goodput totals.
    Goodput(GoodputRecord),
    /// A generated sample.
    Sample(SampleRecord),
    /// A config key a resume changed (one of the keys a resume may change).
    ConfigChange(ConfigChangeRecord),
}

/// A config key set to another value when the run was resumed at `step`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigChangeRecord {
    /// The step the run resumed from; the new value holds from the next step.
    pub step: u64,
    /// `section.key`, e.g. `train.steps`.
    pub key: String,
    /// The value before (TOML text).
    pub old: String,
    /// The value after (TOML text).
    pub new: String,
}

/// Appends records to a JSONL file, one flushed line each.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Opens `path` for appending (creating it and its directory if needed). A
    /// partial last line left by a crash is cut off first.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        cut_partial_last_line(&mut file, path)?;
        Ok(MetricsWriter {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a line and flushes it.
    pub fn write(&mut self, record: &MetricsRecord) -> Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|source| Error::Serialize {
            what: "metrics record",
            source,
        })?;
        line.push(b'\n');
        // One write_all of the whole line: with O_APPEND the line lands contiguously.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io("append", &self.path, e))
    }
}

fn cut_partial_last_line(file: &mut File, path: &Path) -> Result<()> {
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    if len == 0 {
        return Ok(());
    }
    let mut contents = Vec::new();
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("seek", path, e))?;
    std::io::Read::read_to_end(file, &mut contents).map_err(|e| Error::io("read", path, e))?;
    if contents.last() != Some(&b'\n') {
        let keep = contents
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        log::warn!(
            "{}: dropping a partial last line ({} bytes) left by an interrupted write",
            path.display(),
            contents.len() - keep
        );
        file.set_len(keep as u64)
            .map_err(|e| Error::io("truncate", path, e))?;
    }
    Ok(())
}

/// Reads every record of a metrics file. A final line without newline that does not
/// parse (a write cut by a crash) is skipped; any other bad line is an error naming
/// the line.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut reader = BufReader::new(file);
    let mut records = Vec::new();
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            break;
        }
        number += 1;
        let terminated = line.ends_with('\n');
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match serde_json::from_str(text) {
            Ok(record) => records.push(record),
            Err(_) if !terminated => {
                log::warn!("{}:{number}: skipping a partial last line", path.display());
            }
            Err(source) => {
                return Err(Error::MetricsParse {
                    path: path.to_path_buf(),
                    line: number,
                    source,
                })
            }
        }
    }
    Ok(records)
}

/// The step records, the last one per step number, ordered by step.
pub fn latest_steps(records: &[MetricsRecord]) -> Vec<&StepMetrics> {
    let mut by_step = std::collections::BTreeMap::new();
    for r in records {
        if let MetricsRecord::Step(s) = r {
            by_step.insert(s.step, s);
        }
    }
    by_step.into_values().collect()
}

/// The eval records, the last one per step number, ordered by step.
pub fn latest_evals(records: &[MetricsRecord]) -> Vec<&EvalMetrics> {
    let mut by_step = std::collections::BTreeMap::new();
    for r in records {
        if let MetricsRecord::Eval(e) = r {
            by_step.insert(e.step, e);
        }
    }
    by_step.into_values().collect()
}

/// Training FLOPs per token, `6·N + 6·L·H·T`: 2 FLOPs per matmul parameter forward and
/// 4 backward (`N` = the parameters a token multiplies with: the active ones without the
/// embedding table, which is a lookup — unless it is tied to the LM head), plus causal
/// attention scores and values (`L` layers, `H` = heads · head_dim, `T` = sequence length;
/// `12·L·H·T` for full attention, halved by the causal mask) — the count PyTorch-side MFU
/// figures of the same model use, so the two are comparable.
pub fn training_flops_per_token(
    matmul_params: u64,
    num_layers: usize,
    hidden: usize,
    seq_len: usize,
) -> f64 {
    6.0 * matmul_params as f64 + 6.0 * num_layers as f64 * hidden as f64 * seq_len as f64
}

/// Model FLOPs utilisation: achieved model FLOP/s over the hardware peak.
pub fn mfu(flops_per_token: f64, tokens_per_s: f64, peak_flops: f64) -> f64 {
    if peak_flops > 0.0 {
        flops_per_token * tokens_per_s / peak_flops
    } else {
        0.0
    }
}

/// Resident set size of this process from `/proc/self/status` (Linux); `None`
/// elsewhere or if unreadable.
pub fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;

    fn step(n: u64, lm: f64) -> StepMetrics {
        StepMetrics {
            step: n,
            loss: LossParts {
                total: lm + 0.01,
                lm,
                aux: 0.01,
                ..Default::default()
            },
            grad_norm: 1.5,
            lr: 3e-4,
            tokens: 1024,
            step_time_s: 0.5,
            tokens_per_s: 2048.0,
            moe: vec![MoeLayerStats::from_counts(
                1,
                vec![10, 30, 20, 20],
                4,
                16,
                48,
                2,
            )],
            ..Default::default()
        }
    }

    #[test]
    fn moe_layer_stats_from_counts_match_hand_computation() {
        let s = MoeLayerStats::from_counts(1, vec![10, 30, 20, 20], 4, 16, 48, 2);
        // mean = 80 / 4 = 20, max = 30 → max_load 1.5.
        assert!((s.max_load - 1.5).abs() < 1e-12);
        // 48 tokens · 2 slots = 96; 16 null → share 1/6; real = 2 · 5/6 = 5/3.
        assert!((s.null_share - 1.0 / 6.0).abs() < 1e-12);
        assert!((s.real_experts_per_token - 5.0 / 3.0).abs() < 1e-12);
        let empty = MoeLayerStats::from_counts(0, vec![0, 0], 0, 0, 0, 2);
        assert_eq!((empty.max_load, empty.null_share), (0.0, 0.0));
    }

    #[test]
    fn domain_expert_counts_tally_slots_by_token_domain() {
        use crate::data::DomainId;
        // 3 tokens, K = 2: token 0 (domain 1) → experts 0, 2; token 1 (domain 0) →
        // expert 2 and a null slot; token 2 (domain 1) → expert 2 twice.
        let domains = [DomainId(1), DomainId(0), DomainId(1)];
        let slots = [Some(0), Some(2), Some(2), None, Some(2), Some(2)];
        let c = domain_expert_counts(&domains, &slots, 2, 2, 3);
        assert_eq!(c, vec![vec![0, 0, 1], vec![1, 0, 3]]);
    }

    #[test]
    fn domain_specialisation_is_mutual_information_in_bits() {
        // Two equally frequent domains, each sent wholly to its own expert: the expert
        // names the domain, I = H(domain) = 1 bit.
        let s = domain_specialisation(&[vec![5, 0], vec![0, 5]]).unwrap();
        assert!((s.mutual_information_bits - 1.0).abs() < 1e-12);
        assert!((s.domain_entropy_bits - 1.0).abs() < 1e-12);
        assert!((s.normalised() - 1.0).abs() < 1e-12);
        assert_eq!(s.assignments, 10);
        // Both domains split the same way over the experts: independent, I = 0.
        let s = domain_specialisation(&[vec![1, 3], vec![2, 6]]).unwrap();
        assert!(s.mutual_information_bits.abs() < 1e-12);
        // Hand value: counts [[2, 1], [0, 1]] of 4. p(d) = (3/4, 1/4), p(e) = (1/2, 1/2).
        // I = 2/4·log2((2/4)/(3/8)) + 1/4·log2((1/4)/(3/8)) + 1/4·log2((1/4)/(1/8))
        //   = 0.5·log2(4/3) + 0.25·log2(2/3) + 0.25·1 = 0.311278...
        let s = domain_specialisation(&[vec![2, 1], vec![0, 1]]).unwrap();
        let want = 0.5 * (4.0f64 / 3.0).log2() + 0.25 * (2.0f64 / 3.0).log2() + 0.25;
        assert!((s.mutual_information_bits - want).abs() < 1e-12);
        // H(domain) = −(3/4 log2 3/4 + 1/4 log2 1/4) = 0.811278...
        assert!((s.domain_entropy_bits - 0.811_278_124_459_132_9).abs() < 1e-12);
        assert_eq!(domain_specialisation(&[vec![0, 0]]), None);
    }

    #[test]
    fn step_drop_fraction_and_max_load_aggregate_layers() {
        let mut m = step(1, 2.0);
        m.moe.push(MoeLayerStats::from_counts(
            3,
            vec![40, 0, 0, 0],
            20,
            0,
            20,
            2,
        ));
        // dropped (4 + 20) / routed (80 + 40) = 0.2; max_load max(1.5, 4.0) = 4.
        assert!((m.drop_fraction() - 0.2).abs() < 1e-12);
        assert_eq!(m.max_load(), Some(4.0));
        assert_eq!(StepMetrics::default().max_load(), None);
    }

    #[test]
    fn writer_then_reader_round_trips_all_record_kinds() {
        let dir = TestDir::new("metrics_round_trip");
        let path = dir.path().join("run").join(METRICS_FILE);
        let records = vec![
            MetricsRecord::Run(RunInfo {
                total_steps: 20,
                domains: vec!["copy".into()],
                ..Default::default()
            }),
            MetricsRecord::Step(step(1, 5.5)),
            MetricsRecord::Eval(EvalMetrics {
                step: 1,
                loss: 5.4,
                tokens: 512,
                per_domain: vec![DomainLoss {
                    domain: "copy".into(),
                    loss: 5.3,
                    tokens: 512,
                }],
                time_s: 0.1,
            }),
            MetricsRecord::Goodput(GoodputRecord {
                step: 1,
                totals: GoodputTotals {
                    wall_s: 2.0,
                    step_s: 1.0,
                    ..Default::default()
                },
            }),
            MetricsRecord::Sample(SampleRecord {
                step: 1,
                prompt: "copy ab>".into(),
                text: "ab;\n\"quoted\"".into(),
            }),
        ];
        let mut w = MetricsWriter::open(&path).unwrap();
        for r in &records {
            w.write(r).unwrap();
        }
        assert_eq!(read_metrics(&path).unwrap(), records);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5);
        assert!(text
            .lines()
            .nth(1)
            .unwrap()
            .starts_with(r#"{"kind":"step","step":1,"#));
    }

    #[test]
    fn non_finite_values_are_written_as_strings_and_read_back() {
        let dir = TestDir::new("metrics_nan");
        let path = dir.path().join(METRICS_FILE);
        let mut m = step(7, f64::NAN);
        m.skipped = true;
        m.grad_norm = f64::INFINITY;
        m.lr = f64::INFINITY;
        m.mtp_losses = vec![f64::NAN];
        MetricsWriter::open(&path)
            .unwrap()
            .write(&MetricsRecord::Step(m))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        for field in [r#""lm":"NaN""#, r#""lr":"inf""#, r#""mtp_losses":["NaN"]"#] {
            assert!(text.contains(field), "{field} in {text}");
        }
        let back = read_metrics(&path).unwrap();
        let MetricsRecord::Step(s) = &back[0] else {
            panic!("not a step record")
        };
        assert!(s.loss.lm.is_nan() && s.skipped);
        assert_eq!((s.grad_norm, s.lr), (f64::INFINITY, f64::INFINITY));
        // A record an older build wrote (`null` for non-finite) still reads.
        let old = text.replace(r#""lr":"inf""#, r#""lr":null"#);
        std::fs::write(&path, old).unwrap();
        let MetricsRecord::Step(s) = &read_metrics(&path).unwrap()[0] else {
            panic!("not a step record")
        };
        assert!(s.lr.is_nan());
    }

    #[test]
    fn partial_last_line_is_skipped_by_reader_and_cut_by_writer() {
        let dir = TestDir::new("metrics_partial");
        let path = dir.path().join(METRICS_FILE);
        let mut w = MetricsWriter::open(&path).unwrap();
        w.write(&MetricsRecord::Step(step(1, 3.0))).unwrap();
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"kind":"step","step":2,"lo"#).unwrap();
        drop(f);
        assert_eq!(read_metrics(&path).unwrap().len(), 1);
        let mut w = MetricsWriter::open(&path).unwrap();
        w.write(&MetricsRecord::Step(step(2, 2.0))).unwrap();
        let steps: Vec<u64> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|r| match r {
                MetricsRecord::Step(s) => s.step,
                _ => 0,
            })
            .collect();
        assert_eq!(steps, [1, 2]);
    }

    #[test]
    fn floats_read_back_bit_exact() {
        // 3.7362734306282874 is the shortest repr of an f64 that serde_json's default
        // fast parser reads back one ulp off; the crate enables `float_roundtrip`.
        let dir = TestDir::new("metrics_float");
        let path = dir.path().join(METRICS_FILE);
        let lm = 3.7362734306282874_f64;
        let mut w = MetricsWriter::open(&path).unwrap();
        w.write(&MetricsRecord::Step(step(1, lm))).unwrap();
        let MetricsRecord::Step(s) = &read_metrics(&path).unwrap()[0] else {
            panic!("not a step record")
        };
        assert_eq!(s.loss.lm.to_bits(), lm.to_bits());
    }

    #[test]
    fn bad_line_in_the_middle_is_error_naming_the_line() {
        let dir = TestDir::new("metrics_bad");
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(
            &path,
            "{\"kind\":\"eval\",\"step\":1,\"loss\":2.0,\"tokens\":1,\"time_s\":0}\nnot json\n",
        )
        .unwrap();
        let err = read_metrics(&path).unwrap_err();
        assert!(matches!(err, Error::MetricsParse { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("metrics.jsonl:2"), "{err}");
    }

    #[test]
    fn latest_steps_keeps_last_record_per_step_in_order() {
        let records = vec![
            MetricsRecord::Step(step(1, 5.0)),
            MetricsRecord::Step(step(2, 4.0)),
            MetricsRecord::Step(step(3, 3.9)),
            // Resume from a checkpoint at step 1: steps 2 and 3 are logged again.
            MetricsRecord::Step(step(2, 4.1)),
            MetricsRecord::Step(step(3, 3.8)),
        ];
        let lms: Vec<(u64, f64)> = latest_steps(&records)
            .iter()
            .map(|s| (s.step, s.loss.lm))
            .collect();
        assert_eq!(lms, [(1, 5.0), (2, 4.1), (3, 3.8)]);
    }

    #[test]
    fn flops_count_matmul_params_and_causal_attention() {
        // 6 · 1e6 + 6 · 2 · 64 · 128 = 6_000_000 + 98_304 (causal: half of 12·L·H·T).
        assert_eq!(training_flops_per_token(1_000_000, 2, 64, 128), 6_098_304.0);
        // 1e9 FLOPs/token · 100 tok/s over 1e12 peak = 0.1.
        assert!((mfu(1e9, 100.0, 1e12) - 0.1).abs() < 1e-12);
        assert_eq!(mfu(1e9, 100.0, 0.0), 0.0);
    }

    #[test]
    fn resident_memory_is_reported_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = resident_memory_bytes().unwrap();
            // A running test binary occupies more than 1 MiB and less than 1 TiB.
            assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
        }
    }
}
