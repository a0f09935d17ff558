//! `megamoe train --world N`: one training run over N thread ranks of this process, laid
//! out by `parallel.pp` × `parallel.dp` × `parallel.ep`. Rank 0 writes the run directory (metrics,
//! checkpoints in the one-rank layout, summary) exactly as a one-rank run does; the other
//! ranks compute their share and join every collective. `--resume` loads the one-rank
//! checkpoint on rank 0 and gives every rank its shard (experts, FSDP rows, pipeline
//! stages), so a run continues under any layout. A failed rank stops every other one with an error
//! naming it; the command then exits 2 listing each rank's message.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use megamoe_plan::{Plan, RawConfig};
use megamoe_train::distributed::{
    check_layout, follow_training, rank_fault_from_env, run_thread_ranks, RANK_FAULT_ENV,
};
use megamoe_train::progress::LEGEND;
use megamoe_train::session::{check_fresh_run_dir, CheckpointOrigin};
use megamoe_train::{
    run_training, DataSource, Progress, RunDir, RunLock, RunOptions, Trainer, TrainerOptions,
};

use crate::train_cmd::TrainArgs;
use crate::train_header::{header_lines, HeaderInfo, Peak};

/// A `--resume`: where it continues from, and its run directory, locked.
pub struct Resume {
    /// The checkpoint (or step-0 run) it continues.
    pub origin: CheckpointOrigin,
    /// The run directory the resumed run writes.
    pub run_dir: PathBuf,
    /// The lock on `run_dir`, held for the run.
    pub lock: RunLock,
}

/// Runs `megamoe train --world N` (N > 1) with the loaded config and data: a fresh run,
/// or with `resume` the continuation of a checkpoint written under any layout.
pub fn run(
    args: &TrainArgs,
    raw: &RawConfig,
    data: Arc<DataSource>,
    peak: Peak,
    chosen_dir: Option<&PathBuf>,
    resume: Option<Resume>,
) -> anyhow::Result<ExitCode> {
    let world = args.world;
    let plan = Plan::resolve(raw, None)?;
    anyhow::ensure!(
        plan.mesh.world() == world,
        "--world {world} must equal the layout's world size {}",
        plan.mesh.describe()
    );
    check_layout(&plan)?;
    let fault = rank_fault_from_env()?;
    if let Some((rank, step)) = fault {
        anyhow::ensure!(
            rank < world,
            "{RANK_FAULT_ENV}={rank}@{step}: the rank must be 0..{} (a rank of --world {world})",
            world - 1
        );
    }
    let total_steps = args.steps.unwrap_or(plan.train.steps as u64);
    let (run_dir, _lock, origin) = match resume {
        Some(r) => (r.run_dir, r.lock, Some(r.origin)),
        None => {
            let run_dir = match chosen_dir {
                Some(dir) => dir.clone(),
                None => RunDir::create_unique(Path::new("runs"))?
                    .path()
                    .to_path_buf(),
            };
            let lock = RunLock::acquire(&run_dir)?;
            check_fresh_run_dir(&run_dir)?;
            (run_dir, lock, None)
        }
    };
    let start = origin.as_ref().map_or(0, |o| o.step);
    if start >= total_steps {
        eprintln!("the run is already at step {start} (--steps {total_steps}); nothing to do");
        return Ok(ExitCode::SUCCESS);
    }
    let run = RunDir::create(&run_dir)?;
    let opts = RunOptions {
        total_steps,
        show_every: 1,
        sample_tokens: args.sample_tokens,
    };
    let options = TrainerOptions {
        peak_flops: Some(peak.flops()),
        device: megamoe_tensor::Device::Cpu,
    };
    let diverged = AtomicBool::new(false);
    let outcome = run_thread_ranks(world, |comm| {
        let mut trainer = Trainer::new_rank(raw, data.clone(), options, comm)?;
        // Collective: rank 0 reads the checkpoint, every rank takes its shard.
        if let Some(dir) = origin.as_ref().and_then(|o| o.dir.as_ref()) {
            trainer.load_checkpoint(dir)?;
        }
        // Every rank's `Trainer::step` checks the injected fault, the writing rank 0 included.
        trainer.set_rank_fault(fault);
        if !trainer.is_writer() {
            follow_training(&mut trainer, &opts, fault)?;
            return Ok(None);
        }
        if let Some(o) = &origin {
            for line in crate::train_cmd::record_resume(run.path(), o, &trainer)? {
                eprintln!("{line}");
            }
        }
        run.write_origin(trainer.data().name())?;
        run.write_config(trainer.config_toml())?;
        let header = HeaderInfo {
            config: &args.config.source_name(),
            run_dir: run.path(),
            steps: (start, total_steps),
            peak,
        };
        for line in header_lines(&trainer, &header) {
            eprintln!("{line}");
        }
        eprintln!(
            "layout     {world} thread ranks: {} (rank 0 writes)",
            plan.mesh.describe()
        );
        for w in &trainer.plan().warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("{LEGEND}");
        let log_every = trainer.plan().train.log_every.max(1) as u64;
        let mut progress = Progress::new(start, total_steps, log_every);
        run_training(&mut trainer, run.path(), &opts, &mut progress)
            .map(Some)
            .inspect_err(|e| {
                if matches!(
                    e,
                    megamoe_train::Error::NonFiniteSteps { .. }
                        | megamoe_train::Error::NonFiniteParameters { .. }
                        | megamoe_train::Error::NonFiniteEval { .. }
                ) {
                    diverged.store(true, Ordering::Relaxed);
                }
            })
    });
    match outcome {
        Ok(mut summaries) => {
            if let Some(summary) = summaries.swap_remove(0) {
                print!("{summary}");
            }
            println!("run dir    {} (megamoe report {0})", run.path().display());
            Ok(ExitCode::SUCCESS)
        }
        Err(failures) => {
            for (_, msg) in &failures.failures {
                eprintln!("{msg}");
            }
            if diverged.load(Ordering::Relaxed) {
                eprintln!("error: {}", failures.first.1);
                return Ok(ExitCode::from(1));
            }
            Err(anyhow::anyhow!(
                "train --world {world}: rank {} failed first: {}",
                failures.first.0,
                failures.first.1
            ))
        }
    }
}
