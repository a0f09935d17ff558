//! Size bounds: a config whose tensors cannot fit in the memory it will run on
//! is refused before anything is allocated or enumerated.
//!
//! [`check_memory_bounds`] computes, in constant time (no loop over layers,
//! experts or ranks) and with 128-bit saturating products, lower bounds of
//! what one rank must hold: its share of the parameters (every parameter lives
//! on at least one rank, so some rank holds at least total / world) plus the
//! largest transient tensor of one micro-batch (hidden states, FFN and expert
//! activations, router scores, logits, one sequence's attention scores). If
//! that exceeds the [`MemoryLimit`] the run can never fit, whatever the
//! schedule, recompute or ZeRO level, and [`PlanError::ExceedsMemory`] names
//! the biggest term and its bytes. Runs that pass may still not fit: the full
//! per-rank model is [`crate::memory`].

use crate::error::{PlanError, Result};
use crate::plan::{BatchPlan, ModelPlan, ParallelPlan};
use crate::raw::RawConfig;

/// Largest world (pp·dp·ep·cp·tp) the planner accepts: it lists every rank and group.
pub const MAX_WORLD: usize = 1 << 20;

/// The memory one rank may use, and where that number comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    /// Bytes per rank.
    pub bytes: u64,
    /// Where the number comes from, e.g. "RAM (MemTotal in /proc/meminfo)".
    pub source: String,
}

impl MemoryLimit {
    /// `gib` GiB per device, as named by a flag such as `--device-gib`.
    pub fn per_device(gib: f64, flag: &str) -> MemoryLimit {
        MemoryLimit {
            bytes: (gib.max(0.0) * GIB).min(u64::MAX as f64) as u64,
            source: format!("device memory ({flag} {gib})"),
        }
    }

    /// This machine's total RAM (`MemTotal` of /proc/meminfo); `None` where
    /// that file does not exist or has no such line.
    pub fn host_ram() -> Option<MemoryLimit> {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        Some(MemoryLimit {
            bytes: parse_mem_total(&text)?,
            source: "RAM, MemTotal in /proc/meminfo".into(),
        })
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// `MemTotal:  24684092 kB` → bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    let scale = match words.next() {
        Some("kB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    value.checked_mul(scale)
}

/// Bytes as "12.3 GiB" (or "≥ 3.4e38 B" when a product saturated).
pub fn human_bytes(bytes: u128) -> String {
    if bytes == u128::MAX {
        return "more than 2^128 B".into();
    }
    let b = bytes as f64;
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Product of `factors` in u128, saturating.
fn prod(factors: &[usize]) -> u128 {
    factors
        .iter()
        .fold(1u128, |acc, &f| acc.saturating_mul(f as u128))
}

/// Number of multiples of `f` in `[0, n)`.
fn multiples_below(n: usize, f: usize) -> usize {
    n / f + usize::from(!n.is_multiple_of(f))
}

/// One term of the bound.
struct Term {
    what: &'static str,
    bytes: u128,
}

/// Refuses `raw` when one rank's share of the parameters plus its largest
/// transient tensor of one micro-batch exceeds `limit` (module doc). Constant
/// time in every size.
pub(crate) fn check_memory_bounds(
    raw: &RawConfig,
    model: &ModelPlan,
    par: &ParallelPlan,
    batch: &BatchPlan,
    limit: &MemoryLimit,
) -> Result<()> {
    let elem = raw.train.dtype.bytes();
    let world = par.pp * par.dp * par.ep * par.cp * par.tp; // ≤ MAX_WORLD, checked before
    let (d, l, v) = (model.d_model, model.n_layers, model.vocab_size);
    let t = batch.tokens_per_micro_batch;
    let hd = model.head_dim;
    let moe = raw.moe.as_ref().filter(|s| s.routed_experts > 0);
    let moe_layers = moe.map_or(0, |s| {
        let f = s.layer_freq.max(1);
        multiples_below(l, f).saturating_sub(multiples_below(s.first_dense_layers.min(l), f))
    });
    let dense_layers = l - moe_layers;
    let embeddings = if model.tie_embeddings { 1 } else { 2 };
    let dense_m = model.dense_activation.matrices();
    let share = |count: u128| count.div_ceil(world as u128);
    let mut params = vec![
        Term {
            what: "embedding and head weights (model.vocab_size x model.d_model)",
            bytes: share(prod(&[embeddings, v, d, elem])),
        },
        Term {
            what: "attention weights (model.n_layers x model.d_model x heads)",
            bytes: share(prod(&[
                l,
                2 * d,
                (model.n_heads + model.n_kv_heads),
                hd,
                elem,
            ])),
        },
        Term {
            what: "dense FFN weights (dense layers x model.ffn_hidden x model.d_model)",
            bytes: share(prod(&[dense_layers, dense_m, model.ffn_hidden, d, elem])),
        },
    ];
    let mut transient = vec![
        Term {
            what: "hidden states of one micro-batch (tokens x model.d_model)",
            bytes: prod(&[t, d, elem]),
        },
        Term {
            what: "logits of one micro-batch (tokens x model.vocab_size, f32)",
            bytes: prod(&[t, v / par.tp, 4]),
        },
        Term {
            what: "attention scores of one sequence (model.seq_len^2 x heads)",
            bytes: prod(&[
                model.seq_len / par.cp,
                model.seq_len,
                model.n_heads / par.tp,
                elem,
            ]),
        },
    ];
    if dense_layers > 0 {
        transient.push(Term {
            what: "dense FFN activations of one micro-batch (tokens x model.ffn_hidden)",
            bytes: prod(&[t, model.ffn_hidden / par.tp, elem]),
        });
    }
    if let Some(s) = moe {
        let eh = s.expert_hidden.unwrap_or(model.ffn_hidden);
        params.push(Term {
            what: "expert weights (moe.routed_experts x moe.expert_hidden x MoE layers)",
            bytes: share(prod(&[
                moe_layers,
                s.routed_experts,
                s.activation.matrices(),
                eh,
                d,
                elem,
            ])),
        });
        transient.push(Term {
            what: "expert activations of one micro-batch (tokens x moe.top_k x moe.expert_hidden)",
            bytes: prod(&[t, s.top_k, eh / par.tp, elem]),
        });
        transient.push(Term {
            what: "router scores of one micro-batch (tokens x moe.routed_experts, f32)",
            bytes: prod(&[t, s.routed_experts, 4]),
        });
    }
    let params_total = params.iter().fold(0u128, |a, t| a.saturating_add(t.bytes));
    let transient_max = transient.iter().map(|t| t.bytes).max().unwrap_or(0);
    let need = params_total.saturating_add(transient_max);
    if need <= limit.bytes as u128 {
        return Ok(());
    }
    let biggest = params
        .iter()
        .chain(transient.iter())
        .max_by_key(|t| t.bytes)
        .expect("terms are never empty");
    Err(PlanError::ExceedsMemory {
        term: biggest.what,
        term_bytes: human_bytes(biggest.bytes),
        need: human_bytes(need),
        limit: human_bytes(limit.bytes as u128),
        origin: limit.source.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_kib() {
        let text = "MemFree:  10 kB\nMemTotal:       24684092 kB\n";
        assert_eq!(parse_mem_total(text), Some(24684092 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 1 MB\n"), None);
    }

    #[test]
    fn multiples_below_counts_layer_indices() {
        // Layers 0..10 with freq 3: 0, 3, 6, 9.
        assert_eq!(multiples_below(10, 3), 4);
        assert_eq!(multiples_below(9, 3), 3);
        assert_eq!(multiples_below(0, 3), 0);
        assert_eq!(multiples_below(usize::MAX, 1), usize::MAX);
    }

    #[test]
    fn bytes_are_printed_in_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(u128::MAX), "more than 2^128 B");
    }
}
