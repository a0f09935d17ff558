//! The memory model on the tiny config, against hand-counted parameters.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use megamoe_plan::{model_params, plan_memory, Plan, RawConfig, ZeroLevel, TINY_CONFIG};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Hand count for configs/tiny.toml (V 256, d 64, L 4, 4 heads / 2 KV heads of 16,
/// ffn 256, 8 experts of 128, one shared expert of 128, layer 0 dense, tied head):
/// attention per layer q 64·64 + k,v 2·64·32 + o 64·64 = 12288, norms 128;
/// dense SwiGLU 3·64·256 = 49152; MoE layer: router 8·64 = 512, experts
/// 8·3·128·64 = 196608, shared 3·128·64 = 24576; embedding 256·64 = 16384; final norm 64.
const TINY_PARAMS: f64 =
    4.0 * (12288.0 + 128.0) + 49152.0 + 3.0 * (512.0 + 196608.0 + 24576.0) + 16384.0 + 64.0;

fn tiny(sets: &[&str]) -> Plan {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let raw = RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &sets).unwrap();
    Plan::resolve(&raw, None).unwrap()
}

#[test]
fn tiny_parameter_count_matches_hand_count() {
    assert_eq!(TINY_PARAMS, 780_352.0);
    assert_eq!(model_params(&tiny(&[])).total(), TINY_PARAMS);
}

#[test]
fn tiny_f32_adamw_model_state_is_4_4_8_bytes_per_param() {
    let m = plan_memory(&tiny(&[]), Some(80.0));
    let b = m.ranks[0].breakdown;
    assert!((b.params_gb - TINY_PARAMS * 4.0 / GIB).abs() < 1e-12);
    assert!((b.gradients_gb - TINY_PARAMS * 4.0 / GIB).abs() < 1e-12);
    assert!((b.optimizer_gb - TINY_PARAMS * 8.0 / GIB).abs() < 1e-12);
    assert_eq!(m.fits, Some(true));
}

#[test]
fn bf16_adds_weight_copies_and_muon_drops_a_moment() {
    // bf16 AdamW: the f32 parameters are the master weights (4 B), plus a bf16 copy
    // (2 B) of every GEMM weight: all but the norms, the router and the tied table's
    // gather side (tiny ties the head to the embedding: the table is the head's weight);
    // optimizer = 8 B of moments.
    let m = plan_memory(&tiny(&["train.dtype=bf16"]), None);
    let b = m.ranks[0].breakdown;
    let not_gemm = 4.0 * 128.0 + 64.0 + 3.0 * 512.0;
    let want = TINY_PARAMS * 4.0 + (TINY_PARAMS - not_gemm) * 2.0;
    assert!(
        (b.params_gb - want / GIB).abs() < 1e-12,
        "{}",
        b.params_gb * GIB
    );
    assert!((b.optimizer_gb - TINY_PARAMS * 8.0 / GIB).abs() < 1e-12);
    // Muon keeps one moment for hidden matrices only: less than AdamW, more than 4 B/param.
    let muon = plan_memory(&tiny(&["optim.name=muon"]), None).ranks[0].breakdown;
    assert!(muon.optimizer_gb < TINY_PARAMS * 8.0 / GIB);
    assert!(muon.optimizer_gb > TINY_PARAMS * 4.0 / GIB);
}

#[test]
fn bf16_moments_count_two_bytes_per_moment() {
    // AdamW: two bf16 moments = 4 B per parameter; parameters and gradients unchanged.
    let f = plan_memory(&tiny(&[]), None).ranks[0].breakdown;
    let b = plan_memory(&tiny(&["optim.moment_dtype=bf16"]), None).ranks[0].breakdown;
    assert!((b.optimizer_gb - TINY_PARAMS * 4.0 / GIB).abs() < 1e-12);
    assert_eq!((b.params_gb, b.gradients_gb), (f.params_gb, f.gradients_gb));
    // Muon: hidden matrices keep one f32 momentum (4 B), the AdamW-routed rest two bf16
    // moments (4 B): 4 B per parameter in all, less than with f32 moments.
    let muon = |sets: &[&str]| {
        plan_memory(&tiny(sets), None).ranks[0]
            .breakdown
            .optimizer_gb
    };
    let mb = muon(&["optim.name=muon", "optim.moment_dtype=bf16"]);
    assert!((mb - TINY_PARAMS * 4.0 / GIB).abs() < 1e-12, "{}", mb * GIB);
    assert!(muon(&["optim.name=muon"]) > mb);
}

#[test]
fn zero_levels_shard_in_order_over_the_data_parallel_group() {
    // dp 2 (global batch 8 → 4 sequences per rank); every parameter's group has 2 ranks.
    let base = plan_memory(&tiny(&["parallel.dp=2"]), None).ranks[0].breakdown;
    let z1 = plan_memory(&tiny(&["parallel.dp=2", "parallel.fsdp=1"]), None).ranks[0].breakdown;
    let z2 = plan_memory(&tiny(&["parallel.dp=2", "parallel.fsdp=2"]), None).ranks[0].breakdown;
    let z3p = tiny(&["parallel.dp=2", "parallel.fsdp=3"]);
    assert_eq!(z3p.parallel.zero, ZeroLevel::Parameters);
    let z3 = plan_memory(&z3p, None).ranks[0].breakdown;
    assert!((z1.optimizer_gb - base.optimizer_gb / 2.0).abs() < 1e-12);
    assert_eq!(z1.gradients_gb, base.gradients_gb);
    assert!((z2.gradients_gb - base.gradients_gb / 2.0).abs() < 1e-12);
    assert_eq!(z2.params_gb, base.params_gb);
    // ZeRO-3: half the parameters plus a gather buffer of the two largest layers
    // (an MoE layer: 12288 + 128 + 512 + 196608 + 24576 = 234112 params), f32.
    let want = (TINY_PARAMS / 2.0 + 2.0 * 234_112.0) * 4.0 / GIB;
    assert!(
        (z3.params_gb - want).abs() < 1e-12,
        "{} vs {want}",
        z3.params_gb
    );
}

#[test]
fn recompute_and_schedule_change_activations() {
    // Activations and the MoE part of the saved state together (full recompute keeps
    // no MoE state, so it all sits in the activations bucket).
    let act = |sets: &[&str]| {
        let b = plan_memory(&tiny(sets), None).ranks[0].breakdown;
        b.activations_gb + b.moe_routing_gb
    };
    let (none, full) = (act(&[]), act(&["train.recompute=full"]));
    assert!(full < none, "{full} {none}");
    // GPipe keeps all 4 microbatches; 1F1B with pp 1 keeps one.
    let one = plan_memory(&tiny(&["parallel.microbatches=4"]), None).ranks[0].clone();
    let gpipe = plan_memory(
        &tiny(&["parallel.microbatches=4", "parallel.schedule=gpipe"]),
        None,
    )
    .ranks[0]
        .clone();
    assert_eq!(one.in_flight_layer_microbatches, 4.0); // 1 microbatch × 4 layers
    assert_eq!(gpipe.in_flight_layer_microbatches, 16.0); // 4 microbatches × 4 layers
    assert!(gpipe.breakdown.activations_gb > one.breakdown.activations_gb);
}
