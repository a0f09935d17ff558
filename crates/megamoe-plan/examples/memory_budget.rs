//! Memory budget (seed `memory_budget_sample.py` / `oom_triage_sample.py`):
//! plans the Mixtral-like config on 4 H100s under several layouts and shows
//! how each knob moves the per-device buckets, then prints the seed's OOM
//! triage for the tightest layout.
//!
//! Run: `cargo run -p megamoe-plan --example memory_budget`

use megamoe_plan::{plan_memory, MemoryBucket, Plan, PlanMemory};

const MIXTRAL_LIKE: &str = include_str!("../../../configs/mixtral_like.toml");

fn plan(overrides: &[&str]) -> Result<PlanMemory, megamoe_plan::PlanError> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let plan = Plan::from_toml_str(MIXTRAL_LIKE, &overrides, None)?;
    Ok(plan_memory(&plan, Some(80.0)))
}

fn row(label: &str, m: &PlanMemory) {
    let peak = &m.ranks[m.peak_pp_rank];
    let b = &peak.breakdown;
    println!(
        "{label:<34} params {:>6.2}  grads {:>6.2}  optim {:>6.2}  act {:>6.2}  moe {:>5.2}  total {:>6.2} GiB  dominant {}",
        b.params_gb, b.gradients_gb, b.optimizer_gb, b.activations_gb, b.moe_routing_gb,
        peak.total_gb, peak.dominant
    );
}

fn main() -> Result<(), megamoe_plan::PlanError> {
    let base = plan(&[])?;
    let zero0 = plan(&["parallel.fsdp=0"])?;
    let zero3 = plan(&["parallel.fsdp=3"])?;
    let full_recompute = plan(&["train.recompute=\"full\""])?;
    let muon = plan(&["optim.name=\"muon\""])?;

    println!("Mixtral-like config, peak pipeline rank, per device (80 GiB card):");
    row("ZeRO-0 (plain data parallel)", &zero0);
    row("as configured (ZeRO-1, selective)", &base);
    row("ZeRO-3 / FSDP (all state sharded)", &zero3);
    row("full recompute", &full_recompute);
    row("Muon instead of AdamW", &muon);

    let get = |m: &PlanMemory, b: MemoryBucket| m.ranks[m.peak_pp_rank].breakdown.get(b);
    // Sharding never increases model state, and the full level shards everything.
    assert!(get(&base, MemoryBucket::OptimizerState) < get(&zero0, MemoryBucket::OptimizerState));
    assert!(get(&zero3, MemoryBucket::Parameters) < get(&base, MemoryBucket::Parameters));
    // Full recompute keeps only each layer's input between forward and backward (plus one
    // layer's recomputed state at a time), so the activations and the MoE routing state
    // together shrink, although the recomputed layer now counts under activations.
    let act = |m: &PlanMemory| get(m, MemoryBucket::Activations) + get(m, MemoryBucket::MoeRouting);
    assert!(act(&full_recompute) < act(&base));
    assert!(get(&full_recompute, MemoryBucket::MoeRouting) < get(&base, MemoryBucket::MoeRouting));
    // Muon keeps one moment instead of AdamW's two.
    assert!(get(&muon, MemoryBucket::OptimizerState) < get(&base, MemoryBucket::OptimizerState));

    println!("\nOOM triage for the layout as configured (seed order):");
    for (i, step) in base.triage.steps.iter().enumerate() {
        println!("  {}. {:<10} {}", i + 1, step.name, step.advice);
    }
    assert_eq!(
        base.triage.steps.first().map(|s| s.name.as_str()),
        Some("estimate")
    );
    Ok(())
}
