//! `megamoe train`: train a model on this machine's CPU, writing metrics,
//! checkpoints and a summary into a run directory; `--resume` continues a run
//! bit-identically.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use megamoe_plan::{MemoryLimit, Plan, RawConfig};
use megamoe_tensor::Device;
use megamoe_train::checkpoint::run_dir_of;
use megamoe_train::checkpoint::{ConfigChange, STATE_FILE};
use megamoe_train::session::{
    check_fresh_run_dir, checkpoint_origin, prepare_resume, record_config_changes, CheckpointOrigin,
};
use megamoe_train::{
    run_training, DataSource, Progress, RunDir, RunLock, RunOptions, Tokenizer, Trainer,
    TrainerOptions,
};

use crate::args::ConfigArgs;
use crate::train_header::{header_lines, HeaderInfo, Peak};
use megamoe_train::progress::LEGEND;

/// Flags of `megamoe train` (the subcommand's summary line lives in main.rs).
#[derive(Debug, Clone, Args)]
#[command(after_long_help = TRAIN_LONG_HELP)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Total optimizer steps of the run (a resumed run continues up to this step).
    /// Default: train.steps. The learning-rate schedule always spans train.steps.
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,

    /// Run directory. Default: a new runs/run-<UTC date-time>, or runs/NAME
    /// with --run-name.
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,

    /// Name of the run: its directory is runs/NAME (same as --run-dir runs/NAME).
    #[arg(long, value_name = "NAME", conflicts_with = "run_dir")]
    pub run_name: Option<String>,

    /// Continue the run saved in DIR (a run directory or a checkpoint directory)
    /// with its config and data; --config/--set, if given, must match it.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,

    /// Train on a UTF-8 text file or a directory of them (byte-level tokens)
    /// instead of the built-in synthetic corpus.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,

    /// Peak FLOP/s of this machine for the MFU column (e.g. 1.5e11). Default: on the
    /// CPU the dense f32 matrix-multiply rate measured at start (about 0.2 s); on a GPU
    /// 989e12 (H100/H200 dense bf16, the usual MFU reference).
    #[arg(long, value_name = "FLOPS")]
    pub peak_flops: Option<f64>,

    /// Device to train on: `cpu` (default), `cuda` or `cuda:N` (GPU N; needs a build
    /// with `--features cuda`). The same model code runs on both backends; on a GPU
    /// `train.dtype = "bf16"` runs the matmuls in bf16 (f32 accumulation).
    #[arg(long, value_name = "DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: Device,

    /// Whole-step CUDA graphs, on by default with `--device cuda`: in static-capacity mode
    /// (moe.capacity_factor + moe.pad_to_capacity) each step (forward, backward, clipping,
    /// AdamW, expert-bias update) is captured once after a warm-up step and replayed;
    /// other runs stay uncaptured and say why. This flag only states the default (it
    /// needs a GPU).
    #[arg(long, conflicts_with = "no_cuda_graph")]
    pub cuda_graph: bool,

    /// Run every step uncaptured (no CUDA graph).
    #[arg(long)]
    pub no_cuda_graph: bool,

    /// Keep clipping, the optimizer and the expert-bias update outside the CUDA graph
    /// (after the replay, with host values); the graph then holds forward and backward.
    #[arg(long)]
    pub no_cuda_graph_optimizer: bool,

    /// Tokens generated for the final text sample (0 = none).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub sample_tokens: usize,

    /// Ranks of the run, as threads of this process: must equal the layout's world
    /// size parallel.pp x parallel.dp x parallel.ep x parallel.tp (parallel.fsdp 0 to 3,
    /// at most 2 with pp; other parallel.* must be 1). Rank 0 writes the run directory.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub world: usize,
}

/// Shown by `megamoe train --help`.
const TRAIN_LONG_HELP: &str = "\
With no arguments: the built-in tiny MoE config (configs/tiny.toml) on the
built-in synthetic multi-domain corpus, a couple of minutes on 2 CPU cores.

The run directory gets config.toml, run.json, metrics.jsonl (one JSON record
per step, eval, sample and goodput total), checkpoints/ (ckpt-<step>/ with
model.safetensors, optimizer.safetensors, state.json and manifest.json; from a
run of several ranks, each rank's model-r<rank> / optim-r<rank>.safetensors
shards, state.json and index.json; plus `latest`) and summary.txt. `megamoe report DIR` renders plots from it.

One process at a time writes a run directory (it holds DIR/lock); a second
one exits 2 naming the first one's pid. `--resume DIR` continues from the
newest checkpoint whose manifest (or index) verifies (whatever `latest` says; directories
passed over are reported), or from step 0 if the run was stopped before its
first checkpoint; metrics.jsonl is cut back to that step, so each step has one
record. A checkpoint is never written from non-finite weights.

--steps is the total. Up to train.steps it stops early and the learning-rate
schedule still spans train.steps: `--steps 10` then `--resume DIR --steps 20`
gives the losses of one `--steps 20` run. Past train.steps it raises
train.steps (the header says so), so the schedule decays to optim.min_lr at
the new end: `--steps 40` on a 40-step config, then `--resume DIR --steps 80`,
extends the run to 80 steps with a full decay. optim.warmup_steps must be at
most train.steps.

A resume may change train.steps (by --steps or --set), train.eval_every,
train.checkpoint_every, train.log_every and --data (the same corpus at another
path); each change is printed and recorded in metrics.jsonl (a config_change
record with key, old, new, step) and in the summary. Any other difference from
the checkpoint's config is refused, naming the key with both values.

Examples:
  megamoe train
  megamoe train --config configs/all_features.toml --steps 30
  megamoe train --set train.steps=400 --run-dir runs/long
  megamoe train --resume runs/long --steps 400
  megamoe train --data corpus/ --set model.seq_len=128
  megamoe train --world 2 --set parallel.dp=2
  megamoe train --world 2 --set parallel.pp=2 --set parallel.microbatches=4 \\
      --set parallel.schedule=\"dualpipev\"

--world N runs N = parallel.dp x parallel.ep x parallel.tp ranks as threads of this
process: each rank takes parallel.microbatches micro-batches of the global
batch, gradients are summed over the ranks, and with parallel.ep the routed
experts of each MoE layer are split over the ep ranks (tokens travel by
all-to-all; checkpoints hold every expert). parallel.fsdp = 1 or 2 shards
optimizer state and gradients over the data-parallel ranks (AdamW, or Muon
gathering each matrix for its Newton-Schulz step); parallel.fsdp = 3 also
keeps only each rank's rows of the parameters between steps, gathering a
layer's parameters around its forward and its backward. With the
same micro-batch size it trains the same model as one rank: `--world 2 --set
parallel.dp=2` gives the per-step losses of `--set parallel.microbatches=2`.
With parallel.pp the layers are cut into pp stages and the micro-batches flow
through them under parallel.schedule (gpipe, 1f1b, interleaved, zb-h1, zbv,
dualpipe, dualpipev); pp combines with dp and ep (--world = pp x dp x ep: each
stage's gradients are summed over its data ranks, its experts split over its
ep ranks; parallel.fsdp 1 or 2 shards each stage's optimizer state and
gradients over its data ranks; parallel.tp splits each stage's matrices over
its tp ranks), and the losses are those of one rank running
dp x ep x parallel.microbatches micro-batches. A pipeline rank holds only its
stages: evals and samples run forward over the stages, checkpoints are
gathered from them in the one-rank layout.
With parallel.tp the ranks of a TP group read the same micro-batches and each
holds its share of the attention heads and FFN hidden units (one all-reduce
per attention and FFN branch): `--world 2 --set parallel.tp=2` gives the
per-step losses of one rank; with parallel.fsdp the rows of each rank's
slices are sharded over the data-parallel ranks.
A failed rank stops the others, naming it (exit 2).

Under mpirun (a build with --features mpi) each process is one rank of the
same layouts: `mpirun -n 2 megamoe train --set parallel.dp=2`; rank 0 writes
the run directory, and `--resume` continues a run as under --world N. MEGAMOE_COMM_TIMEOUT (seconds, default 45) bounds how long
a rank waits for a dead or hung peer before it stops naming it.

Exit codes: 0 done, 1 the model diverged (the NaN/Inf guard stopped the run, a
non-finite weight blocked a checkpoint, or the final eval loss is not finite),
2 any error (bad config, unreadable data, missing or mismatched checkpoint, run
directory in use), printed as one line.";

/// Runs `megamoe train`.
pub fn run(args: &TrainArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.world >= 1,
        "--world {} must be at least 1 (the number of ranks)",
        args.world
    );
    // One rank of a job started by mpirun (or another launcher), checked before anything
    // is created: N processes never write one run directory (see train_mpi).
    let launched = crate::train_mpi::launched(args)?;
    if let Some(p) = args.peak_flops {
        anyhow::ensure!(
            p.is_finite() && p > 0.0,
            "--peak-flops {p} must be a finite number of FLOP/s > 0 (e.g. 1.5e11)"
        );
    }
    if let Some(name) = &args.run_name {
        let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\']);
        anyhow::ensure!(
            plain,
            "--run-name {name:?} must be a plain name (no '/', not '.' or '..'); use --run-dir for a path"
        );
    }
    let named = args.run_name.as_ref().map(|n| Path::new("runs").join(n));
    let chosen_dir = args.run_dir.as_ref().or(named.as_ref());
    // A resume locks its run directory before reading which checkpoint to continue
    // from; a fresh run validates config and data before creating anything.
    // Under a launcher only rank 0 writes (and locks) the run directory; every rank reads
    // which checkpoint to continue from (the directory must be readable by every rank).
    let writer = launched.as_ref().is_none_or(|env| env.rank == 0);
    let (origin, lock) = match &args.resume {
        Some(path) => {
            if !path.exists() {
                anyhow::bail!(
                    "--resume {}: no such run or checkpoint directory",
                    path.display()
                );
            }
            let run_dir = chosen_dir.cloned().unwrap_or_else(|| run_dir_of(path));
            let lock = if writer {
                Some(RunLock::acquire(&run_dir)?)
            } else {
                None
            };
            let origin = checkpoint_origin(path).context("--resume")?;
            for s in &origin.skipped {
                eprintln!("warning: skipped {}: {}", s.dir.display(), s.reason);
            }
            (Some(origin), Some((run_dir, lock)))
        }
        None => (None, None),
    };
    let mut raw = load_config(args, origin.as_ref())?;
    let horizon_note = extend_horizon(&mut raw, args.steps)?;
    // Sizes that cannot fit in this machine's RAM are refused before the model
    // is built (a constant-time bound: no allocation, no loop over layers).
    if let Some(ram) = MemoryLimit::host_ram() {
        Plan::resolve_within(&raw, None, &ram)?;
    }
    let data = open_data(args, origin.as_ref())?;
    args.device.check_available()?;
    if args.world > 1 && args.device != Device::Cpu {
        anyhow::bail!(
            "--world {} runs thread ranks on the CPU; --device {} trains on one GPU (drop one of them)",
            args.world,
            args.device
        );
    }
    if args.cuda_graph && args.device == Device::Cpu {
        anyhow::bail!(
            "--cuda-graph captures the step as a CUDA graph: it needs --device cuda[:N] (got \
             --device cpu)"
        );
    }
    let peak = match args.peak_flops {
        Some(f) if f.is_finite() && f > 0.0 => Peak::Given(f),
        Some(f) => anyhow::bail!("--peak-flops {f} must be a positive number of FLOP/s"),
        None if args.device != Device::Cpu => Peak::Given(GPU_PEAK_FLOPS),
        None => Peak::Measured(megamoe_train::peak::measure_cpu_gemm_flops(
            std::time::Duration::from_millis(200),
        )?),
    };
    let resume = |origin: Option<CheckpointOrigin>, lock: Option<(PathBuf, Option<RunLock>)>| {
        origin
            .zip(lock)
            .map(|(origin, (run_dir, lock))| crate::train_world::Resume {
                origin,
                run_dir,
                lock,
            })
    };
    if let Some(env) = &launched {
        let resume = resume(origin, lock);
        return crate::train_mpi::run(args, &raw, data, peak, chosen_dir, env, resume);
    }
    if args.world > 1 {
        let resume = resume(origin, lock);
        return crate::train_world::run(args, &raw, data, peak, chosen_dir, resume);
    }
    let mut trainer = Trainer::new(
        &raw,
        data,
        TrainerOptions {
            peak_flops: Some(peak.flops()),
            device: args.device,
        },
    )?;
    let graph = args.device != Device::Cpu && !args.no_cuda_graph;
    trainer.set_cuda_graph(graph);
    trainer.set_cuda_graph_optimizer(graph && !args.no_cuda_graph_optimizer);
    let (run_dir, _lock) = match lock {
        Some((run_dir, lock)) => (run_dir, lock),
        None => {
            let run_dir = match chosen_dir {
                Some(dir) => dir.clone(),
                None => RunDir::create_unique(Path::new("runs"))?
                    .path()
                    .to_path_buf(),
            };
            let lock = RunLock::acquire(&run_dir)?;
            check_fresh_run_dir(&run_dir)?;
            (run_dir, Some(lock))
        }
    };
    if let Some(o) = &origin {
        if let Some(dir) = &o.dir {
            trainer
                .load_checkpoint(dir)
                .with_context(|| format!("--resume {}", dir.display()))?;
        }
        let shown = o.dir.as_deref().unwrap_or(&o.run_dir).display().to_string();
        let context = || format!("--resume {shown}");
        for line in record_resume(&run_dir, o, &trainer).with_context(context)? {
            eprintln!("{line}");
        }
    }
    let run = RunDir::create(&run_dir)?;
    run.write_origin(trainer.data().name())?;
    run.write_config(trainer.config_toml())?;

    let total_steps = args.steps.unwrap_or(trainer.plan().train.steps as u64);
    let start = trainer.step_count();
    let header = HeaderInfo {
        config: &args.config.source_name(),
        run_dir: run.path(),
        steps: (start, total_steps),
        peak,
    };
    for line in header_lines(&trainer, &header) {
        eprintln!("{line}");
    }
    if let Some(line) = crate::bench_attention::status_line(args.device)? {
        eprintln!("{line}");
    }
    if let Some(note) = horizon_note {
        eprintln!("{note}");
    }
    for w in &trainer.plan().warnings {
        eprintln!("warning: {w}");
    }
    if start >= total_steps {
        eprintln!("the run is already at step {start} (--steps {total_steps}); nothing to do");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("{LEGEND}");
    let log_every = trainer.plan().train.log_every.max(1) as u64;
    let mut progress = Progress::new(start, total_steps, log_every);
    let opts = RunOptions {
        total_steps,
        show_every: 1, // Progress decides which steps get a line that stays
        sample_tokens: args.sample_tokens,
    };
    let result = run_training(&mut trainer, run.path(), &opts, &mut progress);
    match result {
        Ok(summary) => {
            print!("{summary}");
            if let Some(line) = gpu_memory_line(args.device, trainer.plan())? {
                println!("{line}");
            }
            if args.device != Device::Cpu {
                println!("cuda_graph {} (last step)", trainer.cuda_graph_status());
            }
            println!("run dir    {} (megamoe report {0})", run.path().display());
            Ok(ExitCode::SUCCESS)
        }
        Err(
            e @ (megamoe_train::Error::NonFiniteSteps { .. }
            | megamoe_train::Error::NonFiniteParameters { .. }
            | megamoe_train::Error::NonFiniteEval { .. }),
        ) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e.into()),
    }
}

/// `--steps N` past `train.steps` raises `train.steps` to N: the learning-rate
/// schedule then ends (at optim.min_lr) at step N. Returns the line that says so.
fn extend_horizon(raw: &mut RawConfig, steps: Option<u64>) -> anyhow::Result<Option<String>> {
    let Some(n) = steps else { return Ok(None) };
    anyhow::ensure!(n >= 1, "--steps 0 must be >= 1");
    let n_usize = usize::try_from(n).map_err(|_| anyhow::anyhow!("--steps {n} is too large"))?;
    let old = raw.train.steps;
    if n_usize <= old {
        return Ok(None);
    }
    raw.train.steps = n_usize;
    Ok(Some(format!(
        "horizon  --steps {n} is past train.steps={old}: train.steps is now {n}, so the \
         learning rate decays to optim.min_lr at step {n}"
    )))
}

/// The run directory's side of a resume of `trainer` (loaded from `origin`): checkpoints
/// and metrics after its step retired, and the config keys the resume changes (all in
/// the safe set, else the checkpoint's error) recorded in the metrics. Returns the lines
/// to print.
pub(crate) fn record_resume(
    run_dir: &Path,
    origin: &CheckpointOrigin,
    trainer: &Trainer,
) -> megamoe_train::Result<Vec<String>> {
    let mut lines: Vec<String> = prepare_resume(run_dir, trainer.step_count())?
        .into_iter()
        .map(|n| format!("resume: {n}"))
        .collect();
    let mut changes = match &origin.dir {
        Some(dir) => megamoe_train::checkpoint::resume_config_changes(
            &dir.join(STATE_FILE),
            &origin.config_toml,
            trainer.config_toml(),
        )?,
        None => Vec::new(), // step 0: nothing was trained with the old config
    };
    if trainer.data().name() != origin.data_source {
        // The same corpus (its fingerprint was checked) read from another path.
        changes.push(ConfigChange {
            key: "data".into(),
            old: origin.data_source.clone(),
            new: trainer.data().name().to_string(),
        });
    }
    for line in record_config_changes(run_dir, trainer.step_count(), &changes)? {
        lines.push(format!("resume: changed {line}"));
    }
    Ok(lines)
}

/// The run config: the checkpoint's when resuming (then --config/--set, if given,
/// are applied and later compared against it), else --config/--set.
fn load_config(args: &TrainArgs, origin: Option<&CheckpointOrigin>) -> anyhow::Result<RawConfig> {
    match origin {
        Some(o) if args.config.config.is_none() => {
            RawConfig::from_toml_str_with_overrides(&o.config_toml, &args.config.set)
                .with_context(|| format!("config of run {}", o.run_dir.display()))
        }
        _ => args.config.load(),
    }
}

/// The training data: --data, else the resumed run's own data, else synthetic.
fn open_data(
    args: &TrainArgs,
    origin: Option<&CheckpointOrigin>,
) -> anyhow::Result<Arc<DataSource>> {
    let path = match (&args.data, origin) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(o)) if o.data_source != "synthetic" => Some(PathBuf::from(&o.data_source)),
        _ => None,
    };
    Ok(Arc::new(match path {
        Some(p) => DataSource::from_path(&p, Tokenizer::bytes()).context("--data")?,
        None => DataSource::synthetic(Tokenizer::bytes()),
    }))
}

/// MFU reference of `--device cuda` without `--peak-flops`: H100/H200 dense bf16.
const GPU_PEAK_FLOPS: f64 = 989e12;

/// `cpu`, `cuda` or `cuda:N`.
pub(crate) fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("`{s}` is not a device: use cpu, cuda or cuda:N")),
    }
}

/// The GPU pool's reserved / in use / peak bytes after the run (the peak of the last
/// step) next to the planner's predicted peak (`None` on the CPU).
#[cfg(feature = "cuda")]
fn gpu_memory_line(device: Device, plan: &megamoe_plan::Plan) -> anyhow::Result<Option<String>> {
    let Device::Cuda(i) = device else {
        return Ok(None);
    };
    let b = megamoe_tensor::cuda::cuda_backend(i)?;
    let s = b.pool_stats()?;
    let predicted = megamoe_train::predicted_peak_bytes(plan, device)?;
    let gib = |v: u64| v as f64 / (1u64 << 30) as f64;
    Ok(Some(format!(
        "gpu memory {} pool: reserved {:.2} GiB, in use {:.2} GiB, peak {:.2} GiB (last step) | planner predicts {:.2} GiB ({:+.1} %)",
        b.device_name()?,
        gib(s.reserved),
        gib(s.used),
        gib(s.peak),
        gib(predicted),
        (predicted as f64 / (s.peak as f64).max(1.0) - 1.0) * 100.0
    )))
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory_line(_device: Device, _plan: &megamoe_plan::Plan) -> anyhow::Result<Option<String>> {
    Ok(None)
}
