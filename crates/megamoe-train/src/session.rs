//! The run loop around a [`Trainer`]: steps until the requested total, writing one
//! `metrics.jsonl` record per step (plus eval, sample and goodput records), showing
//! progress, evaluating every `train.eval_every` steps and at the end, checkpointing
//! every `train.checkpoint_every` steps and at the end, and leaving `summary.txt`.
//!
//! Also the questions the CLI asks before a run: is a directory free for a fresh
//! run ([`check_fresh_run_dir`]), where does a resumed run start and with what
//! config and data ([`checkpoint_origin`]), and the clean-up a resume needs
//! ([`prepare_resume`]: later checkpoints retired, metrics cut back to the step).

use std::path::{Path, PathBuf};

use crate::data::heldout_batches;
use crate::error::{Error, Result};
use crate::goodput::GoodputTotals;
use crate::metrics::{
    ConfigChangeRecord, EvalMetrics, GoodputRecord, MetricsRecord, MetricsWriter, RunInfo,
    SampleRecord, StepMetrics,
};
use crate::progress::Progress;
use crate::run_totals::{collapsed_parts, eval_rise_warning, Collapse, RunTotals};
use crate::tensorboard::TensorBoardWriter;
use crate::trainer::Trainer;

/// File (in the run directory) holding the final summary of the last process.
pub const SUMMARY_FILE: &str = "summary.txt";

/// How [`run_training`] drives a [`Trainer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// Train until this step (the total, counting steps of resumed segments).
    pub total_steps: u64,
    /// Show every `show_every`-th step (plus the first, the last and skipped ones)
    /// on the progress display; 1 for a live bar.
    pub show_every: u64,
    /// Characters generated for the final text sample (0 = no sample).
    pub sample_tokens: usize,
}

/// What a finished [`run_training`] call did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Step the process started from (0 fresh, else the resumed checkpoint's).
    pub start_step: u64,
    /// Step reached.
    pub final_step: u64,
    /// (step, total loss) of the first step this process ran.
    pub first_loss: Option<(u64, f64)>,
    /// (step, total loss) of the last step this process ran.
    pub last_loss: Option<(u64, f64)>,
    /// (step, held-out loss) of the last eval.
    pub last_eval: Option<(u64, f64)>,
    /// Steps the NaN/Inf guard skipped in this process.
    pub skipped_steps: u64,
    /// The final checkpoint directory.
    pub checkpoint: Option<PathBuf>,
    /// The final sample, if one was generated.
    pub sample: Option<SampleRecord>,
    /// Time accounting of the whole run (all segments).
    pub goodput: GoodputTotals,
    /// The whole run from metrics.jsonl (every segment), with its warnings.
    pub whole_run: Option<RunTotals>,
    /// What `train.dtype` meant on the run's device ([`crate::support::numerics`]).
    pub numerics: &'static str,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "run dir    {}", self.run_dir.display())?;
        writeln!(f, "numerics   {}", self.numerics)?;
        writeln!(
            f,
            "this run   steps {} -> {}",
            self.start_step, self.final_step
        )?;
        match &self.whole_run {
            Some(totals) => write!(f, "{totals}")?,
            None => {
                if let (Some((s0, l0)), Some((s1, l1))) = (self.first_loss, self.last_loss) {
                    writeln!(f, "loss       {l0:.4} (step {s0}) -> {l1:.4} (step {s1})")?;
                }
                if let Some((s, l)) = self.last_eval {
                    writeln!(f, "eval       {l:.4} (step {s})")?;
                }
                if self.skipped_steps > 0 {
                    writeln!(f, "skipped    {} non-finite steps", self.skipped_steps)?;
                }
            }
        }
        if let Some(c) = &self.checkpoint {
            writeln!(f, "checkpoint {}", c.display())?;
        }
        if let Some(s) = &self.sample {
            writeln!(f, "sample     prompt: {}", readable(&s.prompt))?;
            writeln!(f, "           model:  {}", readable(&s.text))?;
        }
        writeln!(f, "time       {}", self.goodput)
    }
}

/// Text on one line as a person reads it: a line break shows as `⏎`, a tab
/// as `→`, any other control character as `�`; everything else as is.
pub fn readable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' => '⏎',
            '\t' => '→',
            c if c.is_control() => '\u{fffd}',
            c => c,
        })
        .collect()
}

/// Fails if `run_dir` already holds a run (a config, metrics or a checkpoint), so a
/// fresh run never mixes its records or checkpoints with an older one.
pub fn check_fresh_run_dir(run_dir: &Path) -> Result<()> {
    let in_use = |what: &'static str| {
        Err(Error::RunDirInUse {
            path: run_dir.to_path_buf(),
            what,
        })
    };
    if run_dir.join(crate::run_dir::CONFIG_FILE).exists() {
        return in_use(crate::run_dir::CONFIG_FILE);
    }
    let metrics = run_dir.join(crate::metrics::METRICS_FILE);
    if std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0) {
        return in_use("metrics.jsonl");
    }
    let checkpoints = run_dir.join(crate::checkpoint::CHECKPOINTS_DIR);
    if !crate::checkpoint::list_checkpoints(&checkpoints)?.is_empty() {
        return in_use("checkpoints");
    }
    Ok(())
}

/// Where a resumed run starts: a checkpoint, or (a run killed before its first
/// checkpoint) step 0 with the run directory's own config.
#[derive(Debug)]
pub struct CheckpointOrigin {
    /// The checkpoint directory; `None` when resuming from step 0.
    pub dir: Option<PathBuf>,
    /// The run directory (`<run>/checkpoints/ckpt-N` → `<run>`).
    pub run_dir: PathBuf,
    /// The config TOML the run was written with.
    pub config_toml: String,
    /// [`DataSource::name`](crate::DataSource::name) of its data ("synthetic" or a path).
    pub data_source: String,
    /// The step it resumes from.
    pub step: u64,
    /// Checkpoint directories the scan passed over, with the reason.
    pub skipped: Vec<crate::checkpoint::Skipped>,
}

/// Reads where the run `path` refers to (a run directory, its `checkpoints/` or a
/// checkpoint directory) resumes: the newest complete checkpoint's config, data
/// source and step (its manifest verified, no tensors decoded); or, for a run
/// directory holding a `config.toml` but no checkpoint, step 0 with that config.
pub fn checkpoint_origin(path: &Path) -> Result<CheckpointOrigin> {
    let run_dir = crate::checkpoint::run_dir_of(path);
    let resolved = match crate::checkpoint::resolve_checkpoint(path) {
        Ok(r) => r,
        Err(Error::CheckpointMissing { .. })
            if path.exists() && run_dir.join(crate::run_dir::CONFIG_FILE).is_file() =>
        {
            let run = crate::run_dir::RunDir::open(&run_dir)?;
            let skipped = crate::checkpoint::scan_checkpoints(&run.checkpoints_dir())?.skipped();
            return Ok(CheckpointOrigin {
                dir: None,
                config_toml: run.read_config()?,
                data_source: run
                    .read_origin()?
                    .unwrap_or_else(|| "synthetic".to_string()),
                step: 0,
                skipped,
                run_dir,
            });
        }
        Err(e) => return Err(e),
    };
    let state = crate::checkpoint::read_checkpoint_state(&resolved.dir)?;
    Ok(CheckpointOrigin {
        dir: Some(resolved.dir),
        run_dir,
        config_toml: state.config_toml,
        data_source: state.data.source,
        step: state.step,
        skipped: resolved.skipped,
    })
}

/// Makes `run_dir` consistent with a run resumed at `step`: later checkpoints are
/// retired (renamed `.superseded`), debris of unfinished saves removed, and
/// `metrics.jsonl` cut back to the records of steps up to `step`, so every step
/// has one record. Returns one line per change. Call only while holding the
/// run directory's [`RunLock`](crate::run_dir::RunLock).
pub fn prepare_resume(run_dir: &Path, step: u64) -> Result<Vec<String>> {
    let checkpoints = run_dir.join(crate::checkpoint::CHECKPOINTS_DIR);
    let mut notes = crate::checkpoint::retire_checkpoints_after(&checkpoints, step)?;
    let metrics = run_dir.join(crate::metrics::METRICS_FILE);
    let dropped = crate::metrics::truncate_after_step(&metrics, step)?;
    if dropped > 0 {
        notes.push(format!(
            "{}: dropped {dropped} records after step {step} (they are re-run)",
            metrics.display()
        ));
    }
    Ok(notes)
}

/// Appends one `config_change` record per change a resume at `step` makes (the
/// keys of [`RESUME_SAFE_KEYS`](crate::checkpoint::RESUME_SAFE_KEYS), or `data`
/// for the same corpus read from another path) to the run's `metrics.jsonl`,
/// after [`prepare_resume`]. Returns one line per change to show.
pub fn record_config_changes(
    run_dir: &Path,
    step: u64,
    changes: &[crate::checkpoint::ConfigChange],
) -> Result<Vec<String>> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let mut writer = MetricsWriter::open(&run_dir.join(crate::metrics::METRICS_FILE))?;
    let mut lines = Vec::new();
    for c in changes {
        writer.write(&MetricsRecord::ConfigChange(ConfigChangeRecord {
            step,
            key: c.key.clone(),
            old: c.old.clone(),
            new: c.new.clone(),
        }))?;
        lines.push(format!(
            "{} {} -> {} from step {}",
            c.key,
            c.old,
            c.new,
            step + 1
        ));
    }
    Ok(lines)
}

/// Trains `trainer` up to `opts.total_steps`, writing into `run_dir`: one
/// `metrics.jsonl` record per step (and per eval, sample, goodput total), the
/// progress display, an eval every `train.eval_every` steps and at the end, a
/// checkpoint every `train.checkpoint_every` steps and at the end, and
/// `summary.txt`. Returns [`Error::NonFiniteSteps`] when the NaN/Inf guard stops the
/// run (the skipped steps' records are written first; no checkpoint is taken).
pub fn run_training(
    trainer: &mut Trainer,
    run_dir: &Path,
    opts: &RunOptions,
    progress: &mut Progress,
) -> Result<RunSummary> {
    let start_step = trainer.step_count();
    let plan = trainer.plan().clone();
    let checkpoints = run_dir.join(crate::checkpoint::CHECKPOINTS_DIR);
    let mut writer = MetricsWriter::open(&run_dir.join(crate::metrics::METRICS_FILE))?;
    let counts = trainer.counts();
    writer.write(&MetricsRecord::Run(RunInfo {
        start_step,
        total_steps: opts.total_steps,
        params: counts.params,
        active_params: counts.active_params,
        data: trainer.data().name().to_string(),
        domains: trainer.data().domain_names(),
        device: match trainer.device() {
            megamoe_tensor::Device::Cpu => format!(
                "cpu ({} threads)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            gpu => gpu.to_string(),
        },
        numerics: trainer.numerics().to_string(),
    }))?;
    let mut summary = RunSummary {
        run_dir: run_dir.to_path_buf(),
        numerics: trainer.numerics(),
        start_step,
        final_step: start_step,
        first_loss: None,
        last_loss: None,
        last_eval: None,
        skipped_steps: 0,
        checkpoint: None,
        sample: None,
        goodput: trainer.goodput(),
        whole_run: None,
    };
    let mut watch = Watch::default();
    let mut tensorboard = TensorBoardWriter::create(run_dir)?;
    let every = |period: Option<usize>, step: u64| {
        period.is_some_and(|p| p > 0 && step.is_multiple_of(p as u64))
    };
    let mut evaluated_at = None;
    while trainer.step_count() < opts.total_steps {
        let m = trainer.step()?;
        writer.write(&MetricsRecord::Step(m.clone()))?;
        tensorboard.step(&m)?;
        let show = opts.show_every <= 1
            || m.step % opts.show_every == 0
            || m.step == start_step + 1
            || m.step == opts.total_steps
            || m.skipped;
        if show {
            progress.step(&m);
        }
        for w in watch.step(&m) {
            progress.message(&format!("warning: {w}"));
        }
        summary.first_loss.get_or_insert((m.step, m.loss.total));
        summary.last_loss = Some((m.step, m.loss.total));
        summary.final_step = m.step;
        summary.skipped_steps += u64::from(m.skipped);
        crate::failpoint::hit("metrics.step_written", m.step);
        trainer.check_guard()?;
        if every(plan.train.eval_every, m.step) {
            let e = trainer.evaluate()?;
            progress.message(&format_eval_line(&e));
            summary.last_eval = Some((e.step, e.loss));
            if let Some(w) = watch.eval(&e) {
                progress.message(&format!("warning: {w}"));
            }
            evaluated_at = Some(m.step);
            tensorboard.eval(&e)?;
            writer.write(&MetricsRecord::Eval(e))?;
        }
        if every(plan.train.checkpoint_every, m.step) && m.step < opts.total_steps {
            let dir = trainer.save_checkpoint(&checkpoints)?;
            progress.message(&format!("checkpoint {}", dir.display()));
            writer.write(&MetricsRecord::Goodput(GoodputRecord {
                step: m.step,
                totals: trainer.goodput(),
            }))?;
        }
    }
    let step = trainer.step_count();
    if plan.train.eval_every.is_some() && evaluated_at != Some(step) && step > start_step {
        let e = trainer.evaluate()?;
        progress.message(&format_eval_line(&e));
        summary.last_eval = Some((e.step, e.loss));
        if let Some(w) = watch.eval(&e) {
            progress.message(&format!("warning: {w}"));
        }
        tensorboard.eval(&e)?;
        writer.write(&MetricsRecord::Eval(e))?;
    }
    if let Some((s, loss)) = summary.last_eval.filter(|(_, l)| !l.is_finite()) {
        return Err(Error::NonFiniteEval { step: s, loss });
    }
    if opts.sample_tokens > 0 {
        let prompt = sample_prompt(trainer);
        let s = trainer.sample(&prompt, opts.sample_tokens)?;
        writer.write(&MetricsRecord::Sample(s.clone()))?;
        summary.sample = Some(s);
    }
    let final_dir = checkpoints.join(crate::checkpoint::checkpoint_dir_name(step));
    summary.checkpoint = Some(if crate::checkpoint::is_checkpoint_complete(&final_dir) {
        final_dir
    } else {
        trainer.save_checkpoint(&checkpoints)?
    });
    progress.finish();
    summary.goodput = trainer.goodput();
    writer.write(&MetricsRecord::Goodput(GoodputRecord {
        step,
        totals: summary.goodput,
    }))?;
    let records = crate::metrics::read_metrics(&run_dir.join(crate::metrics::METRICS_FILE))?;
    summary.whole_run = Some(RunTotals::from_records(&records));
    let path = run_dir.join(SUMMARY_FILE);
    std::fs::write(&path, summary.to_string()).map_err(|e| Error::io("write", &path, e))?;
    Ok(summary)
}

/// Watches a run as it goes and returns each warning once: a GateSkip branch
/// or FlexiDepth layer newly skipped by > 95 % of tokens, the held-out loss
/// rising for several evaluations in a row.
#[derive(Debug, Default)]
struct Watch {
    collapsed: Vec<(&'static str, usize)>,
    evals: Vec<(u64, f64)>,
}

impl Watch {
    fn step(&mut self, m: &StepMetrics) -> Vec<String> {
        let now = collapsed_parts(m);
        // A part that recovers may warn again if it collapses again.
        self.collapsed
            .retain(|&(k, l)| now.iter().any(|&(k2, l2, _)| (k2, l2) == (k, l)));
        let mut out = Vec::new();
        for (kind, layer, kept) in now {
            if !self.collapsed.contains(&(kind, layer)) {
                self.collapsed.push((kind, layer));
                let c = Collapse {
                    kind,
                    layer,
                    kept,
                    since_step: m.step,
                };
                out.push(c.to_string());
            }
        }
        out
    }

    fn eval(&mut self, e: &EvalMetrics) -> Option<String> {
        self.evals.push((e.step, e.loss));
        eval_rise_warning(&self.evals)
    }
}

/// `eval step 50 | loss 2.1034 | arithmetic 1.90 copy 0.85 ...`
fn format_eval_line(e: &EvalMetrics) -> String {
    let mut line = format!("eval step {} | loss {:.4}", e.step, e.loss);
    if e.per_domain.len() > 1 {
        line += " |";
        for d in &e.per_domain {
            line += &format!(" {} {:.2}", d.domain, d.loss);
        }
    }
    line
}

/// The first 24 tokens of the first held-out sequence, decoded: a prompt in the
/// data's own style.
pub(crate) fn sample_prompt(trainer: &Trainer) -> String {
    let source = trainer.data();
    let t = trainer.plan().model.seq_len;
    heldout_batches(source, 1, t, 1)
        .ok()
        .and_then(|b| b.into_iter().next())
        .and_then(|b| {
            let ids: Vec<u32> = b.inputs.iter().take(24).map(|&x| x.max(0) as u32).collect();
            source.tokenizer().decode(&ids).ok()
        })
        .unwrap_or_else(|| "The ".to_string())
}

#[cfg(test)]
mod tests {
    use super::readable;

    #[test]
    fn samples_print_without_escapes() {
        assert_eq!(readable("a\"b\\c\nd\te\u{7}é"), "a\"b\\c⏎d→e\u{fffd}é");
    }
}
