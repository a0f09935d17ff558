//! Size bounds: every size product is checked, and a config that cannot fit
//! in the memory limit is refused before any per-layer work, naming the
//! biggest term.

use megamoe_plan::{MemoryLimit, Plan, PlanError, RawConfig, MAX_WORLD, TINY_CONFIG};

/// 16 GiB per rank: fixed, so the expectations do not depend on this machine.
fn limit() -> MemoryLimit {
    MemoryLimit::per_device(16.0, "--device-gib")
}

fn raw(sets: &[&str]) -> RawConfig {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    RawConfig::from_toml_str_with_overrides(TINY_CONFIG, &sets).expect("valid overrides")
}

fn within(sets: &[&str]) -> Result<Plan, PlanError> {
    Plan::resolve_within(&raw(sets), None, &limit())
}

/// The error for `sets`: ExceedsMemory whose biggest term names `field`.
fn exceeds(sets: &[&str], field: &str) -> String {
    let e = within(sets).expect_err("config should not fit in 16 GiB");
    let msg = e.to_string();
    assert!(
        matches!(e, PlanError::ExceedsMemory { term, .. } if term.contains(field)),
        "{sets:?}: {msg}"
    );
    assert!(
        msg.contains("16.0 GiB (device memory (--device-gib 16))"),
        "{msg}"
    );
    assert!(!msg.contains('\n') && msg.chars().count() <= 220, "{msg}");
    msg
}

#[test]
fn the_tiny_config_fits_and_resolves_like_the_unbounded_planner() {
    let bounded = within(&[]).unwrap();
    assert_eq!(bounded, Plan::resolve(&raw(&[]), None).unwrap());
}

#[test]
fn huge_vocabulary_is_refused_naming_it() {
    // Logits of 16·64 tokens x 1e11 x 4 B = 372.5 TiB, the biggest term.
    let msg = exceeds(&["model.vocab_size=100000000000"], "model.vocab_size");
    assert!(msg.contains("logits of one micro-batch"), "{msg}");
    assert!(msg.contains("= 372.5 TiB"), "{msg}");
}

#[test]
fn huge_ffn_and_expert_widths_are_refused_naming_them() {
    exceeds(&["model.ffn_hidden=1000000000000"], "model.ffn_hidden");
    // 3 MoE layers x 8 experts x 3 matrices x 1e12 x 64 x 4 B = 16.4 PiB.
    let msg = exceeds(&["moe.expert_hidden=1000000000000"], "moe.expert_hidden");
    assert!(msg.contains("= 16.4 PiB"), "{msg}");
}

#[test]
fn huge_expert_count_batch_and_sequence_are_refused_naming_them() {
    exceeds(&["moe.routed_experts=1000000000"], "moe.routed_experts");
    exceeds(&["train.global_batch=1000000000000"], "tokens");
    // One sequence's scores: 1e8² x 4 heads x 4 B = 142.1 PiB.
    let msg = exceeds(&["model.seq_len=100000000"], "model.seq_len");
    assert!(msg.contains("= 142.1 PiB"), "{msg}");
}

#[test]
fn a_trillion_layers_is_refused_before_any_per_layer_work() {
    // A per-layer loop or a Vec of 1e12 layer indices would never return here.
    let msg = exceeds(&["model.n_layers=1000000000000"], "MoE layers");
    assert!(msg.contains("PiB"), "{msg}");
}

#[test]
fn sharding_over_more_ranks_lowers_the_parameter_share() {
    // 3 MoE layers x 64 experts x 3 x 2^20 x 64 x 4 B = 144 GiB of experts: over
    // 16 GiB on one rank, 9 GiB per rank over ep 16 (plus small terms).
    let big = ["moe.routed_experts=64", "moe.expert_hidden=1048576"];
    exceeds(&big, "moe.expert_hidden");
    let mut sharded = big.to_vec();
    sharded.extend([
        "parallel.ep=16",
        "train.global_batch=16",
        "parallel.microbatches=1",
    ]);
    let raw = raw(&sharded);
    // ep = 16 needs 16 | global_batch / microbatches: 16 sequences, 1 per rank.
    let plan = Plan::resolve_within(&raw, Some(16), &limit()).unwrap();
    assert_eq!(plan.mesh.world(), 16);
}

#[test]
fn size_products_that_overflow_are_named_errors() {
    let e = within(&["parallel.dp=4294967296", "parallel.tp=4294967296"]).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::SizeOverflow {
                what: "world size",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("parallel.dp=4294967296"), "{e}");

    // 2^62 sequences of 64 tokens: 2^68 tokens per step.
    let e = Plan::resolve(&raw(&["train.global_batch=4611686018427387904"]), None).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::SizeOverflow {
                what: "tokens per step",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_world_above_the_planner_limit_is_refused_instead_of_wrapping() {
    // dp = 2^62 with a batch of 2^62 used to give world 0 and 0 tokens per step.
    let e = Plan::resolve(
        &raw(&[
            "parallel.dp=4611686018427387904",
            "train.global_batch=4611686018427387904",
        ]),
        None,
    )
    .unwrap_err();
    assert_eq!(
        e,
        PlanError::WorldTooLarge {
            world: 1 << 62,
            max: MAX_WORLD
        }
    );
}

#[test]
fn moe_layer_membership_is_constant_time_and_matches_the_list() {
    for sets in [
        &[
            "model.n_layers=12",
            "moe.layer_freq=3",
            "moe.first_dense_layers=2",
        ][..],
        &[
            "model.n_layers=7",
            "moe.layer_freq=1",
            "moe.first_dense_layers=0",
        ][..],
        &[
            "model.n_layers=9",
            "moe.layer_freq=2",
            "moe.first_dense_layers=5",
        ][..],
    ] {
        let plan = Plan::resolve(&raw(sets), None).unwrap();
        let moe = plan.moe.as_ref().unwrap();
        for l in 0..plan.model.n_layers + 3 {
            assert_eq!(
                plan.is_moe_layer(l),
                moe.moe_layers.contains(&l),
                "{sets:?} layer {l}"
            );
        }
    }
}
