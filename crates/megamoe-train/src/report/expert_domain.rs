//! Expert load by data domain (`expert_domain.svg`), the specialisation score
//! `I(domain; expert)` at the start and the end of a run, and the shared-expert gate.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use super::draw_heatmap;
use crate::error::{Error, Result};
use crate::metrics::{domain_specialisation, DomainSpecialisation, StepMetrics};

/// Specialisation of one MoE layer over the first and the last steps of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpecialisation {
    /// Layer index.
    pub layer: usize,
    /// First and last step of the start window.
    pub start_steps: (u64, u64),
    /// Over the start window.
    pub start: DomainSpecialisation,
    /// First and last step of the end window.
    pub end_steps: (u64, u64),
    /// Over the end window.
    pub end: DomainSpecialisation,
}

/// Mean shared-expert gate of one MoE layer at the start and the end of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedGateSummary {
    /// Layer index.
    pub layer: usize,
    /// Mean over the start window's steps.
    pub start: f64,
    /// Mean over the end window's steps.
    pub end: f64,
}

/// Layer → (domains, E) kept assignments summed over `steps`.
fn sum_by_domain(steps: &[&StepMetrics]) -> BTreeMap<usize, Vec<Vec<u64>>> {
    let mut layers: BTreeMap<usize, Vec<Vec<u64>>> = BTreeMap::new();
    for s in steps {
        for l in &s.moe {
            if l.tokens_per_expert_by_domain.is_empty() {
                continue;
            }
            let acc = layers.entry(l.layer).or_default();
            for (d, row) in l.tokens_per_expert_by_domain.iter().enumerate() {
                if acc.len() <= d {
                    acc.resize(d + 1, Vec::new());
                }
                if acc[d].len() < row.len() {
                    acc[d].resize(row.len(), 0);
                }
                for (a, &c) in acc[d].iter_mut().zip(row) {
                    *a += c;
                }
            }
        }
    }
    layers
}

fn window_steps(steps: &[&StepMetrics]) -> (u64, u64) {
    (
        steps.first().map_or(0, |s| s.step),
        steps.last().map_or(0, |s| s.step),
    )
}

/// Per MoE layer with by-domain counts: the score over the first `window` steps and
/// over the last `window` steps (the windows overlap on short runs).
pub(super) fn specialisation_summary(
    steps: &[&StepMetrics],
    window: usize,
) -> Vec<LayerSpecialisation> {
    let head = &steps[..window.min(steps.len())];
    let tail = &steps[steps.len().saturating_sub(window)..];
    let start = sum_by_domain(head);
    let end = sum_by_domain(tail);
    start
        .iter()
        .filter_map(|(&layer, counts)| {
            Some(LayerSpecialisation {
                layer,
                start_steps: window_steps(head),
                start: domain_specialisation(counts)?,
                end_steps: window_steps(tail),
                end: domain_specialisation(end.get(&layer)?)?,
            })
        })
        .collect()
}

/// Per MoE layer with a shared-expert gate: its mean over the first and the last
/// `window` steps.
pub(super) fn shared_gate_summary(steps: &[&StepMetrics], window: usize) -> Vec<SharedGateSummary> {
    let mean = |steps: &[&StepMetrics]| {
        let mut acc: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
        for s in steps {
            for l in &s.moe {
                if let Some(g) = l.shared_gate_mean.filter(|g| g.is_finite()) {
                    let e = acc.entry(l.layer).or_default();
                    e.0 += g;
                    e.1 += 1;
                }
            }
        }
        acc.into_iter()
            .map(|(l, (sum, n))| (l, sum / n as f64))
            .collect::<BTreeMap<_, _>>()
    };
    let start = mean(&steps[..window.min(steps.len())]);
    let end = mean(&steps[steps.len().saturating_sub(window)..]);
    start
        .iter()
        .filter_map(|(&layer, &s)| {
            Some(SharedGateSummary {
                layer,
                start: s,
                end: *end.get(&layer)?,
            })
        })
        .collect()
}

/// One heatmap panel per MoE layer: domain × expert share of each domain's kept
/// assignments over `tail`, the caption giving `I(domain; expert)`.
pub(super) fn plot_expert_domain(
    path: &Path,
    tail: &[&StepMetrics],
    domains: &[String],
) -> Result<()> {
    let layers = sum_by_domain(tail);
    let panel_h = 100 + 32 * layers.values().map(Vec::len).max().unwrap_or(1) as u32;
    let root =
        SVGBackend::new(path, (960, panel_h * layers.len().max(1) as u32)).into_drawing_area();
    draw!(path, root.fill(&WHITE));
    let panels = root.split_evenly((layers.len().max(1), 1));
    for ((layer, rows), panel) in layers.iter().zip(&panels) {
        // Each domain row sums to 1: where that domain's kept assignments went.
        let shares: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                let sum: u64 = r.iter().sum();
                r.iter()
                    .map(|&c| if sum > 0 { c as f64 / sum as f64 } else { 0.0 })
                    .collect()
            })
            .collect();
        let labels: Vec<String> = (0..rows.len())
            .map(|d| {
                domains
                    .get(d)
                    .cloned()
                    .unwrap_or_else(|| format!("domain {d}"))
            })
            .collect();
        let vmax = shares.iter().flatten().copied().fold(0.0, f64::max);
        let score = match domain_specialisation(rows) {
            Some(s) => format!(
                "; I(domain; expert) = {:.3} bits ({:.0}% of H(domain))",
                s.mutual_information_bits,
                100.0 * s.normalised()
            ),
            None => String::new(),
        };
        let caption = format!(
            "layer {layer}: share of each domain's tokens per expert, last {} steps{score}",
            tail.len()
        );
        draw_heatmap(
            path,
            panel,
            &caption,
            "routed expert",
            "",
            &labels,
            &shares,
            vmax,
        )?;
    }
    draw!(path, root.present());
    Ok(())
}
