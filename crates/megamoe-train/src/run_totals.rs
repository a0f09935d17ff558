//! The whole run from its `metrics.jsonl`, over every segment (a fresh start
//! and each `--resume`): tokens seen, first and last loss, best and last eval,
//! final learning rate, and the warnings a person should not miss:
//!
//! - the held-out loss rose for [`EVAL_RISE_WARN`] evaluations in a row;
//! - a GateSkip branch or a FlexiDepth layer is skipped by more than
//!   `1 - `[`COLLAPSE_KEPT`] of the tokens (the layer has stopped working).
//!
//! A step logged twice (a run resumed from a checkpoint older than its last
//! logged step) counts once, with its latest record.

use std::collections::BTreeMap;

use crate::metrics::{EvalMetrics, MetricsRecord, StepMetrics};

/// Evaluations in a row with a rising held-out loss that raise a warning.
pub const EVAL_RISE_WARN: usize = 3;

/// A GateSkip branch or FlexiDepth layer kept by fewer than this share of the
/// tokens (i.e. skipped by more than 95 %) raises a warning.
pub const COLLAPSE_KEPT: f64 = 0.05;

/// One part of the model that tokens (almost) all skip.
#[derive(Debug, Clone, PartialEq)]
pub struct Collapse {
    /// `GateSkip attention`, `GateSkip MLP/MoE` or `FlexiDepth`.
    pub kind: &'static str,
    /// Layer index.
    pub layer: usize,
    /// Share of tokens that still went through it.
    pub kept: f64,
    /// First step of the unbroken stretch of collapsed steps that reaches the
    /// step it was found at.
    pub since_step: u64,
}

impl std::fmt::Display for Collapse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} layer {} is skipped by {:.1}% of tokens (kept {:.1}%) since step {}",
            self.kind,
            self.layer,
            100.0 * (1.0 - self.kept),
            100.0 * self.kept,
            self.since_step
        )
    }
}

/// The (kind, layer, kept) of every collapsed branch or layer in one step.
pub fn collapsed_parts(m: &StepMetrics) -> Vec<(&'static str, usize, f64)> {
    let mut out = Vec::new();
    for g in &m.gate_skip {
        if g.attn_kept < COLLAPSE_KEPT {
            out.push(("GateSkip attention", g.layer, g.attn_kept));
        }
        if g.mlp_kept < COLLAPSE_KEPT {
            out.push(("GateSkip MLP/MoE", g.layer, g.mlp_kept));
        }
    }
    if let Some(fd) = &m.flexi_depth {
        for &(layer, kept) in &fd.kept {
            if kept < COLLAPSE_KEPT {
                out.push(("FlexiDepth", layer, kept));
            }
        }
    }
    out
}

/// The warning when the last [`EVAL_RISE_WARN`] evaluations each rose over the
/// one before (`evals` in step order).
pub fn eval_rise_warning(evals: &[(u64, f64)]) -> Option<String> {
    let n = EVAL_RISE_WARN;
    if evals.len() < n + 1 {
        return None;
    }
    let tail = &evals[evals.len() - n - 1..];
    let rising = tail.windows(2).all(|w| w[1].1 > w[0].1);
    rising.then(|| {
        let ((s0, l0), (s1, l1)) = (tail[0], tail[n]);
        format!(
            "held-out loss rose {n} evaluations in a row: {l0:.4} at step {s0} -> {l1:.4} at \
             step {s1} (overfitting or a learning rate too high?)"
        )
    })
}

/// The whole run, see the module doc.
#[derive(Debug, Clone, PartialEq)]
pub struct RunTotals {
    /// Segments (process starts: fresh + resumes).
    pub segments: usize,
    /// Distinct steps logged.
    pub steps: usize,
    /// Last step logged.
    pub last_step: u64,
    /// Tokens of all distinct steps.
    pub tokens_seen: u64,
    /// (step, loss) of the first and of the last step.
    pub first_loss: Option<(u64, f64)>,
    /// (step, loss) of the last step.
    pub last_loss: Option<(u64, f64)>,
    /// (step, held-out loss) of the lowest evaluation.
    pub best_eval: Option<(u64, f64)>,
    /// (step, held-out loss) of the last evaluation.
    pub last_eval: Option<(u64, f64)>,
    /// Learning rate of the last step, and Muon's if in use.
    pub final_lr: Option<(f64, Option<f64>)>,
    /// Steps the NaN/Inf guard skipped.
    pub skipped_steps: usize,
    /// Warnings (eval rising, collapsed layers at the last step).
    pub warnings: Vec<String>,
    /// Config keys resumes changed: "train.steps 40 -> 80 at step 40".
    pub config_changes: Vec<String>,
}

impl RunTotals {
    /// Totals of the records of one `metrics.jsonl`.
    pub fn from_records(records: &[MetricsRecord]) -> RunTotals {
        let mut steps: BTreeMap<u64, &StepMetrics> = BTreeMap::new();
        let mut evals: BTreeMap<u64, &EvalMetrics> = BTreeMap::new();
        let mut segments = 0;
        let mut changes = Vec::new();
        for r in records {
            match r {
                MetricsRecord::Run(_) => segments += 1,
                MetricsRecord::Step(m) => {
                    steps.insert(m.step, m);
                }
                MetricsRecord::Eval(e) => {
                    evals.insert(e.step, e);
                }
                MetricsRecord::ConfigChange(c) => changes.push(format!(
                    "{} {} -> {} at step {}",
                    c.key, c.old, c.new, c.step
                )),
                MetricsRecord::Goodput(_) | MetricsRecord::Sample(_) => {}
            }
        }
        let evals: Vec<(u64, f64)> = evals.values().map(|e| (e.step, e.loss)).collect();
        let best_eval = evals
            .iter()
            .copied()
            .filter(|(_, l)| l.is_finite())
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let last = steps.values().next_back();
        let mut warnings: Vec<String> = eval_rise_warning(&evals).into_iter().collect();
        warnings.extend(
            collapses_at_end(&steps.values().copied().collect::<Vec<_>>())
                .iter()
                .map(|c| c.to_string()),
        );
        RunTotals {
            segments,
            steps: steps.len(),
            last_step: last.map_or(0, |m| m.step),
            tokens_seen: steps.values().map(|m| m.tokens).sum(),
            first_loss: steps.values().next().map(|m| (m.step, m.loss.total)),
            last_loss: last.map(|m| (m.step, m.loss.total)),
            best_eval,
            last_eval: evals.last().copied(),
            final_lr: last.map(|m| (m.lr, m.muon_lr)),
            skipped_steps: steps.values().filter(|m| m.skipped).count(),
            warnings,
            config_changes: changes,
        }
    }
}

/// The parts collapsed at the last step, each with the step its collapse began.
pub fn collapses_at_end(steps: &[&StepMetrics]) -> Vec<Collapse> {
    let Some(last) = steps.last() else {
        return Vec::new();
    };
    collapsed_parts(last)
        .into_iter()
        .map(|(kind, layer, kept)| {
            let since_step = steps
                .iter()
                .rev()
                .take_while(|m| {
                    collapsed_parts(m)
                        .iter()
                        .any(|&(k, l, _)| k == kind && l == layer)
                })
                .last()
                .map_or(last.step, |m| m.step);
            Collapse {
                kind,
                layer,
                kept,
                since_step,
            }
        })
        .collect()
}

impl std::fmt::Display for RunTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "whole run  {} steps in {} segment(s), {} tokens seen",
            self.steps, self.segments, self.tokens_seen
        )?;
        if let (Some((s0, l0)), Some((s1, l1))) = (self.first_loss, self.last_loss) {
            writeln!(f, "loss       {l0:.4} (step {s0}) -> {l1:.4} (step {s1})")?;
        }
        if let Some((s, l)) = self.best_eval {
            writeln!(f, "best eval  {l:.4} (step {s})")?;
        }
        if let Some((s, l)) = self.last_eval {
            writeln!(f, "last eval  {l:.4} (step {s})")?;
        }
        if let Some((lr, muon)) = self.final_lr {
            match muon {
                Some(m) => writeln!(f, "final lr   {lr:.3e} (muon {m:.3e})")?,
                None => writeln!(f, "final lr   {lr:.3e}")?,
            }
        }
        if self.skipped_steps > 0 {
            writeln!(f, "skipped    {} non-finite steps", self.skipped_steps)?;
        }
        for c in &self.config_changes {
            writeln!(f, "changed    {c}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning    {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{FlexiDepthStats, GateSkipStats, LossParts, RunInfo};

    fn step(step: u64, loss: f64, fd_kept: f64) -> MetricsRecord {
        MetricsRecord::Step(StepMetrics {
            step,
            loss: LossParts {
                total: loss,
                ..Default::default()
            },
            lr: 1e-3 / step as f64,
            tokens: 100,
            gate_skip: vec![GateSkipStats {
                layer: 0,
                attn_kept: 0.9,
                mlp_kept: 0.5,
            }],
            flexi_depth: Some(FlexiDepthStats {
                mean_layers_used: 3.0,
                num_layers: 4,
                kept: vec![(2, 0.8), (3, fd_kept)],
            }),
            ..Default::default()
        })
    }

    fn eval(step: u64, loss: f64) -> MetricsRecord {
        MetricsRecord::Eval(EvalMetrics {
            step,
            loss,
            ..Default::default()
        })
    }

    fn run() -> MetricsRecord {
        MetricsRecord::Run(RunInfo::default())
    }

    #[test]
    fn totals_cover_every_segment_and_count_a_relogged_step_once() {
        // Segment 1 logs steps 1-4 but its last checkpoint was step 3; the
        // resumed segment 2 logs steps 4-6 again from there.
        let records = vec![
            run(),
            step(1, 5.0, 0.5),
            step(2, 4.0, 0.5),
            eval(2, 4.5),
            step(3, 3.0, 0.5),
            step(4, 9.0, 0.5),
            run(),
            step(4, 2.5, 0.5),
            eval(4, 3.5),
            step(5, 2.0, 0.5),
            step(6, 1.5, 0.5),
            eval(6, 3.7),
        ];
        let t = RunTotals::from_records(&records);
        assert_eq!(t.segments, 2);
        assert_eq!(t.steps, 6);
        assert_eq!(t.tokens_seen, 600);
        assert_eq!(t.first_loss, Some((1, 5.0)));
        assert_eq!(t.last_loss, Some((6, 1.5)));
        assert_eq!(t.best_eval, Some((4, 3.5)));
        assert_eq!(t.last_eval, Some((6, 3.7)));
        assert_eq!(t.final_lr, Some((1e-3 / 6.0, None)));
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn three_rising_evals_warn_two_do_not() {
        let e = |v: &[f64]| -> Vec<(u64, f64)> {
            v.iter()
                .enumerate()
                .map(|(i, &l)| (10 * i as u64, l))
                .collect()
        };
        assert!(eval_rise_warning(&e(&[3.0, 2.0, 2.1, 2.2])).is_none());
        let w = eval_rise_warning(&e(&[3.0, 2.0, 2.1, 2.2, 2.3])).unwrap();
        assert!(w.contains("2.0000 at step 10 -> 2.3000 at step 40"), "{w}");
        // Equal is not rising.
        assert!(eval_rise_warning(&e(&[2.0, 2.1, 2.1, 2.2])).is_none());
    }

    #[test]
    fn a_layer_skipped_by_more_than_95_percent_warns_with_its_start() {
        let records = vec![
            run(),
            step(1, 5.0, 0.5),
            step(2, 4.0, 0.04),
            step(3, 3.0, 0.2),
            step(4, 3.0, 0.0),
            step(5, 3.0, 0.01),
        ];
        let t = RunTotals::from_records(&records);
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert_eq!(
            t.warnings[0],
            "FlexiDepth layer 3 is skipped by 99.0% of tokens (kept 1.0%) since step 4"
        );
        // 5 % kept exactly is not a collapse (the rule is "more than 95 % skipped").
        let edge = RunTotals::from_records(&[run(), step(1, 5.0, 0.05)]);
        assert!(edge.warnings.is_empty());
    }

    #[test]
    fn gate_skip_branches_are_checked_separately() {
        let MetricsRecord::Step(mut m) = step(1, 1.0, 0.5) else {
            unreachable!()
        };
        m.gate_skip[0].mlp_kept = 0.01;
        assert_eq!(collapsed_parts(&m), vec![("GateSkip MLP/MoE", 0, 0.01)]);
    }
}
