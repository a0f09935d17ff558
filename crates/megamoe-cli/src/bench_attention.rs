//! `megamoe bench attention`: times causal attention over `[B·heads, T, D]` on a GPU
//! through megamoe-tensor's `causal_attention` op on each path — cuDNN's fused SDPA
//! (`cudnn-sdpa`, where libcudnn loads; deterministic backward, and `cudnn-sdpa-atomic`
//! with dQ accumulated by atomic adds; both also on the sequence-major `[B, T, heads, D]`
//! layout, `-bshd`), megamoe's own fused kernel (`fused`) and unfused (`bmm`, causal
//! softmax, `bmm`) — forward and forward + backward, in bf16-activation mode. Each timed run ends in a stream synchronisation;
//! the median of `--iters` runs after `--warmup` is reported with TFLOP/s (causal forward
//! `2·BH·T²·D`, backward 2.5× that) and the pool's peak. `--dump FILE` also writes the
//! inputs and each fused path's outputs (`o_cudnn`, `dq_fused`, …) to a safetensors file (for a PyTorch comparison,
//! `tools/reference/attention_gpu_check.py`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

/// Flags of `megamoe bench attention`.
#[derive(Debug, Clone, Args)]
pub struct AttentionBenchArgs {
    /// Sequences B.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    /// Key/value heads (grouped-query attention; must divide --heads). Default: --heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Sequence length T.
    #[arg(long, default_value_t = 4096)]
    pub seq: usize,
    /// Head dim D.
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Also write q, k, v, d_o and each fused path's o, lse, dq, dk, dv (as f32) here.
    #[arg(long)]
    pub dump: Option<PathBuf>,
}

/// Runs `megamoe bench attention`.
#[cfg(feature = "cuda")]
pub fn run(a: &AttentionBenchArgs) -> anyhow::Result<ExitCode> {
    use megamoe_tensor::{DType, Device, Tensor};
    let kv_heads = a.kv_heads.unwrap_or(a.heads);
    if a.iters == 0 || [a.batch, a.heads, kv_heads, a.seq, a.head_dim].contains(&0) {
        anyhow::bail!(
            "--batch, --heads, --kv-heads, --seq, --head-dim and --iters must be at least 1"
        );
    }
    if !a.heads.is_multiple_of(kv_heads) {
        anyhow::bail!("--kv-heads {kv_heads} must divide --heads {}", a.heads);
    }
    let dev = Device::Cuda(0);
    let backend = megamoe_tensor::cuda::cuda_backend(0)?;
    backend.set_bf16_matmul(true);
    backend.set_bf16_activations(true);
    let (bh, t, d) = (a.batch * a.heads, a.seq, a.head_dim);
    let rand = |seed: u64, rows: usize| -> anyhow::Result<Tensor> {
        Ok(
            Tensor::randn_named(seed, "attention", vec![rows, t, d], 1.0, dev)?
                .to_dtype(DType::BF16)?,
        )
    };
    let bh_kv = a.batch * kv_heads;
    let (q, k, v, d_o) = (rand(1, bh)?, rand(2, bh_kv)?, rand(3, bh_kv)?, rand(4, bh)?);
    let scale = 1.0 / (d as f32).sqrt();
    let fwd_flops = 2.0 * bh as f64 * (t as f64).powi(2) * d as f64;
    println!(
        "bench attention  B·heads {bh} (B·kv_heads {bh_kv}), T {t}, D {d}, bf16, causal on {}",
        backend.device_name()?
    );
    println!(
        "{:<22} {:>12} {:>10} {:>12} {:>10} {:>10}",
        "path", "fwd ms", "TFLOP/s", "fwd+bwd ms", "TFLOP/s", "peak GiB"
    );
    use megamoe_tensor::cuda::AttentionPath;
    let mut ran = Vec::new();
    // the cuDNN paths also run on the sequence-major layout ([B, T, heads, D] read in
    // place, as the model calls it)
    let q4 = q.reshape([a.batch, t, a.heads, d])?;
    let (k4, v4) = (
        k.reshape([a.batch, t, kv_heads, d])?,
        v.reshape([a.batch, t, kv_heads, d])?,
    );
    let d_o4 = d_o.reshape([a.batch, t, a.heads, d])?;
    for (path, bshd) in [
        (AttentionPath::CudnnSdpa, false),
        (AttentionPath::CudnnSdpa, true),
        (AttentionPath::CudnnSdpaAtomic, false),
        (AttentionPath::CudnnSdpaAtomic, true),
        (AttentionPath::Fused, false),
        (AttentionPath::Unfused, false),
    ] {
        let label = if bshd {
            format!("{}-bshd", path.name())
        } else {
            path.name().to_string()
        };
        backend.set_attention(path);
        let status = backend.attention_status()?;
        if !status.starts_with(path.name()) {
            println!("{label:<22} not run: attention: {status}");
            continue;
        }
        if path.is_cudnn() && !bshd {
            println!("attention: {status}");
        }
        let time = |bwd: bool| -> anyhow::Result<f64> {
            let mut ms = Vec::new();
            for i in 0..a.warmup + a.iters {
                backend.synchronize()?;
                let t0 = std::time::Instant::now();
                if bshd {
                    let (o, saved) = Tensor::causal_attention_bshd(&q4, &k4, &v4, scale)?;
                    if bwd {
                        Tensor::causal_attention_bshd_backward(
                            &q4, &k4, &v4, &o, &saved, &d_o4, scale,
                        )?;
                    }
                } else {
                    let (o, saved) = Tensor::causal_attention(&q, &k, &v, scale)?;
                    if bwd {
                        Tensor::causal_attention_backward(&q, &k, &v, &o, &saved, &d_o, scale)?;
                    }
                }
                backend.synchronize()?;
                if i >= a.warmup {
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            ms.sort_by(f64::total_cmp);
            Ok(ms[ms.len() / 2])
        };
        backend.synchronize()?;
        backend.reset_peak()?;
        let f = time(false)?;
        let fb = time(true)?;
        let peak = backend.pool_stats()?.peak as f64 / (1u64 << 30) as f64;
        println!(
            "{label:<22} {f:>12.3} {:>10.1} {fb:>12.3} {:>10.1} {peak:>10.2}",
            fwd_flops / f / 1e9,
            3.5 * fwd_flops / fb / 1e9,
        );
        if !bshd {
            ran.push(path);
        }
    }
    if let Some(path) = &a.dump {
        let f = |x: &Tensor| x.to_dtype(DType::F32)?.to_device(Device::Cpu);
        let mut named = vec![
            ("q".to_string(), f(&q)?),
            ("k".to_string(), f(&k)?),
            ("v".to_string(), f(&v)?),
            ("d_o".to_string(), f(&d_o)?),
        ];
        for p in &ran {
            backend.set_attention(*p);
            let (o, lse) = Tensor::causal_attention(&q, &k, &v, scale)?;
            let (dq, dk, dv) =
                Tensor::causal_attention_backward(&q, &k, &v, &o, &lse, &d_o, scale)?;
            let tag = match p {
                AttentionPath::CudnnSdpa => "cudnn",
                AttentionPath::CudnnSdpaAtomic => "cudnn_atomic",
                AttentionPath::Fused => "fused",
                AttentionPath::Unfused => "unfused",
            };
            for (n, t) in [("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)] {
                // the unfused path saves probabilities, not the log-sum-exp
                if n != "lse" || *p != AttentionPath::Unfused {
                    named.push((format!("{n}_{tag}"), f(&t)?));
                }
            }
        }
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        megamoe_tensor::save_safetensors(path, &refs)?;
        println!("dump       {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The `attention: …` console line of a run on `device` (which attention path runs and,
/// where it is not cuDNN's, why); `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn status_line(device: megamoe_tensor::Device) -> anyhow::Result<Option<String>> {
    match device {
        megamoe_tensor::Device::Cuda(i) => {
            let backend = megamoe_tensor::cuda::cuda_backend(i)?;
            Ok(Some(format!("attention  {}", backend.attention_status()?)))
        }
        _ => Ok(None),
    }
}

/// The `attention: …` console line (this build has no GPU backend: none).
#[cfg(not(feature = "cuda"))]
pub fn status_line(_device: megamoe_tensor::Device) -> anyhow::Result<Option<String>> {
    Ok(None)
}

/// Runs `megamoe bench attention` (this build has no GPU backend).
#[cfg(not(feature = "cuda"))]
pub fn run(_a: &AttentionBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "megamoe bench attention needs a GPU build: this megamoe was built without the cuda \
         feature (cargo build --release -p megamoe-cli --features cuda)"
    )
}
