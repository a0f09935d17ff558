//! The header `megamoe train` prints before the first step: what is trained,
//! on what, with which optimizer, from which build, and where it is written.

use std::path::Path;

use megamoe_plan::{MomentDtype, OptimizerKind, Plan};
use megamoe_train::clock::UtcTime;
use megamoe_train::Trainer;

/// Where the MFU column's peak FLOP/s comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Peak {
    /// `--peak-flops`.
    Given(f64),
    /// The dense f32 GEMM rate measured at start.
    Measured(f64),
}

impl Peak {
    /// The FLOP/s value.
    pub fn flops(self) -> f64 {
        match self {
            Peak::Given(f) | Peak::Measured(f) => f,
        }
    }
}

/// What the header shows besides the trainer's own facts.
pub struct HeaderInfo<'a> {
    /// Config name (path or built-in).
    pub config: &'a str,
    /// The run directory.
    pub run_dir: &'a Path,
    /// First and last step of this process.
    pub steps: (u64, u64),
    /// MFU reference.
    pub peak: Peak,
}

/// The header lines.
pub fn header_lines(trainer: &Trainer, info: &HeaderInfo<'_>) -> Vec<String> {
    let plan = trainer.plan();
    let counts = trainer.counts();
    let (start, total) = info.steps;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let peak = match info.peak {
        Peak::Given(f) => format!("{f:.2e} FLOP/s (--peak-flops)"),
        Peak::Measured(f) => format!(
            "{f:.2e} FLOP/s, the dense f32 GEMM rate measured at start (--peak-flops sets it)"
        ),
    };
    vec![
        format!(
            "megamoe train | {} | build {} | {}",
            info.config,
            env!("MEGAMOE_GIT_COMMIT"),
            UtcTime::now()
        ),
        format!(
            "model    {} params ({} active per token) | {}",
            short_count(counts.params),
            short_count(counts.active_params),
            model_shape(plan)
        ),
        format!(
            "batch    {} sequences x {} tokens = {} tokens per step | steps {start} -> {total} \
             | {} | recompute {}",
            plan.batch.global_batch,
            plan.model.seq_len,
            plan.batch.tokens_per_step,
            plan.train.precision,
            plan.train.recompute
        ),
        format!("optim    {}", optimizer(plan)),
        match trainer.device() {
            megamoe_tensor::Device::Cpu => {
                format!("device   cpu, {threads} threads | mfu relative to {peak}")
            }
            gpu => format!(
                "device   {gpu} | {} | mfu relative to {peak}",
                trainer.numerics()
            ),
        },
        format!(
            "data     {} ({})",
            trainer.data().name(),
            trainer.data().domain_names().join(", ")
        ),
        format!("run dir  {}", info.run_dir.display()),
    ]
}

/// `4 layers, d_model 64, 4 heads (2 kv), MoE 8 experts top-2 in 3 layers`.
fn model_shape(plan: &Plan) -> String {
    let m = &plan.model;
    let mut s = format!(
        "{} layers, d_model {}, {} heads",
        m.n_layers, m.d_model, m.n_heads
    );
    if m.n_kv_heads != m.n_heads {
        s += &format!(" ({} kv)", m.n_kv_heads);
    }
    match &plan.moe {
        Some(moe) => {
            s += &format!(
                ", MoE {} experts top-{} in {} of {} layers",
                moe.routed_experts,
                moe.top_k,
                moe.moe_layers.len(),
                m.n_layers
            )
        }
        None => s += ", dense",
    }
    s
}

/// `adamw lr 3.0e-3 -> 3.0e-4 (warmup 20, cosine), weight decay 0.1, clip 1.0`.
fn optimizer(plan: &Plan) -> String {
    let o = &plan.optim;
    let mut s = format!(
        "{} lr {:.1e} -> {:.1e} (warmup {}, {}), weight decay {}",
        o.kind, o.lr, o.min_lr, o.warmup_steps, o.lr_schedule, o.weight_decay
    );
    match o.grad_clip {
        Some(c) => s += &format!(", clip {c}"),
        None => s += ", no clipping",
    }
    if o.moment_dtype == MomentDtype::Bf16 {
        s += ", bf16 moments";
    }
    if let (OptimizerKind::Muon, Some(m)) = (o.kind, &o.muon) {
        s += &format!(
            " | muon lr {:.1e} on 2-D matrices (AdamW rate on the rest)",
            m.lr
        );
    }
    s
}

/// `950`, `12.3k`, `1.23M`, `4.56B`.
fn short_count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_short() {
        assert_eq!(short_count(950), "950");
        assert_eq!(short_count(12_340), "12.3k");
        assert_eq!(short_count(1_234_567), "1.23M");
        assert_eq!(short_count(4_560_000_000), "4.56B");
    }
}
