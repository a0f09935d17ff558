//! `mpirun -n N megamoe train …`: one rank per process (build with `--features mpi`).
//!
//! The launcher's variables ([`LaunchEnv`]: `OMPI_COMM_WORLD_*`, `PMI_*`, `RANK` /
//! `WORLD_SIZE` / `LOCAL_RANK`) say the process is one of N > 1. Each process is then one
//! rank of the same [`Trainer::new_rank`] path thread ranks take, over an MPI
//! communicator: rank 0 writes the run directory, logs, metrics and summary exactly as
//! `--world N` does, the other ranks compute their share and write only their
//! checkpoint shards (into the directory rank 0 names: a file system every rank sees).
//! The summary ends with the layout and each rank's time. A failed rank tells the others (they stop
//! with an error naming it) and every process exits non-zero.
//!
//! `--resume DIR` works as under `--world N`: every rank reads which checkpoint to
//! continue and its config (so DIR must be readable by every rank: a shared file system
//! across hosts), rank 0 alone locks the run directory and verifies the checkpoint, every
//! rank reads its own shard (collective [`Trainer::load_checkpoint`]), and rank 0 records the
//! resume (later checkpoints retired, metrics cut back, config changes logged). The
//! checkpoint may come from any layout.
//!
//! A binary built without the feature refuses to start under a launcher of N > 1
//! processes (exit 2), so N copies never write one run directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use megamoe_comm::LaunchEnv;
use megamoe_plan::RawConfig;
use megamoe_train::DataSource;

use crate::train_cmd::TrainArgs;
use crate::train_header::Peak;
use crate::train_world::Resume;

/// Environment variable: seconds a rank waits for the others in one communicator call
/// before it stops with an error naming the ranks that never came (default 45).
pub const COMM_TIMEOUT_ENV: &str = "MEGAMOE_COMM_TIMEOUT";

/// The launcher's view when this process is one of N > 1 (`None` for a plain start or a
/// job of one), after the checks that need no MPI: a build without the `mpi` feature,
/// `--world` other than 1 or N, and `--device` other than the CPU are refused.
pub fn launched(args: &TrainArgs) -> anyhow::Result<Option<LaunchEnv>> {
    let Some(env) = LaunchEnv::detect()? else {
        return Ok(None);
    };
    if env.world_size == 1 {
        return Ok(None);
    }
    anyhow::ensure!(
        cfg!(feature = "mpi"),
        "{}={} says this is rank {} of {} processes, but this megamoe was built without MPI \
         (N copies would each train alone): rebuild with `cargo build --release -p \
         megamoe-cli --features mpi`, or run one process (--world N for thread ranks)",
        env.source,
        env.world_size,
        env.rank,
        env.world_size
    );
    anyhow::ensure!(
        args.world == 1 || args.world == env.world_size,
        "--world {} under a launcher of {} processes: each process is one rank; drop --world \
         or pass --world {}",
        args.world,
        env.world_size,
        env.world_size
    );
    anyhow::ensure!(
        args.device == megamoe_tensor::Device::Cpu,
        "--device {} under a launcher: MPI ranks train on the CPU (drop --device)",
        args.device
    );
    Ok(Some(env))
}

/// The communicator timeout from [`COMM_TIMEOUT_ENV`], or the default.
fn comm_timeout() -> anyhow::Result<std::time::Duration> {
    match std::env::var(COMM_TIMEOUT_ENV) {
        Err(_) => Ok(megamoe_comm::DEFAULT_TIMEOUT),
        Ok(v) => match v.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(std::time::Duration::from_secs_f64(s)),
            _ => anyhow::bail!("{COMM_TIMEOUT_ENV}={v} must be a number of seconds > 0"),
        },
    }
}

/// Runs this process's rank of the job, fresh or continuing `resume` (see the module
/// docs; `resume` holds the run directory's lock on rank 0 only).
#[cfg(feature = "mpi")]
pub fn run(
    args: &TrainArgs,
    raw: &RawConfig,
    data: Arc<DataSource>,
    peak: Peak,
    chosen_dir: Option<&PathBuf>,
    env: &LaunchEnv,
    resume: Option<Resume>,
) -> anyhow::Result<ExitCode> {
    let job = mpi_rank::Job {
        args,
        raw,
        peak,
        chosen_dir,
        env,
        resume,
    };
    mpi_rank::run(&job, data, comm_timeout()?)
}

/// Without the feature [`launched`] has refused already; kept for the call site.
#[cfg(not(feature = "mpi"))]
pub fn run(
    _args: &TrainArgs,
    _raw: &RawConfig,
    _data: Arc<DataSource>,
    _peak: Peak,
    _chosen_dir: Option<&PathBuf>,
    env: &LaunchEnv,
    _resume: Option<Resume>,
) -> anyhow::Result<ExitCode> {
    comm_timeout()?;
    anyhow::bail!(
        "rank {} of {}: this megamoe was built without MPI (--features mpi)",
        env.rank,
        env.world_size
    )
}

#[cfg(feature = "mpi")]
mod mpi_rank {
    use std::panic::AssertUnwindSafe;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::Context;

    use megamoe_comm::{Communicator, LaunchEnv, MpiWorld};
    use megamoe_plan::{Plan, RawConfig};
    use megamoe_tensor::{Device, Tensor};
    use megamoe_train::distributed::{check_layout, follow_training, rank_fault_from_env};
    use megamoe_train::progress::LEGEND;
    use megamoe_train::session::{check_fresh_run_dir, SUMMARY_FILE};
    use megamoe_train::{
        run_training, DataSource, Progress, RunDir, RunLock, RunOptions, Trainer, TrainerOptions,
    };

    use crate::train_cmd::TrainArgs;
    use crate::train_header::{header_lines, HeaderInfo, Peak};
    use crate::train_world::Resume;

    /// What every rank of the job was started with.
    pub(super) struct Job<'a> {
        pub args: &'a TrainArgs,
        pub raw: &'a RawConfig,
        pub peak: Peak,
        pub chosen_dir: Option<&'a PathBuf>,
        pub env: &'a LaunchEnv,
        /// The checkpoint a `--resume` continues (the run directory's lock on rank 0).
        pub resume: Option<Resume>,
    }

    /// How a rank's part ended.
    enum Outcome {
        /// Done; rank 0 has the run's summary, layout line and directory.
        Done(Option<(String, String, PathBuf)>),
        Diverged(String),
    }

    pub(super) fn run(
        job: &Job<'_>,
        data: Arc<DataSource>,
        timeout: Duration,
    ) -> anyhow::Result<ExitCode> {
        let env = job.env;
        let world = MpiWorld::init()?.with_timeout(timeout);
        let (rank, size) = (world.rank(), world.size());
        anyhow::ensure!(
            size == env.world_size && rank == env.rank,
            "{}={} and rank {} from the environment, but MPI sees rank {rank} of {size} \
             processes: start the job with the MPI library's own launcher (mpirun)",
            env.source,
            env.world_size,
            env.rank
        );
        // Every communicator is built before anything can fail on one rank alone: later
        // failures reach the others through the communicator and stop them too.
        let comm = world.communicator()?;
        let stats = world.communicator()?;
        let started = Instant::now();
        // A panic is a failure like any other: the others hear of it and stop.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let outcome = train_rank(job, data, Box::new(comm))?;
            let Outcome::Done(summary) = outcome else {
                return Ok(outcome);
            };
            let timing = rank_timing(&stats, started.elapsed(), env.local_rank)?;
            if let Some((summary, layout, run_dir)) = &summary {
                print!("{summary}");
                let extra = [vec![layout.clone()], timing].concat();
                for line in &extra {
                    println!("{line}");
                }
                append_summary(run_dir, &extra)?;
                println!("run dir    {} (megamoe report {0})", run_dir.display());
            }
            Ok(Outcome::Done(summary))
        }))
        .unwrap_or_else(|p| Err(anyhow::anyhow!("panicked: {}", panic_text(&*p))));
        match outcome {
            Ok(Outcome::Done(_)) => {
                drop(world); // MPI_Finalize once every rank is done
                Ok(ExitCode::SUCCESS)
            }
            Ok(Outcome::Diverged(msg)) => {
                eprintln!("error: rank {rank}: {msg}");
                world.report_failure(&msg);
                std::process::exit(1)
            }
            Err(e) => {
                // Printed first: the launcher may stop this process once a peer exits.
                let msg = format!("{e:#}");
                eprintln!(
                    "error: rank {rank} of {size}: {}",
                    msg.replace(['\n', '\r'], " ")
                );
                world.report_failure(&msg);
                std::process::exit(2)
            }
        }
    }

    /// The message of a panic payload.
    fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
        if let Some(s) = p.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = p.downcast_ref::<String>() {
            s.clone()
        } else {
            "(no message)".into()
        }
    }

    /// One rank's training; rank 0 also sets up and writes the run directory.
    fn train_rank(
        job: &Job<'_>,
        data: Arc<DataSource>,
        comm: Box<dyn Communicator>,
    ) -> anyhow::Result<Outcome> {
        let (args, raw, peak, env) = (job.args, job.raw, job.peak, job.env);
        let size = comm.size();
        let plan = Plan::resolve(raw, Some(size))?;
        check_layout(&plan)?;
        anyhow::ensure!(
            plan.mesh.world() == size,
            "{size} MPI processes must equal the layout's world size {}",
            plan.mesh.describe()
        );
        let fault = rank_fault_from_env()?;
        let total_steps = args.steps.unwrap_or(plan.train.steps as u64);
        let origin = job.resume.as_ref().map(|r| &r.origin);
        let start = origin.map_or(0, |o| o.step);
        if start >= total_steps {
            // Every rank read the same checkpoint step: all of them stop here.
            if comm.rank() == 0 {
                eprintln!(
                    "the run is already at step {start} (--steps {total_steps}); nothing to do"
                );
            }
            return Ok(Outcome::Done(None));
        }
        let checkpoint = origin.and_then(|o| o.dir.as_ref());
        let opts = RunOptions {
            total_steps,
            show_every: 1,
            sample_tokens: args.sample_tokens,
        };
        let options = TrainerOptions {
            peak_flops: Some(peak.flops()),
            device: Device::Cpu,
        };
        if comm.rank() != 0 {
            let mut trainer = Trainer::new_rank(raw, data, options, comm)?;
            // Collective: rank 0 verifies the checkpoint, every rank reads its shard.
            if let Some(dir) = checkpoint {
                trainer.load_checkpoint(dir)?;
            }
            trainer.set_rank_fault(fault);
            follow_training(&mut trainer, &opts, fault)?;
            return Ok(Outcome::Done(None));
        }
        let (run_dir, _lock) = match &job.resume {
            Some(r) => (r.run_dir.clone(), None),
            None => {
                let run_dir = match job.chosen_dir {
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
        let run = RunDir::create(&run_dir)?;
        let mut trainer = Trainer::new_rank(raw, data, options, comm)?;
        if let Some(dir) = checkpoint {
            trainer
                .load_checkpoint(dir)
                .with_context(|| format!("--resume {}", dir.display()))?;
        }
        if let Some(o) = origin {
            for line in crate::train_cmd::record_resume(run.path(), o, &trainer)? {
                eprintln!("{line}");
            }
        }
        trainer.set_rank_fault(fault);
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
            "layout     {size} MPI processes ({}): {} (rank 0 writes)",
            env.source,
            plan.mesh.describe()
        );
        for w in &trainer.plan().warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("{LEGEND}");
        let log_every = trainer.plan().train.log_every.max(1) as u64;
        let mut progress = Progress::new(start, total_steps, log_every);
        match run_training(&mut trainer, run.path(), &opts, &mut progress) {
            Ok(summary) => Ok(Outcome::Done(Some((
                summary.to_string(),
                format!("layout     {size} MPI processes: {}", plan.mesh.describe()),
                run_dir,
            )))),
            Err(
                e @ (megamoe_train::Error::NonFiniteSteps { .. }
                | megamoe_train::Error::NonFiniteParameters { .. }
                | megamoe_train::Error::NonFiniteEval { .. }),
            ) => Ok(Outcome::Diverged(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// Every rank's wall time (gathered over `stats`), as summary lines.
    fn rank_timing(
        stats: &dyn Communicator,
        wall: Duration,
        local_rank: usize,
    ) -> anyhow::Result<Vec<String>> {
        let mine = Tensor::from_vec_f32(
            vec![wall.as_secs_f32(), local_rank as f32],
            [1, 2],
            Device::Cpu,
        )?;
        let all = stats.all_gather(&mine)?.to_host_f32()?;
        let times: Vec<String> = all
            .chunks_exact(2)
            .enumerate()
            .map(|(r, v)| format!("{r}: {:.2} s (local rank {})", v[0], v[1] as usize))
            .collect();
        Ok(vec![format!("rank time  {}", times.join(", "))])
    }

    /// Appends `lines` to the run's summary file.
    fn append_summary(run_dir: &Path, lines: &[String]) -> anyhow::Result<()> {
        use std::io::Write;
        let path = run_dir.join(SUMMARY_FILE);
        let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
        for l in lines {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}
