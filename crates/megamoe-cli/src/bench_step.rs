//! `megamoe bench step`: times whole training steps (forward, backward, optimizer) of a
//! config on one device with the same `Trainer` as `megamoe train`, on the built-in
//! synthetic data. Each timed step is the wall time from its start to the device being
//! idle again (a stream synchronisation after the optimizer), so it includes the host's
//! share of the work and every host read; the report gives the median
//! of `--iters` steps after `--warmup`, tokens/s, MFU and memory (the GPU pool's peak next
//! to the planner's prediction).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use megamoe_tensor::Device;
use megamoe_train::{DataSource, Tokenizer, Trainer, TrainerOptions};

use crate::args::ConfigArgs;

/// Flags of `megamoe bench step`.
#[derive(Debug, Clone, Args)]
pub struct StepBenchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Device: `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda", value_parser = crate::train_cmd::parse_device)]
    pub device: Device,
    /// Steps run before timing.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps (median reported; at least 1).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Peak FLOP/s for MFU. Default 989e12 (H100/H200 dense bf16).
    #[arg(long, default_value_t = 989e12)]
    pub peak_flops: f64,
    /// Run every step uncaptured. By default a GPU run in static-capacity mode captures
    /// the whole step (forward, backward, clipping, AdamW, expert-bias update) as one CUDA
    /// graph after a warm-up step and replays it; other runs stay uncaptured and say why.
    #[arg(long)]
    pub no_cuda_graph: bool,
    /// Keep clipping, the optimizer and the expert-bias update outside the CUDA graph
    /// (after the replay, with host values).
    #[arg(long)]
    pub no_cuda_graph_optimizer: bool,
}

/// Runs `megamoe bench step`.
pub fn run(a: &StepBenchArgs) -> anyhow::Result<ExitCode> {
    if a.iters == 0 {
        anyhow::bail!("--iters 0: at least one timed step is needed");
    }
    if !(a.peak_flops.is_finite() && a.peak_flops > 0.0) {
        anyhow::bail!(
            "--peak-flops {} must be a positive number of FLOP/s",
            a.peak_flops
        );
    }
    a.device.check_available()?;
    let raw = a.config.load()?;
    let data = Arc::new(DataSource::synthetic(Tokenizer::bytes()));
    let t0 = std::time::Instant::now();
    let mut trainer = Trainer::new(
        &raw,
        data,
        TrainerOptions {
            peak_flops: Some(a.peak_flops),
            device: a.device,
        },
    )?;
    let graph = a.device != Device::Cpu && !a.no_cuda_graph;
    trainer.set_cuda_graph(graph);
    trainer.set_cuda_graph_optimizer(graph && !a.no_cuda_graph_optimizer);
    let setup_s = t0.elapsed().as_secs_f64();
    let plan = trainer.plan().clone();
    let predicted_gib =
        megamoe_train::predicted_peak_bytes(&plan, a.device)? as f64 / (1u64 << 30) as f64;
    for _ in 0..a.warmup {
        trainer.step()?;
    }
    synchronize(a.device)?;
    reset_peak(a.device)?;
    let _ = profile_report(a.device)?; // drop the warm-up's markers
    let mut times = Vec::with_capacity(a.iters);
    let mut last = None;
    // The trainer starts a new pool peak window every step: the largest over the timed ones.
    let mut pool_peak = 0u64;
    let reads0 = megamoe_tensor::host_reads();
    let parked0 = megamoe_tensor::parked_bytes();
    for _ in 0..a.iters {
        let t = std::time::Instant::now();
        let m = trainer.step()?;
        synchronize(a.device)?;
        times.push(t.elapsed().as_secs_f64());
        pool_peak = pool_peak.max(m.gpu_pool.map_or(0, |p| p.peak));
        last = Some(m);
    }
    let reads = (megamoe_tensor::host_reads() - reads0) as f64 / a.iters as f64;
    let parked = (megamoe_tensor::parked_bytes() - parked0) as f64 / a.iters as f64;
    let profile = profile_report(a.device)?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = last.as_ref().map_or(0, |m| m.tokens) as f64;
    let counts = trainer.counts();
    let tps = tokens / median;
    let mfu = counts.flops_per_token * tps / a.peak_flops;
    println!(
        "bench step  {} on {} ({} params, {} active; setup {setup_s:.1} s)",
        a.config.source_name(),
        device_name(a.device)?,
        human(counts.params as f64),
        human(counts.active_params as f64),
    );
    println!(
        "step        median {:.2} ms of {} (min {:.2}, max {:.2}) after {} warm-up | {:.0} tokens/step",
        median * 1e3,
        a.iters,
        times[0] * 1e3,
        times[times.len() - 1] * 1e3,
        a.warmup,
        tokens
    );
    println!(
        "throughput  {:.1} k tokens/s | MFU {:.1} % of {:.3e} FLOP/s ({:.3e} FLOP/token) | {reads:.0} host reads/step",
        tps / 1e3,
        mfu * 100.0,
        a.peak_flops,
        counts.flops_per_token
    );
    if let Some(line) = memory_line(a.device, pool_peak, predicted_gib)? {
        println!("{line}");
    }
    if let Some(m) = last {
        println!("loss        {:.4} at step {}", m.loss.total, m.step);
    }
    println!("cuda_graph  {}", trainer.cuda_graph_status());
    if let Some(line) = crate::bench_attention::status_line(a.device)? {
        println!("{line}");
    }
    if !plan.train.offload.is_empty() {
        println!(
            "offload     {} : {:.2} GiB per step moved to pinned host memory",
            plan.train.offload,
            parked / (1u64 << 30) as f64
        );
    }
    if !profile.is_empty() {
        let total: f64 = profile.iter().map(|p| p.1).sum();
        println!("op time     (MEGAMOE_CUDA_PROFILE: stream ms per step by op, top 30)");
        for (op, ms, n) in profile.iter().take(30) {
            println!(
                "  {op:<28} {:>9.2} ms {:>5.1} %  {:>6} uses",
                ms / a.iters as f64,
                100.0 * ms / total,
                n / a.iters
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn human(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.3} B", v / 1e9)
    } else {
        format!("{:.1} M", v / 1e6)
    }
}

/// Waits for the device's queued work (the optimizer's kernels end a step unread).
#[cfg(feature = "cuda")]
fn synchronize(device: Device) -> anyhow::Result<()> {
    if let Device::Cuda(i) = device {
        megamoe_tensor::cuda::cuda_backend(i)?.synchronize()?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn synchronize(_device: Device) -> anyhow::Result<()> {
    Ok(())
}

/// The op-time profile of the timed steps (CUDA with `MEGAMOE_CUDA_PROFILE` set).
#[cfg(feature = "cuda")]
fn profile_report(device: Device) -> anyhow::Result<Vec<(&'static str, f64, usize)>> {
    Ok(match device {
        Device::Cuda(i) => megamoe_tensor::cuda::cuda_backend(i)?.profile_report()?,
        Device::Cpu => Vec::new(),
    })
}

#[cfg(not(feature = "cuda"))]
fn profile_report(_device: Device) -> anyhow::Result<Vec<(&'static str, f64, usize)>> {
    Ok(Vec::new())
}

#[cfg(feature = "cuda")]
fn reset_peak(device: Device) -> anyhow::Result<()> {
    if let Device::Cuda(i) = device {
        megamoe_tensor::cuda::cuda_backend(i)?.reset_peak()?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn reset_peak(_device: Device) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(feature = "cuda")]
fn device_name(device: Device) -> anyhow::Result<String> {
    Ok(match device {
        Device::Cuda(i) => megamoe_tensor::cuda::cuda_backend(i)?.device_name()?,
        Device::Cpu => "cpu".to_string(),
    })
}

#[cfg(not(feature = "cuda"))]
fn device_name(device: Device) -> anyhow::Result<String> {
    Ok(device.to_string())
}

#[cfg(feature = "cuda")]
fn memory_line(device: Device, peak: u64, predicted_gib: f64) -> anyhow::Result<Option<String>> {
    let Device::Cuda(i) = device else {
        return Ok(None);
    };
    let s = megamoe_tensor::cuda::cuda_backend(i)?.pool_stats()?;
    let gib = |v: u64| v as f64 / (1u64 << 30) as f64;
    let off = (predicted_gib / gib(peak).max(1e-9) - 1.0) * 100.0;
    Ok(Some(format!(
        "memory      pool peak {:.2} GiB (largest timed step), reserved {:.2} GiB | planner predicts {predicted_gib:.2} GiB ({off:+.1} % of the measured peak)",
        gib(peak),
        gib(s.reserved)
    )))
}

#[cfg(not(feature = "cuda"))]
fn memory_line(_device: Device, _peak: u64, predicted_gib: f64) -> anyhow::Result<Option<String>> {
    Ok(Some(format!(
        "memory      planner predicts a peak of {predicted_gib:.2} GiB of tensors"
    )))
}
