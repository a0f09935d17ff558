//! `megamoe train --world N`: one training run over N thread ranks of this process, laid
//! out by `parallel.pp` × `parallel.dp` × `parallel.ep`. Rank 0 writes the run directory (metrics,
//! summary) as a one-rank run does; checkpoints are sharded (every rank writes its pieces,
//! rank 0 the index); the other ranks compute their share and join every collective.
//! `--resume` verifies the checkpoint on rank 0 and every rank reads its shard (experts,
//! FSDP rows, TP slices, pipeline stages), so a run continues under any layout. A failed rank stops every other one with an error
//! naming it; the command then exits 2 listing each rank's message.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use megamoe_plan::{Plan, RawConfig};
use megamoe_train::distributed::PipelineReport;
use megamoe_train::distributed::{
    check_layout, follow_training, rank_fault_from_env, run_thread_ranks, RANK_FAULT_ENV,
};
use megamoe_train::progress::LEGEND;
use megamoe_train::session::{check_fresh_run_dir, CheckpointOrigin, SUMMARY_FILE};
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
    /// The lock on `run_dir`, held for the run by the process that writes it (under
    /// mpirun rank 0 only; `None` on the other ranks).
    pub lock: Option<RunLock>,
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
            (run_dir, Some(lock), None)
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
        // Collective: rank 0 verifies the checkpoint, every rank reads its shard.
        if let Some(dir) = origin.as_ref().and_then(|o| o.dir.as_ref()) {
            trainer.load_checkpoint(dir)?;
        }
        // Every rank's `Trainer::step` checks the injected fault, the writing rank 0 included.
        trainer.set_rank_fault(fault);
        if !trainer.is_writer() {
            follow_training(&mut trainer, &opts, fault)?;
            return Ok((None, RankTime::of(&trainer)));
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
            .map(|summary| (Some(summary), RankTime::of(&trainer)))
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
        Ok(ranks) => {
            let (summaries, times): (Vec<_>, Vec<_>) = ranks.into_iter().unzip();
            if let Some(Some(summary)) = summaries.first() {
                print!("{summary}");
            }
            let mut lines = vec![format!(
                "layout     {world} thread ranks: {}",
                plan.mesh.describe()
            )];
            lines.extend(times.iter().enumerate().map(|(r, t)| {
                format!(
                    "rank {r:<5} step time {:.2}s of {:.2}s wall",
                    t.step_s, t.wall_s
                )
            }));
            if plan.parallel.pp > 1 {
                let report = pipeline_report(&plan, &times)?;
                std::fs::write(
                    run.path().join(PIPELINE_FILE),
                    serde_json::to_string_pretty(&report)?,
                )?;
                lines.extend(report.lines());
                lines.push(format!(
                    "pipeline   measured vs simulated idle per rank: {}",
                    run.path().join(PIPELINE_FILE).display()
                ));
            }
            for line in &lines {
                println!("{line}");
            }
            append_summary(run.path(), &lines)?;
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

/// The file a pipeline run writes its measured busy / idle time and the simulator's
/// prediction to, in the run directory.
pub const PIPELINE_FILE: &str = "pipeline.json";

/// What one rank measured over the run.
struct RankTime {
    /// Seconds in steps.
    step_s: f64,
    /// Seconds of the rank's run.
    wall_s: f64,
    /// Its mesh coordinates.
    coords: Option<megamoe_plan::RankCoords>,
    /// A pipeline rank's measured schedule run of every step.
    pipeline: Vec<megamoe_pipeline::executor::RankTiming>,
}

impl RankTime {
    fn of(trainer: &Trainer) -> RankTime {
        let g = trainer.goodput();
        RankTime {
            step_s: g.step_s,
            wall_s: g.wall_s,
            coords: trainer.parallel().map(|p| p.coords()),
            pipeline: trainer
                .pipeline()
                .map_or_else(Vec::new, |p| p.timings().to_vec()),
        }
    }
}

/// The busy / idle report of the first pipeline (data rank 0: dp 0, ep 0), its ranks in
/// pipeline order.
fn pipeline_report(plan: &Plan, times: &[RankTime]) -> anyhow::Result<PipelineReport> {
    let mut group: Vec<(usize, Vec<megamoe_pipeline::executor::RankTiming>)> = times
        .iter()
        .filter_map(|t| {
            let c = t.coords?;
            (c.dp == 0 && c.ep == 0).then(|| (c.pp, t.pipeline.clone()))
        })
        .collect();
    group.sort_by_key(|(pp, _)| *pp);
    let timings: Vec<_> = group.into_iter().map(|(_, t)| t).collect();
    let shape = megamoe_pipeline::PipelineShape {
        ranks: plan.parallel.pp,
        microbatches: plan.parallel.microbatches,
        vpp: plan.parallel.vpp,
    };
    let schedule = megamoe_pipeline::generate(plan.parallel.schedule, shape)?;
    Ok(PipelineReport::new(
        &schedule,
        plan.parallel.microbatches,
        &timings,
    )?)
}

/// Appends `lines` to the run's summary file.
fn append_summary(run_dir: &Path, lines: &[String]) -> anyhow::Result<()> {
    use std::io::Write;
    let path = run_dir.join(SUMMARY_FILE);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)?;
    for line in lines {
        writeln!(f, "{line}")?;
    }
    Ok(())
}
