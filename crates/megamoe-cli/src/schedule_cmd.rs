//! `megamoe schedule`: generate, validate and simulate a pipeline schedule,
//! print it (table, PyTorch compute-only CSV, JSON, Chrome trace, SVG), or
//! compare every kind for the same P and M.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use megamoe_pipeline::{
    chrome_trace, generate, simulate, stage_counts, timeline_svg, validate, Costs, PipelineShape,
    Schedule, Simulation,
};
use megamoe_plan::bounds::human_bytes;
use megamoe_plan::{MemoryLimit, ScheduleKind};
use serde_json::json;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// The teaching part of `megamoe schedule --help` (kinds, checks, examples),
/// shown after the options.
const SCHEDULE_HELP: &str = "\
A schedule is, per pipeline rank, the ordered list of actions it runs on
its stages: F (forward), I (backward for the input), W (backward for the
weights), B (full backward = I + W) and (F;B)OVERLAP_F_B (a forward and a
backward of different stages run as one overlapped unit). Actions print as
PyTorch's compute-only text: `2F0` = stage 2, forward, microbatch 0.

Kinds (the config's [parallel] schedule names):
  gpipe        all F then all B; M activations in flight
  1f1b         warmup P-r-1 F, then F B pairs; needs M >= P
  interleaved  1F1B over --vpp chunks per rank (stage c*P+r on rank r);
               needs M % P == 0 and M*vpp > 2(P-1)+(vpp-1)P
  zb-h1        1F1B with B split into I and W, W filling the bubbles
  zbv          2 stages per rank on a V (rank r: stages r, 2P-1-r), I/W split
  dualpipe     P even, M even, M >= 2P: half the microbatches enter at each
               end; rank r holds stage r and a copy of stage P-1-r
               (IR stages 0..P forward, P..2P reverse)
  dualpipev    DualPipe folded on a V: 2P stages, all microbatches enter and
               leave at rank 0; needs M >= 2P

Every schedule is validated (per-stage F/I/W/B counts, F before I/B before
W per microbatch, each stage on one rank, and a lockstep send/recv dry run
that must make progress) and simulated with --costs: per-action times,
makespan, bubble = makespan - busy per rank, peak in-flight activations
(stage-chunks whose F ran and whose B or W has not) and parameter copies.

Examples:
  megamoe schedule --kind 1f1b --pp 4 --microbatches 8
  megamoe schedule --kind dualpipev --pp 4 --microbatches 10 --format csv
  megamoe schedule --kind zb-h1 --pp 4 --microbatches 8 --costs F=1,I=1,W=1
  megamoe schedule --kind dualpipe --pp 8 --microbatches 20 --format svg -o dp.svg
  megamoe schedule --kind interleaved --vpp 2 --pp 4 --microbatches 8 --format chrome -o t.json
  megamoe schedule --compare --pp 4 --microbatches 8

Open chrome output at https://ui.perfetto.dev or chrome://tracing.
Invalid input prints one line `error: ...` naming the value and the rule, exit 2.
";

/// Generate a pipeline schedule, check it, simulate it, and show it
/// (see `SCHEDULE_HELP` for the text printed after the options).
#[derive(Debug, Clone, Args)]
#[command(after_help = SCHEDULE_HELP)]
pub struct ScheduleArgs {
    /// Schedule kind: gpipe, 1f1b, interleaved, zb-h1, zbv, dualpipe, dualpipev.
    #[arg(long, value_name = "KIND", required_unless_present = "compare")]
    pub kind: Option<String>,

    /// Print every kind side by side (bubble, activations, parameters) for the
    /// same --pp and --microbatches instead of one schedule.
    #[arg(long, conflicts_with_all = ["kind", "format"])]
    pub compare: bool,

    /// Pipeline ranks P.
    #[arg(long, value_name = "P")]
    pub pp: usize,

    /// Microbatches M per step (both directions together for dualpipe).
    #[arg(long, value_name = "M")]
    pub microbatches: usize,

    /// Model chunks per rank for interleaved (ignored by other kinds).
    #[arg(long, value_name = "V", default_value_t = 2)]
    pub vpp: usize,

    /// Action costs, KEY=VALUE separated by commas. Keys: F, I, W, B (default
    /// I+W), FB (an overlapped F&B unit; default F+B), comm (added to every
    /// cross-rank dependency), and sN.KEY to override KEY on stage N only.
    /// Costs are per stage-chunk; with --compare they are for a stage of L/P
    /// layers and are scaled to each kind's chunk size.
    #[arg(long, value_name = "K=V,...", default_value = "F=1,I=1,W=1,B=2,comm=0")]
    pub costs: String,

    /// Output: table (actions per rank + simulated bubble and memory), csv
    /// (PyTorch compute-only form, one line per rank), json, chrome (Perfetto
    /// trace JSON), svg (timeline picture).
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// Write the output to FILE instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Output format of `megamoe schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Actions per rank and the simulated bubble/memory table.
    Table,
    /// PyTorch's compute-only CSV: one line per rank.
    Csv,
    /// Programs, stage counts and the simulation as JSON.
    Json,
    /// Chrome / Perfetto trace JSON (`traceEvents`).
    Chrome,
    /// SVG timeline.
    Svg,
}

/// Runs `megamoe schedule`.
pub fn run(args: &ScheduleArgs) -> anyhow::Result<ExitCode> {
    let costs: Costs = args.costs.parse().context("--costs")?;
    let kinds = match &args.kind {
        // Parsed here rather than by clap so a bad name is a one-line error.
        Some(name) if !args.compare => vec![name.parse::<ScheduleKind>().context("--kind")?],
        None if !args.compare => bail!("--kind is required (or use --compare)"),
        _ => ScheduleKind::ALL.to_vec(),
    };
    check_stage_costs(args, &kinds, &costs)?;
    check_program_size(args, &kinds)?;
    let text = match kinds.as_slice() {
        [kind] => render(args, *kind, &costs)?,
        _ => compare(args, &costs)?,
    };
    match &args.output {
        Some(path) => std::fs::write(path, text)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Schedule stages of `kind` on `pp` ranks (saturating).
fn schedule_stages(kind: ScheduleKind, pp: usize, vpp: usize) -> usize {
    pp.saturating_mul(kind.stages_per_rank(vpp))
}

/// Refuses a per-stage cost `sN.KEY` whose stage N no schedule of the run has.
fn check_stage_costs(
    args: &ScheduleArgs,
    kinds: &[ScheduleKind],
    costs: &Costs,
) -> anyhow::Result<()> {
    let stages = kinds
        .iter()
        .map(|&k| schedule_stages(k, args.pp, args.vpp))
        .max()
        .unwrap_or(0);
    if let Some(&stage) = costs.per_stage.keys().find(|&&s| s >= stages) {
        bail!(
            "--costs s{stage}.*: stage {stage} does not exist; --pp {} gives stages 0..{} ({})",
            args.pp,
            stages.saturating_sub(1),
            if kinds.len() == 1 {
                "this kind"
            } else {
                "the kind with most stages"
            }
        );
    }
    Ok(())
}

/// Peak memory per action of a program, by output (measured with
/// `/usr/bin/time -f %M` on zbv, pp 100, 1000 microbatches: table, csv and
/// svg ≈ 0.4 KB, json ≈ 2 KB, chrome ≈ 5.3 KB per action), rounded up.
fn bytes_per_action(format: Format, compare: bool) -> u128 {
    match format {
        _ if compare => 512,
        Format::Table | Format::Csv | Format::Svg => 512,
        Format::Json => 2560,
        Format::Chrome => 6144,
    }
}

/// Refuses, before anything is generated, a program whose actions (at most F,
/// I and W per stage and microbatch) would not fit in this machine's RAM.
fn check_program_size(args: &ScheduleArgs, kinds: &[ScheduleKind]) -> anyhow::Result<()> {
    let Some(ram) = MemoryLimit::host_ram() else {
        return Ok(());
    };
    for &kind in kinds {
        let actions = (schedule_stages(kind, args.pp, args.vpp) as u128)
            .saturating_mul(args.microbatches as u128)
            .saturating_mul(3);
        let bytes = actions.saturating_mul(bytes_per_action(args.format, args.compare));
        if bytes > ram.bytes as u128 {
            bail!(
                "--pp {} --microbatches {}: the {kind} program has up to {actions} actions, about {} to build, more than {} ({})",
                args.pp,
                args.microbatches,
                human_bytes(bytes),
                human_bytes(ram.bytes as u128),
                ram.source
            );
        }
    }
    Ok(())
}

fn shape(args: &ScheduleArgs) -> PipelineShape {
    PipelineShape {
        ranks: args.pp,
        microbatches: args.microbatches,
        vpp: args.vpp,
    }
}

/// Generates, validates and simulates one kind.
fn build(
    kind: ScheduleKind,
    shape: PipelineShape,
    costs: &Costs,
) -> anyhow::Result<(Schedule, Simulation)> {
    let schedule = generate(kind, shape)?;
    validate(&schedule).with_context(|| format!("{kind} failed validation"))?;
    let sim = simulate(&schedule, costs)?;
    Ok((schedule, sim))
}

fn title(kind: ScheduleKind, s: &Schedule, sim: &Simulation) -> String {
    format!(
        "{kind}: {} ranks, {} stages, {} microbatches | makespan {:.2} | bubble {:.1}%",
        s.ranks(),
        s.stage_map.stages(),
        s.microbatches(),
        sim.makespan,
        100.0 * sim.bubble_rate
    )
}

fn render(args: &ScheduleArgs, kind: ScheduleKind, costs: &Costs) -> anyhow::Result<String> {
    let (schedule, sim) = build(kind, shape(args), costs)?;
    let title = title(kind, &schedule, &sim);
    Ok(match args.format {
        Format::Csv => schedule.to_compute_only(),
        Format::Svg => timeline_svg(&sim, &title),
        Format::Chrome => serde_json::to_string(&chrome_trace(&sim, &title))? + "\n",
        Format::Json => {
            let programs: Vec<Vec<String>> = schedule
                .programs
                .iter()
                .map(|p| {
                    p.iter()
                        .map(|a| a.map(|a| a.to_string()).unwrap_or_default())
                        .collect()
                })
                .collect();
            let timeline: Vec<Vec<_>> = sim
                .timeline
                .iter()
                .map(|row| {
                    row.iter()
                        .map(|t| json!({ "action": t.action.to_string(), "start": t.start, "end": t.end }))
                        .collect()
                })
                .collect();
            let v = json!({
                "kind": kind.name(),
                "pp": args.pp,
                "microbatches": args.microbatches,
                "vpp": if kind == ScheduleKind::Interleaved { Some(args.vpp) } else { None },
                "stage_map": schedule.stage_map.to_string(),
                "chains": schedule.chains,
                "costs": costs,
                "programs": programs,
                "stage_counts": stage_counts(&schedule),
                "makespan": sim.makespan,
                "bubble_rate": sim.bubble_rate,
                "ranks": sim.ranks,
                "timeline": timeline,
            });
            serde_json::to_string_pretty(&v)? + "\n"
        }
        Format::Table => table(&schedule, &sim, &title),
    })
}

fn table(schedule: &Schedule, sim: &Simulation, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{title}");
    let _ = writeln!(s, "stage -> rank: {}", schedule.stage_map);
    let _ = writeln!(s, "\nactions per rank (compute-only form):");
    for (r, program) in schedule.programs.iter().enumerate() {
        let acts: Vec<String> = program.iter().flatten().map(|a| a.to_string()).collect();
        let _ = writeln!(s, "  rank {r}: {}", acts.join(" "));
    }
    let _ = writeln!(s, "\nper stage F/I/W/B:");
    for (st, c) in stage_counts(schedule).iter().enumerate() {
        let _ = writeln!(
            s,
            "  stage {st:>2}: F={} I={} W={} B={}",
            c.f, c.i, c.w, c.b
        );
    }
    let _ = writeln!(
        s,
        "\n{:>5} {:>10} {:>10} {:>9} {:>18} {:>14}",
        "rank", "busy", "bubble", "bubble%", "peak activations", "param stages"
    );
    for r in &sim.ranks {
        let pct = if sim.makespan > 0.0 {
            100.0 * r.bubble / sim.makespan
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "{:>5} {:>10.2} {:>10.2} {:>8.1}% {:>18} {:>14}",
            r.rank, r.busy, r.bubble, pct, r.peak_activations, r.param_stages
        );
    }
    let _ = writeln!(
        s,
        "\nmakespan {:.2}, bubble rate {:.1}% (1 - busy / (ranks * makespan))",
        sim.makespan,
        100.0 * sim.bubble_rate
    );
    s
}

/// Costs scaled by `factor` (a kind whose chunks hold `factor` of L/P layers).
fn scaled(costs: &Costs, factor: f64) -> Costs {
    let scale = |k: &megamoe_pipeline::KindCosts| megamoe_pipeline::KindCosts {
        f: k.f * factor,
        i: k.i * factor,
        w: k.w * factor,
        b: k.b * factor,
        fb: k.fb.map(|x| x * factor),
    };
    Costs {
        default: scale(&costs.default),
        per_stage: costs
            .per_stage
            .iter()
            .map(|(&s, k)| (s, scale(k)))
            .collect(),
        comm: costs.comm,
    }
}

fn compare(args: &ScheduleArgs, costs: &Costs) -> anyhow::Result<String> {
    let p = args.pp;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "P={p} ranks, M={} microbatches, costs {} per stage of L/P layers (scaled to each kind's chunk)",
        args.microbatches, args.costs
    );
    let _ = writeln!(
        s,
        "{:<12} {:>6} {:>9} {:>8} {:>11} {:>13} {:>12} {:>11}",
        "kind", "stages", "makespan", "bubble%", "max bubble", "peak act", "act (L/P)", "params"
    );
    let mut first_error = None;
    let mut built = 0usize;
    for kind in ScheduleKind::ALL {
        let shape = shape(args);
        let schedule = match generate(kind, shape) {
            Ok(x) => x,
            Err(e) => {
                let _ = writeln!(s, "{:<12} n/a: {e}", kind.name());
                first_error.get_or_insert(e);
                continue;
            }
        };
        built += 1;
        // Layers per chunk relative to L/P: the longest chain has L layers.
        let chain_len = schedule
            .chains
            .iter()
            .map(|c| c.stages.len())
            .max()
            .unwrap_or(1);
        let chunk = p as f64 / chain_len as f64;
        let (_, sim) = build(kind, shape, &scaled(costs, chunk))?;
        let max_bubble = sim.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max);
        let peak = sim
            .ranks
            .iter()
            .map(|r| r.peak_activations)
            .max()
            .unwrap_or(0);
        let stages_held = sim.ranks.iter().map(|r| r.param_stages).max().unwrap_or(0);
        let _ = writeln!(
            s,
            "{:<12} {:>6} {:>9.2} {:>7.1}% {:>11.2} {:>8} chunks {:>12.2} {:>7} ({:.0}x L/P)",
            kind.name(),
            schedule.stage_map.stages(),
            sim.makespan,
            100.0 * sim.bubble_rate,
            max_bubble,
            peak,
            peak as f64 * chunk,
            format!("{stages_held}x"),
            stages_held as f64 * chunk,
        );
    }
    // No kind can run this shape (e.g. --pp 0): fail like --kind does, exit 2.
    if let (0, Some(e)) = (built, first_error) {
        return Err(e.into());
    }
    let _ = writeln!(
        s,
        "peak act: most stage-chunks alive on one rank; act (L/P): the same in stages of L/P layers;\n\
         params: stages held per rank (the DualPipe table's unit) and parameters in units of L/P."
    );
    Ok(s)
}
