//! A hand-written SVG timeline of a simulated schedule: one row per rank,
//! one box per action at its simulated start/end, coloured by kind and
//! labelled with the compute-only text; an OVERLAP_F_B unit is drawn as its
//! forward (top half) over its backward (bottom half) inside one border.

use crate::ir::{Action, Op, OpKind};
use crate::simulate::Simulation;
use std::fmt::Write;

/// Fill colour of one op kind.
pub fn kind_colour(kind: OpKind) -> &'static str {
    match kind {
        OpKind::F => "#5b8fd9",
        OpKind::I => "#6cc070",
        OpKind::W => "#f2c94c",
        OpKind::B => "#e0685c",
        _ => "#bbbbbb",
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn op_label(op: &Op) -> String {
    match op.microbatch {
        Some(mb) => format!("{}{}{}", op.stage, op.kind.name(), mb),
        None => op.to_string(),
    }
}

/// Renders `sim` as an SVG document; `title` is printed above the rows.
pub fn timeline_svg(sim: &Simulation, title: &str) -> String {
    let ranks = sim.timeline.len();
    let (left, top, row_h, gap) = (70.0, 50.0, 34.0, 6.0);
    let span = if sim.makespan > 0.0 {
        sim.makespan
    } else {
        1.0
    };
    // Aim for ~1400 px of plot, but never less than 24 px per cost unit (labels fit).
    let scale = (1400.0 / span).max(24.0);
    let plot_w = span * scale;
    let width = left + plot_w + 20.0;
    let height = top + ranks as f64 * (row_h + gap) + 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    // Time axis ticks.
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]
        .into_iter()
        .find(|st| span / st <= 30.0)
        .unwrap_or(1000.0);
    let axis_y = top + ranks as f64 * (row_h + gap) + 4.0;
    let mut t = 0.0;
    while t <= span + 1e-9 {
        let x = left + t * scale;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{axis_y:.1}" stroke="#e4e4e4"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle" fill="#555">{t}</text>"##,
            axis_y + 12.0
        );
        t += step;
    }
    for (rank, row) in sim.timeline.iter().enumerate() {
        let y = top + rank as f64 * (row_h + gap);
        let _ = writeln!(
            s,
            r#"<text x="8" y="{:.1}" font-size="12">rank {rank}</text>"#,
            y + row_h / 2.0 + 4.0
        );
        for ta in row {
            let x = left + ta.start * scale;
            let w = ((ta.end - ta.start) * scale).max(0.5);
            let label = ta.action.to_string();
            let _ = writeln!(
                s,
                "<g><title>{} [{}, {}]</title>",
                escape(&label),
                ta.start,
                ta.end
            );
            match ta.action {
                Action::Op(op) => {
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{row_h}" fill="{}" stroke="white" stroke-width="1"/>"#,
                        kind_colour(op.kind)
                    );
                    text_in_box(&mut s, &op_label(&op), x, w, y + row_h / 2.0 + 4.0, 11.0);
                }
                Action::OverlapFB { f, b } => {
                    let half = row_h / 2.0;
                    for (k, op) in [f, b].iter().enumerate() {
                        let yy = y + k as f64 * half;
                        let _ = writeln!(
                            s,
                            r#"<rect x="{x:.1}" y="{yy:.1}" width="{w:.1}" height="{half}" fill="{}"/>"#,
                            kind_colour(op.kind)
                        );
                        text_in_box(&mut s, &op_label(op), x, w, yy + half / 2.0 + 3.5, 9.5);
                    }
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{y:.1}" width="{w:.1}" height="{row_h}" fill="none" stroke="black" stroke-width="1.5"/>"#
                    );
                }
            }
            s.push_str("</g>\n");
        }
    }
    // Legend.
    let ly = axis_y + 30.0;
    let legend = [
        ("F forward", kind_colour(OpKind::F)),
        ("I backward (input)", kind_colour(OpKind::I)),
        ("W backward (weights)", kind_colour(OpKind::W)),
        ("B full backward", kind_colour(OpKind::B)),
    ];
    let mut lx = left;
    for (name, colour) in legend {
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="14" fill="{colour}"/><text x="{:.1}" y="{ly:.1}" font-size="12">{name}</text>"#,
            ly - 11.0,
            lx + 18.0
        );
        lx += 170.0;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{lx:.1}" y="{:.1}" width="14" height="14" fill="none" stroke="black" stroke-width="1.5"/><text x="{:.1}" y="{ly:.1}" font-size="12">overlapped F&amp;B unit</text>"#,
        ly - 11.0,
        lx + 18.0
    );
    s.push_str("</svg>\n");
    s
}

/// Centred label, only when it fits (≈0.6 em per character).
fn text_in_box(s: &mut String, label: &str, x: f64, w: f64, y: f64, size: f64) {
    if label.len() as f64 * size * 0.6 <= w - 2.0 {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{y:.1}" font-size="{size}" text-anchor="middle">{}</text>"#,
            x + w / 2.0,
            escape(label)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, simulate, Costs, PipelineShape};
    use megamoe_plan::ScheduleKind;

    #[test]
    fn svg_has_a_box_per_action_and_a_row_label_per_rank() {
        let s = generate(
            ScheduleKind::DualPipeV,
            PipelineShape {
                ranks: 2,
                microbatches: 4,
                vpp: 1,
            },
        )
        .unwrap();
        let sim = simulate(&s, &Costs::default()).unwrap();
        let svg = timeline_svg(&sim, "dualpipev");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let actions: usize = sim.timeline.iter().map(|r| r.len()).sum();
        assert_eq!(svg.matches("<g><title>").count(), actions);
        assert!(svg.contains("rank 0") && svg.contains("rank 1"));
        assert!(svg.contains("OVERLAP_F_B"));
    }
}
