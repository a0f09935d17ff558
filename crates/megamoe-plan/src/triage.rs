//! OOM triage (seed `oom_triage_sample.py` and `distributed_memory_notes.md`).
//!
//! Memory is split into eight buckets so an OOM can be read as model-state
//! pressure or activation pressure. Triage follows the seed's order:
//!
//! 1. estimate the buckets;
//! 2. read the allocator counters;
//! 3. subtract model state from allocated bytes;
//! 4. only then choose a mitigation for the dominant bucket.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The eight per-device buckets, in the seed's order (ties in
/// [`dominant_pressure`] go to the earlier one, as Python's `max` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryBucket {
    /// Parameters (plus FSDP gather buffers).
    Parameters,
    /// Gradients.
    Gradients,
    /// Optimizer state (moments, f32 master weights).
    OptimizerState,
    /// Saved activations of in-flight microbatches.
    Activations,
    /// MoE dispatch/combine buffers, expert intermediates, router state.
    MoeRouting,
    /// MTP, GateSkip and FlexiDepth activations.
    FeatureActivations,
    /// Allocator reserve / fragmentation.
    RuntimeReserved,
    /// Fixed overhead (context, library workspaces, communication buffers).
    Overhead,
}

impl MemoryBucket {
    /// All buckets in seed order.
    pub const ALL: [MemoryBucket; 8] = [
        MemoryBucket::Parameters,
        MemoryBucket::Gradients,
        MemoryBucket::OptimizerState,
        MemoryBucket::Activations,
        MemoryBucket::MoeRouting,
        MemoryBucket::FeatureActivations,
        MemoryBucket::RuntimeReserved,
        MemoryBucket::Overhead,
    ];

    /// The seed's bucket name.
    pub fn name(self) -> &'static str {
        match self {
            MemoryBucket::Parameters => "parameters",
            MemoryBucket::Gradients => "gradients",
            MemoryBucket::OptimizerState => "optimizer_state",
            MemoryBucket::Activations => "activations",
            MemoryBucket::MoeRouting => "moe_routing",
            MemoryBucket::FeatureActivations => "feature_activations",
            MemoryBucket::RuntimeReserved => "runtime_reserved",
            MemoryBucket::Overhead => "overhead",
        }
    }

    /// Mitigations for this bucket, most effective first.
    pub fn mitigations(self) -> &'static [&'static str] {
        match self {
            MemoryBucket::Parameters => &[
                "shard parameters: parallel.fsdp=3 (ZeRO-3) over the data-parallel group",
                "split matrices or layers: raise parallel.tp or parallel.pp",
                "split experts: raise parallel.ep",
            ],
            MemoryBucket::Gradients => &[
                "shard gradients: parallel.fsdp=2 or 3",
                "raise parallel.pp / parallel.tp / parallel.ep to hold fewer parameters per rank",
            ],
            MemoryBucket::OptimizerState => &[
                "shard optimizer state: parallel.fsdp=1 (ZeRO-1) or higher",
                "use optim.name=\"muon\" (one moment instead of AdamW's two)",
                "raise parallel.pp / parallel.ep to hold fewer parameters per rank",
            ],
            MemoryBucket::Activations => &[
                "reduce activation lifetime: train.recompute=\"selective\" or \"full\"",
                "raise parallel.microbatches (smaller micro-batches, same global batch)",
                "split activations: parallel.sp=true with tp>1, or parallel.cp>1",
                "prefer a schedule with fewer in-flight microbatches (1f1b over gpipe)",
            ],
            MemoryBucket::MoeRouting => &[
                "bound expert buffers: set moe.capacity_factor (e.g. 1.25) instead of dropless",
                "lower moe.top_k or raise parallel.ep to spread experts",
                "trim temporary dispatch buffers: raise parallel.microbatches",
            ],
            MemoryBucket::FeatureActivations => &[
                "lower mtp.depth or use mtp.mode=\"shared\"",
                "use gateskip.gate=\"scalar\" instead of \"vector\"",
                "lower flexidepth.adaptive_layers",
            ],
            MemoryBucket::RuntimeReserved => &[
                "reduce fragmentation: fixed shapes (moe.pad_to_capacity=true with a capacity factor)",
                "compare reserved vs allocated counters; free cached blocks between phases",
            ],
            MemoryBucket::Overhead => &[
                "overhead is fixed per process: use fewer, larger ranks, or a larger device",
            ],
        }
    }
}

impl fmt::Display for MemoryBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Per-device memory in GiB per bucket (seed `MemoryBreakdown`, same field names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryBreakdown {
    /// Parameters.
    pub params_gb: f64,
    /// Gradients.
    pub gradients_gb: f64,
    /// Optimizer state.
    pub optimizer_gb: f64,
    /// Activations.
    pub activations_gb: f64,
    /// MoE routing buffers.
    pub moe_routing_gb: f64,
    /// Feature activations.
    pub feature_activations_gb: f64,
    /// Runtime reserve.
    pub runtime_reserved_gb: f64,
    /// Overhead.
    pub overhead_gb: f64,
}

impl MemoryBreakdown {
    /// The value of one bucket.
    pub fn get(&self, bucket: MemoryBucket) -> f64 {
        match bucket {
            MemoryBucket::Parameters => self.params_gb,
            MemoryBucket::Gradients => self.gradients_gb,
            MemoryBucket::OptimizerState => self.optimizer_gb,
            MemoryBucket::Activations => self.activations_gb,
            MemoryBucket::MoeRouting => self.moe_routing_gb,
            MemoryBucket::FeatureActivations => self.feature_activations_gb,
            MemoryBucket::RuntimeReserved => self.runtime_reserved_gb,
            MemoryBucket::Overhead => self.overhead_gb,
        }
    }

    /// Unrounded sum of all buckets.
    pub fn total_gb(&self) -> f64 {
        MemoryBucket::ALL.iter().map(|&b| self.get(b)).sum()
    }
}

/// Seed `estimate_memory_budget`: the sum of the buckets, rounded to 2 places.
pub fn estimate_memory_budget(b: &MemoryBreakdown) -> f64 {
    (b.total_gb() * 100.0).round() / 100.0
}

/// Seed `dominant_pressure`: the largest bucket (first in seed order on ties).
pub fn dominant_pressure(b: &MemoryBreakdown) -> MemoryBucket {
    let mut best = MemoryBucket::Parameters;
    for bucket in MemoryBucket::ALL {
        if b.get(bucket) > b.get(best) {
            best = bucket;
        }
    }
    best
}

/// Seed `residual_runtime_bytes`: allocated − (params + grads + buffers), floored at 0.
pub fn residual_runtime_bytes(
    allocated_bytes: u64,
    param_bytes: u64,
    grad_bytes: u64,
    buffer_bytes: u64,
) -> u64 {
    allocated_bytes.saturating_sub(
        param_bytes
            .saturating_add(grad_bytes)
            .saturating_add(buffer_bytes),
    )
}

/// One step of the triage order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageStep {
    /// Short name (`estimate`, `allocator`, `model_state`, `mitigate`).
    pub name: String,
    /// What to do, with this plan's numbers.
    pub advice: String,
}

/// OOM triage advice for one breakdown, in the seed's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OomTriage {
    /// The dominant bucket.
    pub dominant: MemoryBucket,
    /// The four steps.
    pub steps: Vec<TriageStep>,
}

/// Builds the four triage steps for `b`.
pub fn oom_triage(b: &MemoryBreakdown) -> OomTriage {
    let dominant = dominant_pressure(b);
    let model_state = b.params_gb + b.gradients_gb + b.optimizer_gb;
    let steps = vec![
        TriageStep {
            name: "estimate".to_string(),
            advice: format!(
                "bucketed estimate: total {:.2} GiB, dominant {} {:.2} GiB",
                estimate_memory_budget(b),
                dominant,
                b.get(dominant)
            ),
        },
        TriageStep {
            name: "allocator".to_string(),
            advice: "if it still fails, read the allocator counters: current/peak allocated and \
                     reserved bytes, allocation retries, OOM count, inactive split bytes"
                .to_string(),
        },
        TriageStep {
            name: "model_state".to_string(),
            advice: format!(
                "subtract model state ({model_state:.2} GiB = params + grads + optimizer) from \
                 allocated bytes; the residual is activations and runtime buffers"
            ),
        },
        TriageStep {
            name: "mitigate".to_string(),
            advice: format!("{}: {}", dominant, dominant.mitigations().join("; ")),
        },
    ];
    OomTriage { dominant, steps }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_sums_and_rounds_to_two_places() {
        let b = MemoryBreakdown {
            params_gb: 1.111,
            gradients_gb: 2.222,
            optimizer_gb: 3.333,
            activations_gb: 0.004,
            ..Default::default()
        };
        // 1.111 + 2.222 + 3.333 + 0.004 = 6.67
        assert_eq!(estimate_memory_budget(&b), 6.67);
    }

    #[test]
    fn dominant_is_largest_and_ties_go_to_seed_order() {
        let b = MemoryBreakdown {
            activations_gb: 5.0,
            moe_routing_gb: 2.0,
            ..Default::default()
        };
        assert_eq!(dominant_pressure(&b), MemoryBucket::Activations);
        let tie = MemoryBreakdown {
            gradients_gb: 3.0,
            optimizer_gb: 3.0,
            ..Default::default()
        };
        assert_eq!(dominant_pressure(&tie), MemoryBucket::Gradients);
        assert_eq!(
            dominant_pressure(&MemoryBreakdown::default()),
            MemoryBucket::Parameters
        );
    }

    #[test]
    fn residual_runtime_is_floored_at_zero() {
        assert_eq!(residual_runtime_bytes(100, 30, 20, 10), 40);
        assert_eq!(residual_runtime_bytes(10, 30, 20, 10), 0);
    }

    #[test]
    fn triage_follows_seed_order_and_names_dominant_bucket() {
        let b = MemoryBreakdown {
            optimizer_gb: 9.0,
            ..Default::default()
        };
        let t = oom_triage(&b);
        let names: Vec<_> = t.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["estimate", "allocator", "model_state", "mitigate"]);
        assert_eq!(t.dominant, MemoryBucket::OptimizerState);
        assert!(t.steps[3].advice.contains("muon"));
    }
}
