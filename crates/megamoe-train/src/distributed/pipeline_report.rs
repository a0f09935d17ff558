//! Busy / idle time of a pipeline run next to the simulator's prediction for the same
//! schedule: every step's measured timelines ([`RankTiming`], one per pipeline rank) are
//! compared with a simulation of the schedule under that step's mean measured action
//! durations ([`measured_costs`]), and the steps are summed. Written by `megamoe train
//! --world N` as `pipeline.json` in the run directory and summarised in the run summary.

use megamoe_pipeline::executor::{compare, measured_costs, RankTiming};
use megamoe_pipeline::simulate::simulate;
use megamoe_pipeline::Schedule;
use serde::Serialize;

use crate::error::Result;

/// One pipeline rank over the whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineRankTime {
    /// The pipeline rank.
    pub pp_rank: usize,
    /// Measured seconds in compute actions (F, I, W, B, F&B), summed over steps.
    pub busy_s: f64,
    /// Measured seconds idle: each step's makespan (latest end over the pipeline) minus
    /// busy, summed over steps.
    pub idle_s: f64,
    /// `idle_s / (busy_s + idle_s)`.
    pub idle_fraction: f64,
    /// The simulator's idle (bubble) fraction of this rank, the mean over steps of the
    /// schedule simulated under the step's measured action costs.
    pub predicted_idle_fraction: f64,
}

/// The timing report of one pipeline group (`pipeline.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PipelineReport {
    /// The schedule kind (`1f1b`, `dualpipev`, ...).
    pub schedule: String,
    /// Pipeline ranks.
    pub pp: usize,
    /// Micro-batches per step of each pipeline.
    pub microbatches: usize,
    /// Steps measured.
    pub steps: usize,
    /// Per pipeline rank.
    pub ranks: Vec<PipelineRankTime>,
}

impl PipelineReport {
    /// The report of `schedule` (`microbatches` per step) from `timings[r]`: pipeline
    /// rank r's timeline of every step, in step order.
    pub fn new(
        schedule: &Schedule,
        microbatches: usize,
        timings: &[Vec<RankTiming>],
    ) -> Result<PipelineReport> {
        let pp = timings.len();
        let steps = timings.iter().map(Vec::len).min().unwrap_or(0);
        let mut ranks: Vec<PipelineRankTime> = (0..pp)
            .map(|r| PipelineRankTime {
                pp_rank: r,
                busy_s: 0.0,
                idle_s: 0.0,
                idle_fraction: 0.0,
                predicted_idle_fraction: 0.0,
            })
            .collect();
        for s in 0..steps {
            let step: Vec<RankTiming> = timings.iter().map(|t| t[s].clone()).collect();
            let sim = simulate(schedule, &measured_costs(&step))?;
            for row in compare(&step, &sim) {
                if let Some(r) = ranks.get_mut(row.rank) {
                    r.busy_s += row.busy_s;
                    r.idle_s += row.idle_s;
                    r.predicted_idle_fraction += row.predicted_idle_fraction / steps as f64;
                }
            }
        }
        for r in &mut ranks {
            let total = r.busy_s + r.idle_s;
            r.idle_fraction = if total > 0.0 { r.idle_s / total } else { 0.0 };
        }
        Ok(PipelineReport {
            schedule: schedule
                .kind
                .map_or_else(|| "parsed".to_string(), |k| k.to_string()),
            pp,
            microbatches,
            steps,
            ranks,
        })
    }

    /// One summary line per pipeline rank.
    pub fn lines(&self) -> Vec<String> {
        self.ranks
            .iter()
            .map(|r| {
                format!(
                    "pipeline   pp rank {}: busy {:.2}s idle {:.2}s ({:.1}% idle; simulator {:.1}%) \
                     over {} steps of {}",
                    r.pp_rank,
                    r.busy_s,
                    r.idle_s,
                    100.0 * r.idle_fraction,
                    100.0 * r.predicted_idle_fraction,
                    self.steps,
                    self.schedule
                )
            })
            .collect()
    }
}
