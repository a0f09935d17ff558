//! Measured per-rank busy / idle time of an executed schedule, and the
//! comparison with the simulator's prediction.

use crate::ir::{Action, OpKind};
use crate::simulate::{Costs, Simulation, TimedAction};
use serde::Serialize;
use std::collections::HashMap;

/// What one rank did, in seconds since the run's common epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankTiming {
    /// The rank.
    pub rank: usize,
    /// Every compute action with its measured start and end.
    pub timeline: Vec<TimedAction>,
    /// Seconds from the rank's first action to its last op (including the
    /// waits in RECV ops).
    pub wall: f64,
}

impl RankTiming {
    pub(crate) fn new(rank: usize) -> RankTiming {
        RankTiming {
            rank,
            timeline: Vec::new(),
            wall: 0.0,
        }
    }

    pub(crate) fn record(&mut self, action: Action, start: f64, end: f64) {
        self.timeline.push(TimedAction { action, start, end });
    }

    /// Seconds spent in compute actions (F, I, W, B, F&B; sends and
    /// receives that happen between them are not counted).
    pub fn busy(&self) -> f64 {
        self.timeline.iter().map(|t| t.end - t.start).sum()
    }
}

/// One rank of [`compare`]: measured against predicted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimingRow {
    /// The rank.
    pub rank: usize,
    /// Measured busy seconds.
    pub busy_s: f64,
    /// Measured idle seconds: run makespan − busy.
    pub idle_s: f64,
    /// Measured idle fraction of the run's makespan.
    pub idle_fraction: f64,
    /// The simulator's bubble fraction for this rank (bubble / makespan).
    pub predicted_idle_fraction: f64,
}

/// Measured busy / idle per rank next to the simulator's prediction. The
/// run's makespan is the latest end over all ranks (the common epoch is the
/// start); `sim` is the simulation of the same schedule (e.g. under costs
/// measured from the run).
pub fn compare(timings: &[RankTiming], sim: &Simulation) -> Vec<TimingRow> {
    let makespan = timings
        .iter()
        .flat_map(|t| t.timeline.iter().map(|a| a.end))
        .fold(0.0, f64::max);
    timings
        .iter()
        .map(|t| {
            let busy = t.busy();
            let idle = (makespan - busy).max(0.0);
            let predicted = sim
                .ranks
                .get(t.rank)
                .filter(|_| sim.makespan > 0.0)
                .map_or(0.0, |r| r.bubble / sim.makespan);
            TimingRow {
                rank: t.rank,
                busy_s: busy,
                idle_s: idle,
                idle_fraction: if makespan > 0.0 { idle / makespan } else { 0.0 },
                predicted_idle_fraction: predicted,
            }
        })
        .collect()
}

/// Simulator costs from a run: the mean measured duration of each action kind (F, I, W,
/// B, F&B) over every rank, communication 0. A kind that did not run takes its share of
/// another (I = W = B/2, B = I + W).
pub fn measured_costs(timings: &[RankTiming]) -> Costs {
    let mut sums: HashMap<&str, (f64, usize)> = HashMap::new();
    for t in timings.iter().flat_map(|r| &r.timeline) {
        let key = match t.action {
            Action::OverlapFB { .. } => "FB",
            Action::Op(op) => match op.kind {
                OpKind::F => "F",
                OpKind::I => "I",
                OpKind::W => "W",
                _ => "B",
            },
        };
        let e = sums.entry(key).or_insert((0.0, 0));
        e.0 += t.end - t.start;
        e.1 += 1;
    }
    let mean = |k: &str| sums.get(k).map(|&(s, n)| s / n as f64);
    let f = mean("F").unwrap_or(0.0);
    let (i, w) = (mean("I"), mean("W"));
    let b = mean("B").unwrap_or(i.unwrap_or(0.0) + w.unwrap_or(0.0));
    let (i, w) = (i.unwrap_or(b / 2.0), w.unwrap_or(b / 2.0));
    Costs::constant(f, i, w, b, mean("FB"), 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::RankReport;

    #[test]
    fn idle_is_makespan_minus_busy_next_to_the_simulated_bubble() {
        let a = |s: &str| s.parse::<Action>().unwrap();
        let mut r0 = RankTiming::new(0);
        r0.record(a("0F0"), 0.0, 1.0);
        r0.record(a("0B0"), 3.0, 5.0);
        let mut r1 = RankTiming::new(1);
        r1.record(a("1F0"), 1.0, 2.0);
        r1.record(a("1B0"), 2.0, 3.0);
        let report = |rank, bubble| RankReport {
            rank,
            busy: 0.0,
            bubble,
            peak_activations: 1,
            param_stages: 1,
        };
        let sim = Simulation {
            timeline: Vec::new(),
            makespan: 4.0,
            bubble_rate: 0.0,
            ranks: vec![report(0, 1.0), report(1, 2.0)],
        };
        let rows = compare(&[r0, r1], &sim);
        // Makespan 5: rank 0 busy 3, idle 2; rank 1 busy 2, idle 3.
        assert_eq!((rows[0].busy_s, rows[0].idle_s), (3.0, 2.0));
        assert_eq!((rows[1].busy_s, rows[1].idle_s), (2.0, 3.0));
        assert_eq!(rows[1].idle_fraction, 0.6);
        assert_eq!(rows[0].predicted_idle_fraction, 0.25);
        assert_eq!(rows[1].predicted_idle_fraction, 0.5);
    }
}
