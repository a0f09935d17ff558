//! Goodput: where a run's wall-clock time went.
//!
//! Time is booked to one of five categories — productive training steps, waiting
//! for data, writing checkpoints, evaluation, and compilation / warm-up (kernel
//! JIT, CUDA-graph capture, first-step allocation). Wall time not booked anywhere
//! is "other" (start-up, logging, the trainer's own overhead).
//!
//! `goodput = step_s / wall_s`: the fraction of wall time spent advancing the
//! model. Totals are saved in checkpoints so a resumed run keeps counting.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A category of wall-clock time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeCategory {
    /// Forward, backward and optimizer of a training step (productive time).
    Step,
    /// Producing or waiting for a batch.
    Data,
    /// Saving (or loading) a checkpoint.
    Checkpoint,
    /// Held-out evaluation and sampling.
    Eval,
    /// Compilation, graph capture and warm-up.
    Compile,
}

impl TimeCategory {
    /// All categories, in report order.
    pub const ALL: [TimeCategory; 5] = [
        TimeCategory::Step,
        TimeCategory::Data,
        TimeCategory::Checkpoint,
        TimeCategory::Eval,
        TimeCategory::Compile,
    ];

    /// Lower-case name as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            TimeCategory::Step => "step",
            TimeCategory::Data => "data",
            TimeCategory::Checkpoint => "checkpoint",
            TimeCategory::Eval => "eval",
            TimeCategory::Compile => "compile",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Seconds per category and total wall seconds; additive across run segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GoodputTotals {
    /// Wall-clock seconds covered.
    pub wall_s: f64,
    /// Seconds in training steps.
    pub step_s: f64,
    /// Seconds producing batches.
    pub data_s: f64,
    /// Seconds writing checkpoints.
    pub checkpoint_s: f64,
    /// Seconds in evaluation.
    pub eval_s: f64,
    /// Seconds compiling / warming up.
    pub compile_s: f64,
}

impl GoodputTotals {
    /// Seconds booked to `category`.
    pub fn seconds(&self, category: TimeCategory) -> f64 {
        match category {
            TimeCategory::Step => self.step_s,
            TimeCategory::Data => self.data_s,
            TimeCategory::Checkpoint => self.checkpoint_s,
            TimeCategory::Eval => self.eval_s,
            TimeCategory::Compile => self.compile_s,
        }
    }

    fn seconds_mut(&mut self, category: TimeCategory) -> &mut f64 {
        match category {
            TimeCategory::Step => &mut self.step_s,
            TimeCategory::Data => &mut self.data_s,
            TimeCategory::Checkpoint => &mut self.checkpoint_s,
            TimeCategory::Eval => &mut self.eval_s,
            TimeCategory::Compile => &mut self.compile_s,
        }
    }

    /// Wall seconds booked to no category (never negative).
    pub fn other_s(&self) -> f64 {
        let booked: f64 = TimeCategory::ALL.iter().map(|&c| self.seconds(c)).sum();
        (self.wall_s - booked).max(0.0)
    }

    /// `step_s / wall_s`; 0 when no wall time has passed.
    pub fn goodput(&self) -> f64 {
        if self.wall_s > 0.0 {
            (self.step_s / self.wall_s).min(1.0)
        } else {
            0.0
        }
    }

    /// Fraction of wall time in `category`; 0 when no wall time has passed.
    pub fn fraction(&self, category: TimeCategory) -> f64 {
        if self.wall_s > 0.0 {
            self.seconds(category) / self.wall_s
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for GoodputTotals {
    /// `goodput 81.2% | step 40.1s data 2.0s checkpoint 1.1s eval 3.5s compile 0.0s other 2.7s`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "goodput {:.1}% |", 100.0 * self.goodput())?;
        for c in TimeCategory::ALL {
            write!(f, " {} {:.1}s", c.name(), self.seconds(c))?;
        }
        write!(
            f,
            " other {:.1}s of {:.1}s wall",
            self.other_s(),
            self.wall_s
        )
    }
}

/// Books elapsed time to categories during a run.
#[derive(Debug, Clone)]
pub struct GoodputTracker {
    started: Instant,
    prior: GoodputTotals,
    booked: [Duration; 5],
}

impl Default for GoodputTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl GoodputTracker {
    /// Starts the wall clock now with nothing booked.
    pub fn new() -> Self {
        Self::resume(GoodputTotals::default())
    }

    /// Starts the wall clock now on top of totals saved by an earlier run segment.
    pub fn resume(prior: GoodputTotals) -> Self {
        GoodputTracker {
            started: Instant::now(),
            prior,
            booked: [Duration::ZERO; 5],
        }
    }

    /// Books `elapsed` to `category`.
    pub fn record(&mut self, category: TimeCategory, elapsed: Duration) {
        self.booked[category.index()] += elapsed;
    }

    /// Runs `f`, booking its duration to `category`.
    pub fn time<T>(&mut self, category: TimeCategory, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.record(category, start.elapsed());
        out
    }

    /// Totals of earlier segments plus this one up to now (save these in a checkpoint).
    pub fn totals(&self) -> GoodputTotals {
        self.totals_with_wall(self.started.elapsed())
    }

    /// Totals with this segment's wall time given explicitly.
    pub fn totals_with_wall(&self, segment_wall: Duration) -> GoodputTotals {
        let mut t = self.prior;
        t.wall_s += segment_wall.as_secs_f64();
        for c in TimeCategory::ALL {
            *t.seconds_mut(c) += self.booked[c.index()].as_secs_f64();
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_prior_segment_and_compute_goodput() {
        let prior = GoodputTotals {
            wall_s: 10.0,
            step_s: 6.0,
            data_s: 1.0,
            ..Default::default()
        };
        let mut g = GoodputTracker::resume(prior);
        g.record(TimeCategory::Step, Duration::from_secs(8));
        g.record(TimeCategory::Checkpoint, Duration::from_millis(1500));
        g.record(TimeCategory::Step, Duration::from_secs(1));
        let t = g.totals_with_wall(Duration::from_secs(10));
        // wall 10+10 = 20; step 6+8+1 = 15; goodput 15/20 = 0.75.
        assert_eq!(t.wall_s, 20.0);
        assert_eq!(t.step_s, 15.0);
        assert_eq!(t.checkpoint_s, 1.5);
        assert!((t.goodput() - 0.75).abs() < 1e-12);
        // other = 20 - (15 + 1 + 1.5) = 2.5.
        assert!((t.other_s() - 2.5).abs() < 1e-12);
        assert!((t.fraction(TimeCategory::Data) - 0.05).abs() < 1e-12);
    }

    #[test]
    fn no_wall_time_gives_zero_goodput_not_nan() {
        let t = GoodputTotals::default();
        assert_eq!(t.goodput(), 0.0);
        assert_eq!(t.fraction(TimeCategory::Eval), 0.0);
    }

    #[test]
    fn time_books_closure_result_to_category() {
        let mut g = GoodputTracker::new();
        let v = g.time(TimeCategory::Eval, || 41 + 1);
        assert_eq!(v, 42);
        let t = g.totals_with_wall(Duration::from_secs(1));
        assert_eq!(t.step_s, 0.0);
        assert!(t.eval_s >= 0.0 && t.eval_s <= t.wall_s + 1.0);
    }

    #[test]
    fn totals_round_trip_through_json() {
        let t = GoodputTotals {
            wall_s: 3.25,
            compile_s: 0.5,
            ..Default::default()
        };
        let back: GoodputTotals =
            serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }
}
