//! The live view of a run: an indicatif progress bar when stderr is a terminal,
//! otherwise one plain line per step (logs, CI, pipes).
//!
//! Both show the same fixed fields in a fixed order (STYLE 2.10):
//!
//! ```text
//! step  120/5000 | loss 2.4817 | aux 0.0113 | gnorm 0.82 | lr 3.0e-04 | drop 0.4% | load 1.31 | 412 ms | 158k tok/s | eta 33m 30s
//! ```
//!
//! `aux` appears when the step has an aux loss, `drop` and `load` (max/mean
//! tokens per routed expert, worst layer) when it has MoE layers.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::metrics::StepMetrics;

/// Shows step progress; see the module doc.
pub struct Progress {
    sink: Sink,
    total_steps: u64,
    start_step: u64,
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
            .finish()
    }
}

impl Progress {
    /// A bar on stderr if it is a terminal, else plain lines on stderr. `start_step`
    /// is the step a resumed run starts from (0 for a fresh run).
    pub fn new(start_step: u64, total_steps: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar =
                ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{bar:24.cyan/blue} {msg} | eta {eta}")
                    .expect("the template literal is valid")
                    .progress_chars("=> "),
            );
            bar.set_position(start_step);
            bar.reset_eta();
            Self::with_sink(Sink::Bar(bar), start_step, total_steps)
        } else {
            Self::with_writer(Box::new(std::io::stderr()), start_step, total_steps)
        }
    }

    /// Plain lines to `writer` (tests, log files).
    pub fn with_writer(writer: Box<dyn Write + Send>, start_step: u64, total_steps: u64) -> Self {
        Self::with_sink(Sink::Lines(writer), start_step, total_steps)
    }

    /// Shows nothing (benchmarks, non-zero ranks).
    pub fn hidden(start_step: u64, total_steps: u64) -> Self {
        Self::with_sink(Sink::Hidden, start_step, total_steps)
    }

    fn with_sink(sink: Sink, start_step: u64, total_steps: u64) -> Self {
        Progress {
            sink,
            total_steps,
            start_step,
            started: Instant::now(),
        }
    }

    /// Shows one finished step.
    pub fn step(&mut self, m: &StepMetrics) {
        let done = m.step.saturating_sub(self.start_step);
        let left = self.total_steps.saturating_sub(m.step);
        let eta = (done > 0).then(|| self.started.elapsed().mul_f64(left as f64 / done as f64));
        match &mut self.sink {
            Sink::Bar(bar) => {
                bar.set_position(m.step);
                bar.set_message(format_step_line(m, self.total_steps, None));
            }
            Sink::Lines(w) => {
                let line = format_step_line(m, self.total_steps, eta);
                // Progress output is best effort: a closed stderr must not stop training.
                let _ = writeln!(w, "{line}").and_then(|()| w.flush());
            }
            Sink::Hidden => {}
        }
    }

    /// Shows a free-form line (eval result, checkpoint saved, sample) without
    /// breaking the bar.
    pub fn message(&mut self, text: &str) {
        match &mut self.sink {
            Sink::Bar(bar) => bar.println(text),
            Sink::Lines(w) => {
                let _ = writeln!(w, "{text}").and_then(|()| w.flush());
            }
            Sink::Hidden => {}
        }
    }

    /// Ends the bar, leaving its last state on screen.
    pub fn finish(&mut self) {
        if let Sink::Bar(bar) = &self.sink {
            bar.abandon();
        }
    }
}

/// The fixed-field step line (see the module doc); `eta` is appended when given.
pub fn format_step_line(m: &StepMetrics, total_steps: u64, eta: Option<Duration>) -> String {
    let width = total_steps.to_string().len();
    let mut line = format!(
        "step {:>width$}/{total_steps} | loss {:.4}",
        m.step, m.loss.total
    );
    if m.loss.aux != 0.0 {
        line += &format!(" | aux {:.4}", m.loss.aux);
    }
    line += &format!(" | gnorm {:.2} | lr {:.1e}", m.grad_norm, m.lr);
    if let Some(load) = m.max_load() {
        line += &format!(" | drop {:.1}% | load {load:.2}", 100.0 * m.drop_fraction());
    }
    line += &format!(
        " | {} | {} tok/s",
        format_seconds_short(m.step_time_s),
        format_count(m.tokens_per_s)
    );
    if m.skipped {
        line += " | SKIPPED (non-finite loss or gradient)";
    }
    if let Some(eta) = eta {
        line += &format!(" | eta {}", format_duration(eta));
    }
    line
}

/// `412 ms` below 10 s, else `12.3 s`.
fn format_seconds_short(s: f64) -> String {
    if s < 10.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.1} s")
    }
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

/// `45s`, `3m 05s`, `2h 03m`.
fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
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
            step_time_s: 0.412,
            tokens_per_s: 158_400.0,
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

    #[test]
    fn step_line_has_fixed_fields_in_fixed_order() {
        assert_eq!(
            format_step_line(&metrics(), 5000, Some(Duration::from_secs(2010))),
            "step  120/5000 | loss 2.4817 | aux 0.0113 | gnorm 0.82 | lr 3.0e-4 | drop 1.0% \
             | load 1.24 | 412 ms | 158k tok/s | eta 33m 30s"
        );
    }

    #[test]
    fn dense_skipped_step_line_omits_moe_fields_and_says_skipped() {
        let mut m = metrics();
        m.moe.clear();
        m.loss.aux = 0.0;
        m.loss.total = f64::NAN;
        m.skipped = true;
        let line = format_step_line(&m, 200, None);
        assert_eq!(
            line,
            "step 120/200 | loss NaN | gnorm 0.82 | lr 3.0e-4 | 412 ms | 158k tok/s \
             | SKIPPED (non-finite loss or gradient)"
        );
    }

    #[test]
    fn plain_mode_writes_one_line_per_step_and_messages() {
        let buf = Shared::default();
        let mut p = Progress::with_writer(Box::new(buf.clone()), 100, 200);
        let mut m = metrics();
        for step in [101, 102] {
            m.step = step;
            p.step(&m);
        }
        p.message("eval loss 2.5");
        p.finish();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("step 101/200 | loss 2.4817"), "{text}");
        assert!(lines[1].contains(" | eta "), "{text}");
        assert_eq!(lines[2], "eval loss 2.5");
    }

    #[test]
    fn count_and_duration_formats() {
        assert_eq!(format_count(950.0), "950");
        assert_eq!(format_count(2_400_000.0), "2.4M");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(7380)), "2h 03m");
        assert_eq!(format_seconds_short(12.34), "12.3 s");
    }
}
