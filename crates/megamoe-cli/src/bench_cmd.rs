//! `megamoe bench moe`: times the MoE layer on GPU 0 (needs the `cuda` cargo feature and
//! an NVIDIA driver). CUDA-event timing, median of `--iters` runs after `--warmup`.
//! `megamoe bench step` lives in `bench_step.rs`.

use clap::{Args, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Flags of `megamoe bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: BenchTarget,
}

/// What to time.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchTarget {
    /// One MoE layer (router, permute, SwiGLU experts, combine) forward and backward,
    /// static capacity, random router and data, bf16 by default.
    #[command(after_long_help = MOE_LONG_HELP)]
    Moe(MoeBenchArgs),
    /// Whole training steps of a config (forward, backward, optimizer) with the same
    /// trainer as `megamoe train`: median step time, tokens/s, MFU, memory.
    Step(crate::bench_step::StepBenchArgs),
    /// Causal attention over [B·heads, T, D] in bf16, fused vs unfused, forward and
    /// forward + backward.
    Attention(crate::bench_attention::AttentionBenchArgs),
}

/// Named shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MoeShapeName {
    /// T 8192, d 4096, h 14336, E 8, k 2.
    Mixtral,
    /// T 16384, d 2048, h 1408, E 64, k 6.
    Deepseek,
    /// From --tokens --d-model --hidden --experts --top-k.
    Custom,
}

/// Storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDtype {
    /// bf16 storage, f32 accumulation.
    Bf16,
    /// f32 everywhere (the parity path).
    F32,
}

/// Flags of `megamoe bench moe`.
#[derive(Debug, Clone, Args)]
pub struct MoeBenchArgs {
    /// Layer shape.
    #[arg(long, value_enum, default_value = "deepseek")]
    pub shape: MoeShapeName,
    /// Tokens T (custom shape).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Model width d (custom shape).
    #[arg(long)]
    pub d_model: Option<usize>,
    /// Expert hidden width h (custom shape).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Routed experts E (custom shape).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token k (custom shape).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Capacity C = ceil(T·k/E·cf). Default: the largest expert's demand rounded up to
    /// 128, read once before timing (nothing dropped).
    #[arg(long)]
    pub capacity_factor: Option<f64>,
    /// Storage type.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: BenchDtype,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

const MOE_LONG_HELP: &str = "\
FLOPs are counted as 6·T·k·d·h per forward and 3× that for forward+backward (useful
work; pad rows of the static-capacity buffers are not counted).

Example:
  megamoe bench moe --shape deepseek
  megamoe bench moe --shape custom --tokens 4096 --d-model 1024 --hidden 512 --experts 16 --top-k 2";

/// (T, d, h, E, k) of the flags.
pub fn dims(a: &MoeBenchArgs) -> anyhow::Result<(usize, usize, usize, usize, usize)> {
    Ok(match a.shape {
        MoeShapeName::Mixtral => (8192, 4096, 14336, 8, 2),
        MoeShapeName::Deepseek => (16384, 2048, 1408, 64, 6),
        MoeShapeName::Custom => {
            let need = |v: Option<usize>, flag: &str| {
                v.ok_or_else(|| anyhow::anyhow!("--shape custom needs --{flag}"))
            };
            (
                need(a.tokens, "tokens")?,
                need(a.d_model, "d-model")?,
                need(a.hidden, "hidden")?,
                need(a.experts, "experts")?,
                need(a.top_k, "top-k")?,
            )
        }
    })
}

/// Runs `megamoe bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    match &args.target {
        BenchTarget::Moe(a) => run_moe(a),
        BenchTarget::Step(a) => crate::bench_step::run(a),
        BenchTarget::Attention(a) => crate::bench_attention::run(a),
    }
}

#[cfg(feature = "cuda")]
fn run_moe(a: &MoeBenchArgs) -> anyhow::Result<ExitCode> {
    use megamoe_cuda::bench::{bench_moe, MoeBenchConfig};
    let (tokens, d_model, hidden, experts, top_k) = dims(a)?;
    let report = bench_moe(&MoeBenchConfig {
        tokens,
        d_model,
        hidden,
        experts,
        top_k,
        capacity_factor: a.capacity_factor,
        elem: match a.dtype {
            BenchDtype::Bf16 => megamoe_cuda::Elem::Bf16,
            BenchDtype::F32 => megamoe_cuda::Elem::F32,
        },
        warmup: a.warmup,
        iters: a.iters,
        seed: a.seed,
    })?;
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "cuda"))]
fn run_moe(a: &MoeBenchArgs) -> anyhow::Result<ExitCode> {
    dims(a)?;
    anyhow::bail!(
        "megamoe bench needs a GPU build: this megamoe was built without the cuda feature \
         (cargo build --release -p megamoe-cli --features cuda)"
    )
}
