//! `megamoe report RUN_DIR`: SVG plots and a text summary from `metrics.jsonl`.
//!
//! Output, all under `<run_dir>/report/`:
//! - `loss.svg` — top: total and LM loss (plus MTP when present) and held-out eval
//!   loss per step; bottom: the small auxiliary terms (aux, z, skip), on their own
//!   scale so they are not flattened against the LM loss;
//! - `expert_load.svg` — layer × routed-expert heatmap of load relative to uniform
//!   (1.0 = the expert got its fair share), averaged over the last
//!   [`HEATMAP_STEPS`] steps (only when MoE stats exist);
//! - `expert_domain.svg` — per MoE layer, domain × expert share of each domain's
//!   kept assignments over the last [`HEATMAP_STEPS`] steps, captioned with the
//!   specialisation score `I(domain; expert)` (only when by-domain counts exist;
//!   `report.txt` gives the score over the first and the last [`HEATMAP_STEPS`] steps);
//! - `skip.svg` — GateSkip kept fraction per layer and branch, and FlexiDepth kept
//!   fraction per layer, averaged over the last [`HEATMAP_STEPS`] steps (only when
//!   either is enabled);
//! - `report.txt` — the text summary [`ReportSummary`] displays.
//!
//! Plots use plotters' SVG backend with its built-in size estimate for text (no
//! font files needed); viewers render the `<text>` elements with a system sans-serif.

use std::fmt;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::goodput::GoodputTotals;
use crate::metrics::{
    latest_evals, latest_steps, read_metrics, MetricsRecord, StepMetrics, METRICS_FILE,
};
use crate::run_totals::{collapses_at_end, RunTotals};

/// Directory (inside the run directory) the report is written to.
pub const REPORT_DIR: &str = "report";
/// Steps averaged for the heatmaps and per-layer bars.
pub const HEATMAP_STEPS: usize = 10;

/// What the report found; `Display` gives the text of `report.txt`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSummary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// Distinct steps logged.
    pub steps: usize,
    /// (step, total loss) of the first logged step.
    pub first_loss: (u64, f64),
    /// (step, total loss) of the last logged step.
    pub last_loss: (u64, f64),
    /// (step, total loss) of the lowest finite loss.
    pub min_loss: (u64, f64),
    /// (step, held-out loss) of the last eval, if any.
    pub last_eval: Option<(u64, f64)>,
    /// Steps skipped by the NaN guard.
    pub skipped_steps: usize,
    /// Total tokens over total step time, excluding the first (warm-up) step when
    /// there are several.
    pub tokens_per_s: f64,
    /// Goodput totals of the last goodput record, if any.
    pub goodput: Option<GoodputTotals>,
    /// Per MoE layer with by-domain counts: `I(domain; expert)` over the first and the
    /// last [`HEATMAP_STEPS`] steps.
    pub specialisation: Vec<LayerSpecialisation>,
    /// Per MoE layer with a shared-expert gate: its mean over the first and the last
    /// [`HEATMAP_STEPS`] steps.
    pub shared_gate: Vec<SharedGateSummary>,
    /// The whole run over every segment: tokens seen, best and last eval, final lr,
    /// warnings.
    pub totals: RunTotals,
    /// Files written (plots and `report.txt`).
    pub files: Vec<PathBuf>,
}

impl fmt::Display for ReportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "run        {}", self.run_dir.display())?;
        writeln!(
            f,
            "steps      {} logged (last step {})",
            self.steps, self.last_loss.0
        )?;
        writeln!(
            f,
            "loss       first {:.4} (step {})",
            self.first_loss.1, self.first_loss.0
        )?;
        writeln!(
            f,
            "           last  {:.4} (step {})",
            self.last_loss.1, self.last_loss.0
        )?;
        writeln!(
            f,
            "           min   {:.4} (step {})",
            self.min_loss.1, self.min_loss.0
        )?;
        if self.first_loss.1 > 0.0 {
            let ratio = 100.0 * self.last_loss.1 / self.first_loss.1;
            writeln!(f, "           last/first {ratio:.1}%")?;
        }
        match self.last_eval {
            Some((step, loss)) => writeln!(f, "eval       {loss:.4} (step {step})")?,
            None => writeln!(f, "eval       none")?,
        }
        if self.skipped_steps > 0 {
            writeln!(
                f,
                "skipped    {} steps (non-finite loss or gradient)",
                self.skipped_steps
            )?;
        }
        writeln!(
            f,
            "tokens     {} seen in {} segment(s)",
            self.totals.tokens_seen, self.totals.segments
        )?;
        if let Some((step, loss)) = self.totals.best_eval {
            writeln!(f, "best eval  {loss:.4} (step {step})")?;
        }
        if let Some((lr, muon)) = self.totals.final_lr {
            match muon {
                Some(m) => writeln!(f, "final lr   {lr:.3e} (muon {m:.3e})")?,
                None => writeln!(f, "final lr   {lr:.3e}")?,
            }
        }
        for w in &self.totals.warnings {
            writeln!(f, "warning    {w}")?;
        }
        writeln!(f, "throughput {:.0} tok/s", self.tokens_per_s)?;
        match &self.goodput {
            Some(g) => writeln!(f, "time       {g}")?,
            None => writeln!(f, "time       no goodput record")?,
        }
        for s in &self.specialisation {
            writeln!(
                f,
                "experts    layer {}: I(domain; expert) {:.3} bits ({:.0}% of H(domain)) \
                 steps {}-{} -> {:.3} bits ({:.0}%) steps {}-{}",
                s.layer,
                s.start.mutual_information_bits,
                100.0 * s.start.normalised(),
                s.start_steps.0,
                s.start_steps.1,
                s.end.mutual_information_bits,
                100.0 * s.end.normalised(),
                s.end_steps.0,
                s.end_steps.1,
            )?;
        }
        for g in &self.shared_gate {
            writeln!(
                f,
                "shared     layer {}: mean gate {:.3} (first {HEATMAP_STEPS} steps) -> {:.3} (last {HEATMAP_STEPS})",
                g.layer, g.start, g.end
            )?;
        }
        for file in &self.files {
            writeln!(f, "wrote      {}", file.display())?;
        }
        Ok(())
    }
}

/// Reads `<run_dir>/metrics.jsonl`, writes the plots and `report.txt` into
/// `<run_dir>/report/`, and returns the summary.
pub fn render_report(run_dir: &Path) -> Result<ReportSummary> {
    let metrics_path = run_dir.join(METRICS_FILE);
    let records = read_metrics(&metrics_path)?;
    let steps = latest_steps(&records);
    if steps.is_empty() {
        return Err(Error::ReportEmpty { path: metrics_path });
    }
    let out_dir = run_dir.join(REPORT_DIR);
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io("create", &out_dir, e))?;

    let mut files = Vec::new();
    let path = out_dir.join("loss.svg");
    plot_loss(&path, &steps, &records)?;
    files.push(path);
    let tail = &steps[steps.len().saturating_sub(HEATMAP_STEPS)..];
    if tail.iter().any(|s| !s.moe.is_empty()) {
        let path = out_dir.join("expert_load.svg");
        plot_expert_load(&path, tail)?;
        files.push(path);
    }
    if tail.iter().any(|s| {
        s.moe
            .iter()
            .any(|l| !l.tokens_per_expert_by_domain.is_empty())
    }) {
        let path = out_dir.join("expert_domain.svg");
        plot_expert_domain(&path, tail, &domain_names(&records))?;
        files.push(path);
    }
    if tail
        .iter()
        .any(|s| !s.gate_skip.is_empty() || s.flexi_depth.is_some())
    {
        let path = out_dir.join("skip.svg");
        plot_skip(&path, tail)?;
        files.push(path);
    }
    let text_path = out_dir.join("report.txt");
    files.push(text_path.clone());

    let summary = summarise(run_dir, &steps, &records, files);
    std::fs::write(&text_path, summary.to_string())
        .map_err(|e| Error::io("write", &text_path, e))?;
    Ok(summary)
}

fn summarise(
    run_dir: &Path,
    steps: &[&StepMetrics],
    records: &[MetricsRecord],
    files: Vec<PathBuf>,
) -> ReportSummary {
    let at = |s: &StepMetrics| (s.step, s.loss.total);
    let min_loss = steps
        .iter()
        .filter(|s| s.loss.total.is_finite())
        .map(|s| at(s))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((steps[0].step, f64::NAN));
    let timed = if steps.len() > 1 { &steps[1..] } else { steps };
    let tokens: u64 = timed.iter().map(|s| s.tokens).sum();
    let seconds: f64 = timed.iter().map(|s| s.step_time_s).sum();
    let goodput = records.iter().rev().find_map(|r| match r {
        MetricsRecord::Goodput(g) => Some(g.totals),
        _ => None,
    });
    ReportSummary {
        run_dir: run_dir.to_path_buf(),
        steps: steps.len(),
        first_loss: at(steps[0]),
        last_loss: at(steps[steps.len() - 1]),
        min_loss,
        last_eval: latest_evals(records).last().map(|e| (e.step, e.loss)),
        skipped_steps: steps.iter().filter(|s| s.skipped).count(),
        tokens_per_s: if seconds > 0.0 {
            tokens as f64 / seconds
        } else {
            0.0
        },
        goodput,
        specialisation: specialisation_summary(steps, HEATMAP_STEPS),
        shared_gate: shared_gate_summary(steps, HEATMAP_STEPS),
        totals: RunTotals::from_records(records),
        files,
    }
}

fn domain_names(records: &[MetricsRecord]) -> Vec<String> {
    records
        .iter()
        .rev()
        .find_map(|r| match r {
            MetricsRecord::Run(info) if !info.domains.is_empty() => Some(info.domains.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// Converts plotters' error types into ours (the `?` glue for drawing calls).
macro_rules! draw {
    ($path:expr, $e:expr) => {
        $e.map_err(|e| Error::Plot {
            path: $path.to_path_buf(),
            reason: e.to_string(),
        })?
    };
}

mod expert_domain;
use expert_domain::{plot_expert_domain, shared_gate_summary, specialisation_summary};
pub use expert_domain::{LayerSpecialisation, SharedGateSummary};

/// (min, max) of finite values, widened when empty or flat so the axis is valid.
fn finite_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
    (lo - pad, hi + pad)
}

const SERIES_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Series<'a> = (&'a str, Vec<(f64, f64)>);

fn draw_lines(
    path: &Path,
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    series: &[Series<'_>],
    points: Option<&Series<'_>>,
) -> Result<()> {
    let all = series.iter().chain(points).flat_map(|(_, v)| v.iter());
    let (x_lo, x_hi) = finite_range(all.clone().map(|p| p.0));
    let (y_lo, y_hi) = finite_range(all.map(|p| p.1));
    let mut chart = draw!(
        path,
        ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
    );
    draw!(
        path,
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats/token)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
    );
    for (i, (name, values)) in series.iter().enumerate() {
        let color = SERIES_COLORS[i % SERIES_COLORS.len()];
        let finite = values.iter().copied().filter(|p| p.1.is_finite());
        draw!(
            path,
            chart.draw_series(LineSeries::new(finite, color.stroke_width(2)))
        )
        .label(*name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if let Some((name, values)) = points {
        let color = BLACK;
        let finite = values.iter().copied().filter(|p| p.1.is_finite());
        draw!(
            path,
            chart.draw_series(LineSeries::new(finite.clone(), color.stroke_width(1)))
        );
        draw!(
            path,
            chart.draw_series(finite.map(|p| Circle::new(p, 4, color.filled())))
        )
        .label(*name)
        .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    draw!(
        path,
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
    );
    Ok(())
}

fn plot_loss(path: &Path, steps: &[&StepMetrics], records: &[MetricsRecord]) -> Result<()> {
    let series = |f: fn(&StepMetrics) -> f64| -> Vec<(f64, f64)> {
        steps.iter().map(|s| (s.step as f64, f(s))).collect()
    };
    let nonzero = |v: &Vec<(f64, f64)>| v.iter().any(|p| p.1 != 0.0 && p.1.is_finite());
    let mut main: Vec<Series<'_>> = vec![
        ("total", series(|s| s.loss.total)),
        ("lm", series(|s| s.loss.lm)),
    ];
    let mtp = series(|s| s.loss.mtp);
    if nonzero(&mtp) {
        main.push(("mtp", mtp));
    }
    let evals: Vec<(f64, f64)> = latest_evals(records)
        .iter()
        .map(|e| (e.step as f64, e.loss))
        .collect();
    let eval_series = ("eval (held-out)", evals);
    let small: Vec<Series<'_>> = [
        ("aux", series(|s| s.loss.aux)),
        ("z", series(|s| s.loss.z)),
        ("skip", series(|s| s.loss.skip)),
    ]
    .into_iter()
    .filter(|(_, v)| nonzero(v))
    .collect();

    let root =
        SVGBackend::new(path, (960, if small.is_empty() { 480 } else { 800 })).into_drawing_area();
    draw!(path, root.fill(&WHITE));
    let eval_points = (!eval_series.1.is_empty()).then_some(&eval_series);
    if small.is_empty() {
        draw_lines(path, &root, "training loss", &main, eval_points)?;
    } else {
        let (top, bottom) = root.split_vertically(480);
        draw_lines(path, &top, "training loss", &main, eval_points)?;
        draw_lines(path, &bottom, "auxiliary losses (weighted)", &small, None)?;
    }
    draw!(path, root.present());
    Ok(())
}

/// White → dark blue as `t` goes 0 → 1 (clamped); readable in print and for
/// red-green colour blindness.
fn heat_color(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t).round() as u8;
    RGBColor(lerp(247.0, 8.0), lerp(251.0, 48.0), lerp(255.0, 107.0))
}

/// Draws a rows × cols grid of values with row/column labels and the value in each
/// cell; colour scaled to `[0, vmax]`.
#[allow(clippy::too_many_arguments)]
fn draw_heatmap(
    path: &Path,
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    row_labels: &[String],
    values: &[Vec<f64>],
    vmax: f64,
) -> Result<()> {
    let rows = values.len();
    let cols = values.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut chart = draw!(
        path,
        ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(90)
            .build_cartesian_2d(0.0..cols as f64, 0.0..rows.max(1) as f64)
    );
    let labels = row_labels.to_vec();
    draw!(
        path,
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(cols.min(32) * 2 + 1)
            .y_labels(rows.min(32) * 2 + 1)
            .x_label_formatter(&|x| centre_label(*x).map_or(String::new(), |i| i.to_string()))
            .y_label_formatter(&|y| {
                // Row 0 is drawn at the top.
                centre_label(*y)
                    .and_then(|i| labels.get(rows.checked_sub(i + 1)?).cloned())
                    .unwrap_or_default()
            })
            .draw()
    );
    let show_text = rows * cols <= 256;
    for (r, row) in values.iter().enumerate() {
        let y = (rows - 1 - r) as f64;
        for (c, &v) in row.iter().enumerate() {
            let t = if vmax > 0.0 { v / vmax } else { 0.0 };
            let cell = Rectangle::new(
                [(c as f64, y), (c as f64 + 1.0, y + 1.0)],
                heat_color(t).filled(),
            );
            draw!(path, chart.draw_series(std::iter::once(cell)));
            if show_text {
                let color = if t > 0.55 { WHITE } else { BLACK };
                let style = ("sans-serif", 12).into_font().color(&color).pos(
                    plotters::style::text_anchor::Pos::new(
                        plotters::style::text_anchor::HPos::Center,
                        plotters::style::text_anchor::VPos::Center,
                    ),
                );
                let label = Text::new(format!("{v:.2}"), (c as f64 + 0.5, y + 0.5), style);
                draw!(path, chart.draw_series(std::iter::once(label)));
            }
        }
    }
    Ok(())
}

/// `Some(i)` when an axis tick sits at the centre of cell `i` (i + 0.5).
fn centre_label(x: f64) -> Option<usize> {
    let i = (x - 0.5).round();
    ((x - 0.5 - i).abs() < 1e-6 && i >= 0.0).then_some(i as usize)
}

fn plot_expert_load(path: &Path, tail: &[&StepMetrics]) -> Result<()> {
    // Layer index → summed tokens per expert over the tail steps.
    let mut layers: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for s in tail {
        for l in &s.moe {
            let acc = layers.entry(l.layer).or_default();
            if acc.len() < l.tokens_per_expert.len() {
                acc.resize(l.tokens_per_expert.len(), 0.0);
            }
            for (a, &c) in acc.iter_mut().zip(&l.tokens_per_expert) {
                *a += c as f64;
            }
        }
    }
    // Relative load: count / mean count of the layer (1 = uniform).
    let values: Vec<Vec<f64>> = layers
        .values()
        .map(|counts| {
            let mean = counts.iter().sum::<f64>() / counts.len().max(1) as f64;
            counts
                .iter()
                .map(|&c| if mean > 0.0 { c / mean } else { 0.0 })
                .collect()
        })
        .collect();
    let vmax = values.iter().flatten().copied().fold(1.0, f64::max);
    let labels: Vec<String> = layers.keys().map(|l| format!("layer {l}")).collect();
    let height = 120 + 40 * values.len().max(2) as u32;
    let root = SVGBackend::new(path, (960, height)).into_drawing_area();
    draw!(path, root.fill(&WHITE));
    let caption = format!(
        "expert load relative to uniform (1.00 = fair share), last {} steps; dark = {vmax:.2}",
        tail.len()
    );
    draw_heatmap(
        path,
        &root,
        &caption,
        "routed expert",
        "",
        &labels,
        &values,
        vmax,
    )?;
    draw!(path, root.present());
    Ok(())
}

fn plot_skip(path: &Path, tail: &[&StepMetrics]) -> Result<()> {
    // Mean over the tail of each (layer, kind) kept fraction.
    let mut sums: std::collections::BTreeMap<(usize, usize), (f64, usize)> = Default::default();
    for s in tail {
        for g in &s.gate_skip {
            for (kind, v) in [(0, g.attn_kept), (1, g.mlp_kept)] {
                let e = sums.entry((g.layer, kind)).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
        if let Some(fd) = &s.flexi_depth {
            for &(layer, v) in &fd.kept {
                let e = sums.entry((layer, 2)).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    let kinds = ["GateSkip attention", "GateSkip MLP/MoE", "FlexiDepth layer"];
    // Parts skipped by > 95 % of tokens at the last step, marked on their bar.
    let collapsed: Vec<(usize, usize)> = collapses_at_end(tail)
        .iter()
        .map(|c| {
            let kind = match c.kind {
                "GateSkip attention" => 0,
                "GateSkip MLP/MoE" => 1,
                _ => 2,
            };
            (c.layer, kind)
        })
        .collect();
    let layers: std::collections::BTreeSet<usize> = sums.keys().map(|k| k.0).collect();
    let max_layer = layers.iter().copied().max().unwrap_or(0);
    let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
    draw!(path, root.fill(&WHITE));
    let mut chart = draw!(
        path,
        ChartBuilder::on(&root)
            .caption(
                format!(
                    "kept fraction per layer (mean of last {} steps){}",
                    tail.len(),
                    if collapsed.is_empty() {
                        ""
                    } else {
                        "; red x: skipped by > 95 % of tokens at the last step"
                    }
                ),
                ("sans-serif", 20)
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..max_layer as f64 + 0.5, 0.0..1.3)
    );
    draw!(
        path,
        chart
            .configure_mesh()
            .x_desc("layer")
            .y_desc("fraction of tokens kept")
            .x_labels(max_layer + 1)
            .x_label_formatter(&|x| {
                let r = x.round();
                if (x - r).abs() < 1e-6 && r >= 0.0 {
                    format!("{r:.0}")
                } else {
                    String::new()
                }
            })
            .draw()
    );
    let width = 0.8 / kinds.len() as f64;
    for (k, name) in kinds.iter().enumerate() {
        let color = SERIES_COLORS[k];
        let bars: Vec<Rectangle<(f64, f64)>> = sums
            .iter()
            .filter(|((_, kind), _)| *kind == k)
            .map(|(&(layer, _), &(sum, n))| {
                let x0 = layer as f64 - 0.4 + k as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width, sum / n as f64)], color.filled())
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        draw!(path, chart.draw_series(bars))
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    let marks: Vec<Text<'_, (f64, f64), String>> = collapsed
        .iter()
        .map(|&(layer, k)| {
            let x = layer as f64 - 0.4 + k as f64 * width;
            Text::new(
                "x skipped".to_string(),
                (x, 0.1),
                ("sans-serif", 13).into_font().color(&RED),
            )
        })
        .collect();
    if !marks.is_empty() {
        draw!(path, chart.draw_series(marks));
    }
    draw!(
        path,
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
    );
    draw!(path, root.present());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{
        EvalMetrics, FlexiDepthStats, GateSkipStats, GoodputRecord, LossParts, MetricsWriter,
        MoeLayerStats, RunInfo,
    };
    use crate::test_dir::TestDir;

    fn step(n: u64, total: f64) -> StepMetrics {
        let mut moe = MoeLayerStats::from_counts(1, vec![n, 10, 20, 30], 0, 0, 30, 2);
        moe.tokens_per_expert_by_domain = vec![vec![n, 0, 0, 0], vec![0, 10, 20, 30]];
        moe.shared_gate_mean = Some(0.25 + n as f64 / 100.0);
        StepMetrics {
            step: n,
            loss: LossParts {
                total,
                lm: total - 0.02,
                aux: 0.015,
                z: 0.005,
                ..Default::default()
            },
            tokens: 1000,
            step_time_s: if n == 1 { 5.0 } else { 0.5 },
            moe: vec![moe],
            gate_skip: vec![GateSkipStats {
                layer: 0,
                attn_kept: 0.9,
                mlp_kept: 0.7,
            }],
            flexi_depth: Some(FlexiDepthStats {
                mean_layers_used: 1.5,
                num_layers: 2,
                kept: vec![(1, 0.5)],
            }),
            ..Default::default()
        }
    }

    /// Trimmed contents of every `<text ...>...</text>` element.
    fn svg_texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| {
                let body = &t[t.find('>')? + 1..];
                Some(body[..body.find("</text>")?].trim().to_string())
            })
            .collect()
    }

    fn write_run(dir: &Path, records: &[MetricsRecord]) {
        let mut w = MetricsWriter::open(&dir.join(METRICS_FILE)).unwrap();
        for r in records {
            w.write(r).unwrap();
        }
    }

    #[test]
    fn report_summarises_and_writes_svg_plots_with_text() {
        let dir = TestDir::new("report_full");
        let mut records = vec![MetricsRecord::Run(RunInfo {
            domains: vec!["arithmetic".into(), "copy".into()],
            ..Default::default()
        })];
        for (n, loss) in [(1, 5.5), (2, 4.0), (3, 3.0), (4, 3.2)] {
            records.push(MetricsRecord::Step(step(n, loss)));
        }
        records.push(MetricsRecord::Eval(EvalMetrics {
            step: 4,
            loss: 3.4,
            tokens: 100,
            ..Default::default()
        }));
        records.push(MetricsRecord::Goodput(GoodputRecord {
            step: 4,
            totals: GoodputTotals {
                wall_s: 10.0,
                step_s: 6.5,
                ..Default::default()
            },
        }));
        write_run(dir.path(), &records);
        let s = render_report(dir.path()).unwrap();
        assert_eq!(s.steps, 4);
        assert_eq!(s.first_loss, (1, 5.5));
        assert_eq!(s.last_loss, (4, 3.2));
        assert_eq!(s.min_loss, (3, 3.0));
        assert_eq!(s.last_eval, Some((4, 3.4)));
        // Steps 2-4: 3000 tokens in 1.5 s (step 1 is warm-up and excluded).
        assert!((s.tokens_per_s - 2000.0).abs() < 1e-9);
        assert_eq!(s.goodput.unwrap().goodput(), 0.65);
        let names: Vec<String> = s
            .files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "loss.svg",
                "expert_load.svg",
                "expert_domain.svg",
                "skip.svg",
                "report.txt"
            ]
        );
        for f in &s.files[..4] {
            let svg = std::fs::read_to_string(f).unwrap();
            assert!(svg.starts_with("<svg"), "{}", f.display());
            assert!(svg.contains("<text"), "{} has no text", f.display());
        }
        let loss_texts = svg_texts(&std::fs::read_to_string(&s.files[0]).unwrap());
        for label in ["total", "lm", "eval (held-out)", "aux", "z"] {
            assert!(
                loss_texts.iter().any(|t| t == label),
                "{label} not in {loss_texts:?}"
            );
        }
        // MTP and skip losses are all zero here, so they get no series.
        assert!(
            !loss_texts.iter().any(|t| t == "mtp" || t == "skip"),
            "{loss_texts:?}"
        );
        let domain_texts = svg_texts(&std::fs::read_to_string(&s.files[2]).unwrap());
        assert!(
            domain_texts.iter().any(|t| t == "arithmetic"),
            "{domain_texts:?}"
        );
        // Domain 0 of step n sends all n slots to expert 0: share 1.00.
        assert!(domain_texts.iter().any(|t| t == "1.00"), "{domain_texts:?}");
        let text = std::fs::read_to_string(&s.files[4]).unwrap();
        assert_eq!(text, s.to_string());
        assert!(text.contains("min   3.0000 (step 3)"), "{text}");
        assert!(text.contains("goodput 65.0%"), "{text}");
        // Domain 0 only ever uses expert 0 and expert 0 only domain 0: the expert names
        // the domain, I = H(domain). Over steps 1-4 domain 0 has 1+2+3+4 = 10 of 250
        // assignments: H = −(0.04 log2 0.04 + 0.96 log2 0.96) = 0.242292 bits.
        let sp = &s.specialisation[0];
        assert_eq!(
            (sp.layer, sp.start_steps, sp.end_steps),
            (1, (1, 4), (1, 4))
        );
        assert!(
            (sp.end.mutual_information_bits - 0.242_292).abs() < 1e-6,
            "{sp:?}"
        );
        assert!((sp.end.normalised() - 1.0).abs() < 1e-12, "{sp:?}");
        assert!(
            text.contains("experts    layer 1: I(domain; expert) 0.242 bits (100% of H(domain))"),
            "{text}"
        );
        // Gate means 0.26, 0.27, 0.28, 0.29 → 0.275 over both (overlapping) windows.
        assert!((s.shared_gate[0].start - 0.275).abs() < 1e-12);
        assert!(
            text.contains("shared     layer 1: mean gate 0.275"),
            "{text}"
        );
    }

    #[test]
    fn dense_run_without_moe_or_skip_writes_only_loss_plot() {
        let dir = TestDir::new("report_dense");
        let mut a = step(1, 2.0);
        a.moe.clear();
        a.gate_skip.clear();
        a.flexi_depth = None;
        let mut b = a.clone();
        b.step = 2;
        b.loss.total = f64::NAN;
        b.skipped = true;
        write_run(
            dir.path(),
            &[MetricsRecord::Step(a), MetricsRecord::Step(b)],
        );
        let s = render_report(dir.path()).unwrap();
        assert_eq!(s.files.len(), 2);
        assert_eq!(s.skipped_steps, 1);
        assert_eq!(s.min_loss, (1, 2.0));
    }

    #[test]
    fn run_without_steps_is_report_empty_error() {
        let dir = TestDir::new("report_empty");
        write_run(dir.path(), &[MetricsRecord::Run(RunInfo::default())]);
        let err = render_report(dir.path()).unwrap_err();
        assert!(matches!(err, Error::ReportEmpty { .. }), "{err}");
        let err = render_report(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("metrics.jsonl"), "{err}");
    }

    #[test]
    fn heat_color_runs_from_white_to_dark_blue() {
        assert_eq!(heat_color(0.0), RGBColor(247, 251, 255));
        assert_eq!(heat_color(1.0), RGBColor(8, 48, 107));
        assert_eq!(heat_color(7.0), heat_color(1.0));
    }

    #[test]
    fn centre_label_marks_cell_centres_only() {
        assert_eq!(centre_label(0.5), Some(0));
        assert_eq!(centre_label(3.5), Some(3));
        assert_eq!(centre_label(3.0), None);
        assert_eq!(centre_label(-0.5), None);
    }
}
