//! The live view of a run. Every `train.log_every` steps (and at the first,
//! the last and any skipped step) one line is printed that stays in the
//! scrollback; on a terminal an indicatif bar below the lines shows the
//! current step between them. Without a terminal (logs, CI, pipes) only the
//! lines are written.
//!
//! The line has fixed fields in a fixed order; [`LEGEND`]
//! explains them and is printed once at the start:
//!
//! ```text
//! 01:02:03 step  120/5000 | 123k tok | loss 2.4817 aux 0.0113 | lr 3.0e-4 | gnorm 0.82 | drop 0.4% load 1.31 | 158k tok/s mfu 12.0% | 1m02s eta 33m30s
//! ```
//!
//! `aux` appears when the step has a load-balancing loss, `muon` (Muon's
//! learning rate) with the Muon optimizer, `drop` and `load` with MoE layers,
//! `mfu` when a peak FLOP/s is known.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::clock::{short_duration, UtcTime};
use crate::metrics::StepMetrics;

/// What each field of a step line means (printed once before the first step).
pub const LEGEND: &str = "\
columns: UTC time, step/total | tokens seen | loss = training loss (aux = load-balancing loss)
  | lr = learning rate (muon = Muon's rate for matrices) | gnorm = gradient norm before clipping
  | drop = share of expert assignments dropped over capacity, load = busiest expert's tokens / mean
    (worst layer; 1.00 = perfectly balanced) | throughput, mfu = model FLOPs / peak FLOP/s
  | elapsed, eta = estimated time left";

/// Shows step progress; see the module doc.
pub struct Progress {
    sink: Sink,
    total_steps: u64,
    start_step: u64,
    log_every: u64,
    started: Instant,
}

enum Sink {
    Bar(ProgressBar),
    Lines(Box<dyn Write + Send>),
    Hidden,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.sink {
            Sink::Bar(_) => "bar",
            Sink::Lines(_) => "lines",
            Sink::Hidden => "hidden",
        };
        f.debug_struct("Progress")
            .field("sink", &kind)
            .field("total_steps", &self.total_steps)
            .field("start_step", &self.start_step)
            .field("log_every", &self.log_every)
            .finish()
    }
}

impl Progress {
    /// Lines plus a live bar on stderr if it is a terminal, else plain lines on
    /// stderr. `start_step` is the step a resumed run starts from (0 for a fresh
    /// run); a line is printed every `log_every` steps.
    pub fn new(start_step: u64, total_steps: u64, log_every: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar =
                ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:24.cyan/blue} {msg}")
                    .expect("the template literal is valid")
                    .progress_chars("=> "),
            );
            bar.set_position(start_step);
            Self::with_sink(Sink::Bar(bar), start_step, total_steps, log_every)
        } else {
            Self::with_writer(
                Box::new(std::io::stderr()),
                start_step,
                total_steps,
                log_every,
            )
        }
    }

    /// Plain lines to `writer` (tests, log files).
    pub fn with_writer(
        writer: Box<dyn Write + Send>,
        start_step: u64,
        total_steps: u64,
        log_every: u64,
    ) -> Self {
        Self::with_sink(Sink::Lines(writer), start_step, total_steps, log_every)
    }

    /// Shows nothing (benchmarks, non-zero ranks).
    pub fn hidden(start_step: u64, total_steps: u64) -> Self {
        Self::with_sink(Sink::Hidden, start_step, total_steps, 1)
    }

    fn with_sink(sink: Sink, start_step: u64, total_steps: u64, log_every: u64) -> Self {
        Progress {
            sink,
            total_steps,
            start_step,
            log_every: log_every.max(1),
            started: Instant::now(),
        }
    }

    /// Whether `m` gets a line that stays: every `log_every`-th step, the first
    /// and last step of this process, and every skipped step.
    fn logs(&self, m: &StepMetrics) -> bool {
        m.step.is_multiple_of(self.log_every)
            || m.step == self.start_step + 1
            || m.step == self.total_steps
            || m.skipped
    }

    /// Shows one finished step (call it for every step).
    pub fn step(&mut self, m: &StepMetrics) {
        let elapsed = self.started.elapsed();
        let done = m.step.saturating_sub(self.start_step);
        let left = self.total_steps.saturating_sub(m.step);
        let eta = (done > 0).then(|| elapsed.mul_f64(left as f64 / done as f64));
        let clock = StepClock {
            now: UtcTime::now().time_of_day(),
            elapsed,
            eta,
        };
        let logs = self.logs(m);
        let line = || format_step_line(m, self.total_steps, &clock);
        match &mut self.sink {
            Sink::Bar(bar) => {
                let line = line();
                bar.set_position(m.step);
                if logs {
                    bar.println(&line);
                }
                bar.set_message(line);
            }
            Sink::Lines(w) if logs => {
                // Progress output is best effort: a closed stderr must not stop training.
                let _ = writeln!(w, "{}", line()).and_then(|()| w.flush());
            }
            Sink::Lines(_) | Sink::Hidden => {}
        }
    }

    /// Shows a free-form line (header, eval result, checkpoint saved) that stays,
    /// above the bar.
    pub fn message(&mut self, text: &str) {
        match &mut self.sink {
            Sink::Bar(bar) => bar.println(text),
            Sink::Lines(w) => {
                let _ = writeln!(w, "{text}").and_then(|()| w.flush());
            }
            Sink::Hidden => {}
        }
    }

    /// Removes the bar (the step lines above it stay).
    pub fn finish(&mut self) {
        if let Sink::Bar(bar) = &self.sink {
            bar.finish_and_clear();
        }
    }
}

/// The time fields of a step line.
#[derive(Debug, Clone, PartialEq)]
pub struct StepClock {
    /// Wall-clock time of day (UTC), `hh:mm:ss`.
    pub now: String,
    /// Time since this process started training.
    pub elapsed: Duration,
    /// Estimated time to the last step.
    pub eta: Option<Duration>,
}

/// The fixed-field step line (see the module doc).
pub fn format_step_line(m: &StepMetrics, total_steps: u64, clock: &StepClock) -> String {
    let width = total_steps.to_string().len();
    let mut line = format!(
        "{} step {:>width$}/{total_steps} | {} tok | loss {:.4}",
        clock.now,
        m.step,
        format_count(m.step as f64 * m.tokens as f64),
        m.loss.total
    );
    if m.loss.aux != 0.0 {
        line += &format!(" aux {:.4}", m.loss.aux);
    }
    line += &format!(" | lr {:.1e}", m.lr);
    if let Some(muon) = m.muon_lr {
        line += &format!(" muon {muon:.1e}");
    }
    line += &format!(" | gnorm {:.2}", m.grad_norm);
    if let Some(load) = m.max_load() {
        line += &format!(" | drop {:.1}% load {load:.2}", 100.0 * m.drop_fraction());
    }
    line += &format!(" | {} tok/s", format_count(m.tokens_per_s));
    if let Some(mfu) = m.mfu {
        line += &format!(" mfu {:.1}%", 100.0 * mfu);
    }
    line += &format!(" | {}", short_duration(clock.elapsed));
    if let Some(eta) = clock.eta {
        line += &format!(" eta {}", short_duration(eta));
    }
    if m.skipped {
        line += " | SKIPPED (non-finite loss or gradient)";
    }
    line
}

/// `950`, `158k`, `2.4M`.
fn format_count(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{LossParts, MoeLayerStats};
    use std::sync::{Arc, Mutex};

    /// A `Write` that appends into a shared buffer the test can read.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn metrics() -> StepMetrics {
        StepMetrics {
            step: 120,
            loss: LossParts {
                total: 2.48171,
                lm: 2.47,
                aux: 0.0113,
                ..Default::default()
            },
            grad_norm: 0.8249,
            lr: 3e-4,
            tokens: 1024,
            step_time_s: 0.412,
            tokens_per_s: 158_400.0,
            mfu: Some(0.12),
            // 4 experts: 100 routed slots, max 31 → load 31 / 25 = 1.24; 1 dropped → 1.0%.
            moe: vec![MoeLayerStats::from_counts(
                0,
                vec![31, 25, 25, 19],
                1,
                0,
                50,
                2,
            )],
            ..Default::default()
        }
    }

    fn clock() -> StepClock {
        StepClock {
            now: "01:02:03".to_string(),
            elapsed: Duration::from_secs(62),
            eta: Some(Duration::from_secs(2010)),
        }
    }

    #[test]
    fn step_line_has_fixed_fields_in_fixed_order() {
        // 120 steps × 1024 tokens = 122,880 tokens seen → "123k".
        assert_eq!(
            format_step_line(&metrics(), 5000, &clock()),
            "01:02:03 step  120/5000 | 123k tok | loss 2.4817 aux 0.0113 | lr 3.0e-4 | gnorm 0.82 \
             | drop 1.0% load 1.24 | 158k tok/s mfu 12.0% | 1m02s eta 33m30s"
        );
    }

    #[test]
    fn muon_rate_is_shown_next_to_the_adamw_rate() {
        let mut m = metrics();
        m.muon_lr = Some(0.02);
        let line = format_step_line(&m, 5000, &clock());
        assert!(line.contains("| lr 3.0e-4 muon 2.0e-2 |"), "{line}");
    }

    #[test]
    fn dense_skipped_step_line_omits_moe_fields_and_says_skipped() {
        let mut m = metrics();
        m.moe.clear();
        m.loss.aux = 0.0;
        m.loss.total = f64::NAN;
        m.mfu = None;
        m.skipped = true;
        let c = StepClock {
            eta: None,
            ..clock()
        };
        assert_eq!(
            format_step_line(&m, 200, &c),
            "01:02:03 step 120/200 | 123k tok | loss NaN | lr 3.0e-4 | gnorm 0.82 | 158k tok/s \
             | 1m02s | SKIPPED (non-finite loss or gradient)"
        );
    }

    #[test]
    fn lines_are_written_every_log_every_steps_plus_first_and_last() {
        let buf = Shared::default();
        let mut p = Progress::with_writer(Box::new(buf.clone()), 100, 110, 4);
        let mut m = metrics();
        for step in 101..=110 {
            m.step = step;
            p.step(&m);
        }
        p.message("eval loss 2.5");
        p.finish();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let steps: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split(" step ").nth(1))
            .map(|rest| rest.split('/').next().unwrap().trim())
            .collect();
        assert_eq!(steps, ["101", "104", "108", "110"], "{text}");
        assert!(text.contains(" eta "), "{text}");
        assert_eq!(text.lines().last(), Some("eval loss 2.5"));
    }

    #[test]
    fn count_formats() {
        assert_eq!(format_count(950.0), "950");
        assert_eq!(format_count(2_400_000.0), "2.4M");
    }
}
