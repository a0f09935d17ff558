//! `megamoe plan`: validate a config and print the layout, MoE capacity, FSDP
//! shards and per-rank memory (or all of it as JSON).

use crate::args::ConfigArgs;
use clap::Args;
use megamoe_plan::{
    fsdp_shard_table, model_params, plan_memory, Capacity, MatrixShard, MemoryBucket, MemoryLimit,
    MeshGroup, Plan, PlanMemory, APPLICATION_ORDER,
};
use serde::Serialize;
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::process::ExitCode;

/// Flags of `megamoe plan` (the subcommand's summary line lives in main.rs).
#[derive(Debug, Clone, Args)]
#[command(after_long_help = PLAN_LONG_HELP)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: ConfigArgs,

    /// Devices available; the mesh product must equal it.
    #[arg(long, value_name = "N")]
    pub devices: Option<usize>,

    /// Device memory in GiB to compare the peak rank against (80 = H100 80GB).
    #[arg(long, value_name = "GIB", default_value_t = 80.0)]
    pub device_gib: f64,

    /// Print the plan as JSON (same content as the text form).
    #[arg(long)]
    pub json: bool,
}

/// Shown by `megamoe plan --help`.
const PLAN_LONG_HELP: &str = "\
Prints, per pipeline rank class: the mesh, experts per EP rank, routed tokens
and capacity per expert, the null-slot plan, group routing, the TP head
partition, FSDP shard rows of the biggest matrices, and memory by bucket with
the dominant bucket and OOM triage advice.

The mesh: world = pp*dp*ep*cp*tp, rank order (pp, dp, ep, cp, tp), tp fastest.
Dense layers are data-parallel over dp*ep*cp ranks, experts over dp*cp;
parallel.fsdp is the ZeRO level (0-3) over those groups. Each rank's
micro-batch is train.global_batch / (dp*ep*microbatches) sequences.

Examples:
  megamoe plan --config configs/tiny.toml
  megamoe plan --config configs/mixtral_like.toml --devices 4 --json
  megamoe plan -c configs/tiny.toml --set parallel.ep=2 --set train.dtype=bf16

A config that cannot fit however it is laid out (one rank's share of the
parameters plus its largest tensor of one micro-batch exceeds the memory: with
--devices, --device-gib per device; without, this machine's RAM) is refused
with the biggest term named, before anything is enumerated.

An invalid setting prints one line `error: <field>=<value> <rule>` and exits 2.";

/// Everything `plan` reports, for `--json`.
#[derive(Serialize)]
struct Report<'a> {
    config: String,
    world: usize,
    mesh_order: &'static str,
    application_order: Vec<&'static str>,
    process_groups: Vec<GroupReport>,
    total_params: f64,
    plan: &'a Plan,
    fsdp_shards: Vec<MatrixShard>,
    tp_shards: Vec<crate::plan_tp::TpShard>,
    memory: PlanMemory,
    warnings: Vec<String>,
}

/// The groups of one kind: every rank belongs to exactly one.
#[derive(Serialize)]
struct GroupReport {
    kind: MeshGroup,
    size: usize,
    groups: Vec<Vec<usize>>,
}

/// Groups printed in full up to this many per kind (the JSON has all).
const GROUPS_SHOWN: usize = 4;

/// Ranks whose coordinates are printed one per line up to this world size.
const COORDS_SHOWN: usize = 16;

/// Runs `megamoe plan`.
pub fn run(args: &PlanArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.device_gib.is_finite() && args.device_gib > 0.0,
        "--device-gib {} must be a finite number of GiB > 0 (e.g. 80)",
        args.device_gib
    );
    let raw = args.config.load()?;
    let limit = match (args.devices, MemoryLimit::host_ram()) {
        (None, Some(ram)) => ram,
        _ => MemoryLimit::per_device(args.device_gib, "--device-gib"),
    };
    let plan = Plan::resolve_within(&raw, args.devices, &limit)?;
    let report = Report {
        config: args.config.source_name(),
        world: plan.mesh.world(),
        mesh_order: "pp, dp, ep, cp, tp (tp fastest)",
        application_order: APPLICATION_ORDER.iter().map(|(name, _)| *name).collect(),
        process_groups: MeshGroup::ALL
            .iter()
            .map(|&kind| {
                let groups = plan.mesh.groups(kind);
                GroupReport {
                    kind,
                    size: groups.first().map_or(0, Vec::len),
                    groups,
                }
            })
            .collect(),
        total_params: model_params(&plan).total(),
        fsdp_shards: fsdp_shard_table(&plan),
        tp_shards: crate::plan_tp::tp_shard_table(&plan),
        memory: plan_memory(&plan, Some(args.device_gib)),
        warnings: plan.warnings.iter().map(|w| w.to_string()).collect(),
        plan: &plan,
    };
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render_text(&report)?
    };
    // A closed pipe (e.g. `| head`) is not an error worth a panic.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

/// Layer indices in full up to 16, else "N layers: a, b, c, ..., z".
fn layer_list(layers: &[usize]) -> String {
    match layers {
        [first, second, third, .., last] if layers.len() > 16 => {
            format!(
                "{} layers: [{first}, {second}, {third}, ..., {last}]",
                layers.len()
            )
        }
        _ => format!("{layers:?}"),
    }
}

fn row(o: &mut String, key: &str, value: impl std::fmt::Display) -> fmt::Result {
    writeln!(o, "  {key:<28} {value}")
}

fn render_text(r: &Report<'_>) -> Result<String, fmt::Error> {
    let mut out = String::new();
    let o = &mut out;
    let p = r.plan;
    let par = &p.parallel;
    writeln!(o, "megamoe plan: {}", r.config)?;
    writeln!(o, "\n[mesh]")?;
    row(o, "world", p.mesh.describe())?;
    row(
        o,
        "dense data-parallel group",
        format!("{} ranks (dp·ep·cp)", p.mesh.dense_dp_size()),
    )?;
    row(
        o,
        "expert data-parallel group",
        format!("{} ranks (dp·cp)", p.mesh.expert_dp_size()),
    )?;
    row(
        o,
        "application order",
        format!(
            "{} (tp splits heads/columns, pp layers, fsdp dim-0 rows within a stage, ep experts)",
            r.application_order.join(" -> ")
        ),
    )?;
    row(
        o,
        "ZeRO level (parallel.fsdp)",
        format!("{} ({:?})", par.zero.level(), par.zero),
    )?;
    row(o, "sequence parallel", par.sp)?;
    row(
        o,
        "schedule",
        format!(
            "{} with {} microbatches, {} stages of {} layers",
            par.schedule, par.microbatches, p.stages.stages, p.stages.layers_per_stage
        ),
    )?;
    row(o,
        "batch",
        format!(
            "global {} seqs = {} data streams x {} microbatches x {} seqs; {} tokens/micro-batch/rank",
            p.batch.global_batch,
            p.batch.data_replicas,
            p.batch.microbatches,
            p.batch.micro_batch_size,
            p.batch.tokens_per_micro_batch
        ),
    )?;
    row(
        o,
        "parameters (model)",
        format!("{:.3} M", r.total_params / 1e6),
    )?;

    render_groups(o, r)?;

    writeln!(
        o,
        "\n[rank classes] (one per pipeline rank; every rank of a class holds the same shapes)"
    )?;
    for rs in &p.stages.ranks {
        let layers: Vec<String> = rs
            .layers
            .iter()
            .map(|l| format!("{}..{}", l.start, l.end))
            .collect();
        let mut extra = Vec::new();
        if rs.has_embedding {
            extra.push("embedding");
        }
        if rs.has_head {
            extra.push("head");
        }
        if rs.has_head && p.mtp.is_some() {
            extra.push("mtp");
        }
        row(
            o,
            &format!("pp rank {}", rs.pp_rank),
            format!(
                "{} ranks, stages {:?}, layers {} {}",
                p.mesh.world() / par.pp,
                rs.stages,
                layers.join(" + "),
                extra.join(" + ")
            ),
        )?;
    }

    writeln!(o, "\n[moe]")?;
    match &p.moe {
        None => row(o, "MoE", "off (dense model)")?,
        Some(m) => {
            row(
                o,
                "routed experts / top-k",
                format!("{} / {} ({})", m.routed_experts, m.top_k, m.activation),
            )?;
            row(
                o,
                "experts per EP rank",
                format!("{} (ep {})", m.experts_per_ep_rank, par.ep),
            )?;
            row(o, "MoE layers", layer_list(&m.moe_layers))?;
            row(o, "tokens per micro-batch", m.routing.tokens)?;
            row(o, "routed assignments (T·k)", m.routing.routed_assignments)?;
            match (m.capacity, m.routing.capacity) {
                (Capacity::Factor(f), Some(c)) => row(
                    o,
                    "capacity per expert",
                    format!(
                        "{c} (factor {f}, {:?} drop, pad {})",
                        m.drop_policy, m.pad_to_capacity
                    ),
                )?,
                _ => row(o, "capacity per expert", "dropless")?,
            }
            row(
                o,
                "rows per EP rank",
                format!(
                    "expected {}, worst case {}",
                    m.routing.expected_rows_per_ep_rank, m.routing.worst_case_rows_per_ep_rank
                ),
            )?;
            match m.null_slots {
                Some(n) => row(
                    o,
                    "null-slot plan",
                    format!(
                        "rho {}: {} null copies, pool {}, k_max {}",
                        n.null_rho, n.n_null_copies, n.expanded_pool_size, n.k_max
                    ),
                )?,
                None => row(o, "null-slot plan", "off")?,
            }
            match m.group_routing {
                Some(g) => row(
                    o,
                    "group routing",
                    format!(
                        "{} groups of {}, keep {} (top-{} score per group), {} eligible experts",
                        g.n_groups,
                        g.experts_per_group,
                        g.topk_groups,
                        g.intra_group_k,
                        g.eligible_experts
                    ),
                )?,
                None => row(o, "group routing", "off")?,
            }
            match m.shared {
                Some(s) => row(
                    o,
                    "shared experts",
                    format!(
                        "{} x {} = {} wide, gate {}",
                        s.experts, s.hidden_per_expert, s.total_hidden, s.gate
                    ),
                )?,
                None => row(o, "shared experts", "none")?,
            }
            row(
                o,
                "score / balance",
                format!(
                    "{} (pre_softmax {}, normalize {}, scale {}), {} loss x {}, z x {}, bias {}",
                    m.score_fn,
                    m.pre_softmax,
                    m.normalize,
                    m.route_scale,
                    m.aux_loss,
                    m.aux_loss_weight,
                    m.z_loss_weight,
                    m.expert_bias_rate
                        .map_or("off".to_string(), |g| format!("rate {g}"))
                ),
            )?;
        }
    }

    writeln!(o, "\n[tensor parallel]")?;
    let h = p.model.tp_heads;
    row(
        o,
        "heads per TP rank",
        format!(
            "{} of {} query heads, {} of {} KV heads (tp {})",
            h.num_heads, p.model.n_heads, h.num_kv_heads, p.model.n_kv_heads, par.tp
        ),
    )?;

    crate::plan_tp::render_tp_shards(o, p, &r.tp_shards)?;

    writeln!(
        o,
        "\n[fsdp shards] (dim-0 rows of the TP-local matrix over its data-parallel group; \
         embedding, head and routed experts are whole on every TP rank)"
    )?;
    writeln!(
        o,
        "  {:<44} {:>8} {:>10} {:>6} {:>12} {:>10} {:>10}",
        "matrix", "rows", "row elems", "group", "chunk rows", "last rank", "even rows"
    )?;
    for s in &r.fsdp_shards {
        writeln!(
            o,
            "  {:<44} {:>8} {:>10} {:>6} {:>12} {:>10} {:>10}",
            s.name,
            s.rows,
            s.row_elems,
            s.group,
            s.chunk_rows,
            s.chunk_last_rows,
            format!("{}-{}", s.even_rows.0, s.even_rows.1)
        )?;
    }

    writeln!(o, "\n[features]")?;
    row(
        o,
        "gateskip",
        p.gate_skip.map_or("off".into(), |g| {
            format!(
                "{} gate, budget {} -> {} over {} steps",
                g.gate, g.budget_start, g.budget_end, g.budget_warmup_steps
            )
        }),
    )?;
    row(
        o,
        "flexidepth",
        p.flexi_depth.map_or("off".into(), |f| {
            format!(
                "last {} layers, router hidden {}, adapter {}",
                f.adaptive_layers, f.router_hidden, f.adapter_hidden
            )
        }),
    )?;
    row(
        o,
        "mtp",
        p.mtp.as_ref().map_or("off".into(), |m| {
            format!(
                "depth {} ({}), weights {:.4?}",
                m.depth, m.mode, m.step_weights
            )
        }),
    )?;
    row(
        o,
        "optimizer",
        format!(
            "{} lr {} ({}), moments {}, {} {}",
            p.optim.kind,
            p.optim.lr,
            p.optim.lr_schedule,
            p.optim.moment_dtype,
            p.train.precision,
            p.train.recompute
        ),
    )?;

    writeln!(o, "\n[memory] GiB per rank (model: docs/memory.md)")?;
    write!(o, "  {:<22}", "bucket")?;
    for m in &r.memory.ranks {
        write!(o, " {:>10}", format!("pp {}", m.pp_rank))?;
    }
    writeln!(o)?;
    for b in MemoryBucket::ALL {
        write!(o, "  {:<22}", b.name())?;
        for m in &r.memory.ranks {
            write!(o, " {:>10.3}", m.breakdown.get(b))?;
        }
        writeln!(o)?;
    }
    write!(o, "  {:<22}", "total")?;
    for m in &r.memory.ranks {
        write!(o, " {:>10.3}", m.total_gb)?;
    }
    writeln!(o)?;
    write!(o, "  {:<22}", "dominant")?;
    for m in &r.memory.ranks {
        write!(o, " {:>10}", m.dominant.name())?;
    }
    writeln!(o)?;
    let mem = &r.memory;
    row(
        o,
        "peak",
        format!(
            "pp rank {}: {:.2} GiB of {} GiB ({})",
            mem.peak_pp_rank,
            mem.peak_gb,
            mem.device_gb.unwrap_or(0.0),
            if mem.fits == Some(true) {
                "fits"
            } else {
                "does NOT fit"
            }
        ),
    )?;
    writeln!(
        o,
        "\n[oom triage] (dominant bucket: {})",
        mem.triage.dominant
    )?;
    for (i, s) in mem.triage.steps.iter().enumerate() {
        writeln!(o, "  {}. {}: {}", i + 1, s.name, s.advice)?;
    }
    Ok(out)
}

/// The `[process groups]` section: each group kind with its groups (world ranks), then each
/// rank's coordinates for small worlds.
fn render_groups(o: &mut String, r: &Report<'_>) -> fmt::Result {
    writeln!(
        o,
        "\n[process groups] (world ranks; one communicator per kind, built once)"
    )?;
    for g in &r.process_groups {
        let shown: Vec<String> = g
            .groups
            .iter()
            .take(GROUPS_SHOWN)
            .map(|m| format!("{m:?}"))
            .collect();
        let more = g.groups.len().saturating_sub(GROUPS_SHOWN);
        let tail = if more > 0 {
            format!(" ... {more} more")
        } else {
            String::new()
        };
        row(
            o,
            &format!("{} (size {})", g.kind.name(), g.size),
            format!("{}{tail}", shown.join(" ")),
        )?;
    }
    let mesh = &r.plan.mesh;
    if mesh.world() <= COORDS_SHOWN {
        for rank in 0..mesh.world() {
            if let Some(c) = mesh.coords(rank) {
                row(
                    o,
                    &format!("rank {rank}"),
                    format!(
                        "pp {} dp {} ep {} cp {} tp {}",
                        c.pp, c.dp, c.ep, c.cp, c.tp
                    ),
                )?;
            }
        }
    }
    Ok(())
}
