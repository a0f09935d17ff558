//! Every validation rule of the specs as a failing config: each must give its
//! own `PlanError` variant, in one line that names the field and the rule.

use megamoe_plan::{Capacity, Plan, PlanError, PlanWarning, RawConfig, ScheduleKind, TINY_CONFIG};

/// A small MoE base (line 1 is empty, `[moe]` is line 11, `top_k` line 13): 8 layers, 8 heads / 4 KV heads, 8 experts top-2, batch 16.
const BASE: &str = r#"
[model]
vocab_size = 256
d_model = 64
n_layers = 8
n_heads = 8
n_kv_heads = 4
ffn_hidden = 128
seq_len = 32

[moe]
routed_experts = 8
top_k = 2
expert_hidden = 64

[train]
global_batch = 16
"#;

fn resolve(sets: &[&str], devices: Option<usize>) -> Result<Plan, PlanError> {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Plan::from_toml_str(BASE, &sets, devices)
}

fn err(sets: &[&str]) -> PlanError {
    let e = resolve(sets, None).expect_err("config should be rejected");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    e
}

#[test]
fn base_config_resolves() {
    let p = resolve(&[], Some(1)).unwrap();
    assert_eq!(p.batch.micro_batch_size, 16);
    assert_eq!(p.moe.as_ref().unwrap().experts_per_ep_rank, 8);
}

#[test]
fn tiny_config_resolves_without_warnings() {
    let raw = RawConfig::from_toml_str(TINY_CONFIG).unwrap();
    let p = Plan::resolve(&raw, Some(1)).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(p.moe.unwrap().moe_layers, vec![1, 2, 3]);
}

#[test]
fn experts_not_divisible_by_ep() {
    let e = err(&["parallel.ep=3", "train.global_batch=12"]);
    assert_eq!(
        e,
        PlanError::ExpertsNotDivisibleByEp {
            routed_experts: 8,
            ep: 3
        }
    );
    assert!(
        e.to_string().contains("parallel.ep=3") && e.to_string().contains("moe.routed_experts=8")
    );
}

#[test]
fn heads_not_divisible_by_tp() {
    let e = err(&["parallel.tp=3"]);
    assert_eq!(e, PlanError::HeadsNotDivisibleByTp { n_heads: 8, tp: 3 });
}

#[test]
fn kv_heads_not_divisible_by_tp() {
    // 8 heads split over tp=8, but only 4 KV heads.
    let e = err(&["parallel.tp=8"]);
    assert_eq!(
        e,
        PlanError::KvHeadsNotDivisibleByTp {
            n_kv_heads: 4,
            tp: 8
        }
    );
}

#[test]
fn layers_not_divisible_by_pp() {
    let e = err(&[
        "parallel.pp=3",
        "parallel.microbatches=4",
        "train.global_batch=16",
    ]);
    assert!(
        matches!(
            e,
            PlanError::LayersNotDivisibleByStages {
                n_layers: 8,
                stages: 3,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("model.n_layers=8"));
}

#[test]
fn layers_not_divisible_by_v_stages() {
    // DualPipeV with pp=3 has 6 stages; 8 layers do not split.
    let e = err(&[
        "parallel.pp=3",
        "parallel.schedule=dualpipev",
        "parallel.microbatches=8",
    ]);
    assert!(
        matches!(
            e,
            PlanError::LayersNotDivisibleByStages {
                stages: 6,
                stages_per_rank: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn null_rho_outside_unit_interval() {
    assert_eq!(
        err(&["moe.null_rho=0.0"]),
        PlanError::NullRhoOutOfRange { null_rho: 0.0 }
    );
    assert_eq!(
        err(&["moe.null_rho=1.5"]),
        PlanError::NullRhoOutOfRange { null_rho: 1.5 }
    );
    // 1.0 is allowed and means off.
    assert!(resolve(&["moe.null_rho=1.0"], None)
        .unwrap()
        .moe
        .unwrap()
        .null_slots
        .is_none());
}

#[test]
fn top_k_greater_than_experts() {
    assert_eq!(
        err(&["moe.top_k=9"]),
        PlanError::TopKExceedsExperts {
            top_k: 9,
            routed_experts: 8
        }
    );
}

#[test]
fn n_groups_not_dividing_experts() {
    assert_eq!(
        err(&["moe.n_groups=3"]),
        PlanError::GroupsNotDividingExperts {
            n_groups: 3,
            routed_experts: 8
        }
    );
}

#[test]
fn topk_groups_greater_than_n_groups() {
    assert_eq!(
        err(&["moe.n_groups=4", "moe.topk_groups=5"]),
        PlanError::TopkGroupsExceedsGroups {
            topk_groups: 5,
            n_groups: 4
        }
    );
}

#[test]
fn dualpipe_with_odd_pp() {
    let e = err(&[
        "parallel.pp=1",
        "parallel.schedule=dualpipe",
        "parallel.microbatches=4",
    ]);
    assert_eq!(
        e,
        PlanError::DualPipeOddPp {
            pp: 1,
            schedule: ScheduleKind::DualPipe
        }
    );
}

#[test]
fn too_few_microbatches_for_dualpipe_and_dualpipev() {
    for kind in ["dualpipe", "dualpipev"] {
        let sched = format!("parallel.schedule={kind}");
        let e = err(&["parallel.pp=2", &sched, "parallel.microbatches=2"]);
        assert!(
            matches!(
                e,
                PlanError::TooFewMicrobatches {
                    microbatches: 2,
                    min: 4,
                    ..
                }
            ),
            "{kind}: {e}"
        );
    }
    // m = 4 = 2·pp is enough.
    assert!(resolve(
        &[
            "parallel.pp=2",
            "parallel.schedule=dualpipev",
            "parallel.microbatches=4"
        ],
        None
    )
    .is_ok());
}

#[test]
fn world_not_equal_to_devices() {
    let e = resolve(&["parallel.ep=2"], Some(4)).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::WorldMismatch {
                world: 2,
                devices: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(resolve(&["parallel.ep=2"], Some(2)).is_ok());
}

#[test]
fn unknown_key_has_line_number() {
    let text = BASE.replace("top_k = 2", "top_k = 2\ntopk = 3");
    let e = RawConfig::from_toml_str(&text).unwrap_err();
    assert!(
        matches!(&e, PlanError::Toml { key, .. } if key == "moe.topk"),
        "{e}"
    );
    assert!(e.to_string().contains("line 14"), "{e}");
}

#[test]
fn wrong_type_has_line_number() {
    let text = BASE.replace("top_k = 2", "top_k = \"two\"");
    let e = RawConfig::from_toml_str(&text).unwrap_err();
    assert!(
        matches!(&e, PlanError::Toml { line: 13, key, .. } if key == "moe.top_k"),
        "{e}"
    );
}

#[test]
fn ep_without_moe() {
    let e = err(&["moe.routed_experts=0", "parallel.ep=2"]);
    assert_eq!(e, PlanError::EpWithoutMoe { ep: 2 });
}

#[test]
fn group_routing_with_null_slots() {
    let e = err(&["moe.n_groups=2", "moe.topk_groups=1", "moe.null_rho=0.5"]);
    assert_eq!(
        e,
        PlanError::GroupRoutingWithNullSlots {
            n_groups: 2,
            null_rho: 0.5
        }
    );
}

#[test]
fn non_integer_micro_batch_size() {
    // 16 / (dp 3 · ep 1 · m 1) is not an integer.
    let e = err(&["parallel.dp=3"]);
    assert!(
        matches!(
            e,
            PlanError::MicroBatchNotInteger {
                global_batch: 16,
                divisor: 3,
                ..
            }
        ),
        "{e}"
    );
    // 16 / (1 · 2 · 16) = 0.5.
    let e = err(&["parallel.ep=2", "parallel.microbatches=16"]);
    assert!(
        matches!(e, PlanError::MicroBatchNotInteger { divisor: 32, .. }),
        "{e}"
    );
}

#[test]
fn microbatches_below_pp_is_a_warning_not_an_error() {
    let p = resolve(&["parallel.pp=4", "parallel.microbatches=2"], None).unwrap();
    assert_eq!(
        p.warnings,
        vec![PlanWarning::MicrobatchesBelowPp {
            microbatches: 2,
            pp: 4
        }]
    );
}

#[test]
fn interleaved_rules() {
    let e = err(&["parallel.schedule=interleaved", "parallel.pp=2"]);
    assert!(matches!(e, PlanError::VppMismatch { vpp: 1, .. }), "{e}");
    let e = err(&[
        "parallel.schedule=interleaved",
        "parallel.pp=2",
        "parallel.vpp=2",
        "parallel.microbatches=1",
    ]);
    assert!(
        matches!(
            e,
            PlanError::InterleavedMicrobatches {
                microbatches: 1,
                pp: 2
            }
        ),
        "{e}"
    );
    // P=2, v=2, m=2: warmup(0) = min(2·1 + 1·2, 4) = 4 ≥ 4 micro-steps → all-warmup.
    let e = err(&[
        "parallel.schedule=interleaved",
        "parallel.pp=2",
        "parallel.vpp=2",
        "parallel.microbatches=2",
    ]);
    assert!(
        matches!(
            e,
            PlanError::AllWarmupRegime {
                warmup: 4,
                total: 4,
                ..
            }
        ),
        "{e}"
    );
    // m=4: warmup 4 < 8.
    assert!(resolve(
        &[
            "parallel.schedule=interleaved",
            "parallel.pp=2",
            "parallel.vpp=2",
            "parallel.microbatches=4"
        ],
        None
    )
    .is_ok());
    let e = err(&["parallel.vpp=2"]);
    assert!(
        matches!(
            e,
            PlanError::VppMismatch {
                vpp: 2,
                schedule: ScheduleKind::OneFOneB,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn dualpipe_odd_microbatches() {
    let e = err(&[
        "parallel.pp=2",
        "parallel.schedule=dualpipe",
        "parallel.microbatches=5",
        "train.global_batch=20",
    ]);
    assert!(
        matches!(
            e,
            PlanError::OddMicrobatches {
                microbatches: 5,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn smaller_rules_name_their_field() {
    let cases: &[(&[&str], &str)] = &[
        (&["model.n_heads=6"], "model.d_model=64"),
        (&["model.n_kv_heads=3"], "model.n_kv_heads=3"),
        (&["moe.capacity_factor=0.0"], "moe.capacity_factor"),
        (&["moe.pad_to_capacity=true"], "moe.pad_to_capacity"),
        (&["moe.shared_expert_gate=true"], "moe.shared_expert_gate"),
        (&["moe.first_dense_layers=8"], "moe.first_dense_layers=8"),
        (&["moe.layer_freq=0"], "moe.layer_freq"),
        (&["parallel.fsdp=4"], "parallel.fsdp=4"),
        (&["parallel.cp=3"], "parallel.cp=3"),
        (&["parallel.dp=0"], "parallel.dp"),
        (&["optim.lr=-1.0"], "optim.lr"),
        (&["optim.min_lr=1.0"], "optim.min_lr"),
        (&["optim.beta2=1.0"], "optim.beta2"),
        (&["train.steps=0"], "train.steps"),
        (&["train.eval_batches=0"], "train.eval_batches"),
        (&["mtp.depth=32"], "mtp.depth"),
        (&["mtp.decay=0.0"], "mtp.decay"),
        (&["gateskip.budget_end=1.0"], "gateskip.budget_end"),
        (
            &["flexidepth.adaptive_layers=8"],
            "flexidepth.adaptive_layers",
        ),
        (&["flexidepth.threshold=1.0"], "flexidepth.threshold"),
        (&["moe.route_scale=0.0"], "moe.route_scale"),
        (
            &[
                "moe.shared_experts=1",
                "moe.shared_expert_hidden=63",
                "parallel.tp=2",
            ],
            "shared_expert_hidden=63",
        ),
    ];
    for (sets, needle) in cases {
        let msg = err(sets).to_string();
        assert!(msg.contains(needle), "{sets:?}: {msg}");
    }
}

#[test]
fn routed_expert_width_needs_no_tp_divisibility() {
    // The trainer keeps every routed expert whole on each TP rank, so the width of an
    // expert is not split (the shared experts' width is, and must divide; see above).
    let plan = resolve(&["moe.expert_hidden=63", "parallel.tp=2"], None).unwrap();
    assert_eq!(plan.moe.unwrap().expert_hidden, 63);
}

#[test]
fn derived_numbers_are_right() {
    // dp 2, ep 2, m 2: mbs = 16 / 8 = 2 sequences; tokens = 2·32 = 64; C = ceil(64·2/8 · 1.25) = 20.
    let p = resolve(
        &[
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.microbatches=2",
            "moe.capacity_factor=1.25",
        ],
        Some(4),
    )
    .unwrap();
    assert_eq!(p.batch.micro_batch_size, 2);
    let moe = p.moe.unwrap();
    assert_eq!(moe.capacity, Capacity::Factor(1.25));
    assert_eq!(moe.routing.tokens, 64);
    assert_eq!(moe.routing.capacity, Some(20));
    assert_eq!(moe.experts_per_ep_rank, 4);
    // Capacity mode: El·ep·C = 4·2·20 = 160 rows at most per EP rank.
    assert_eq!(moe.routing.worst_case_rows_per_ep_rank, 160);
    // Softmax after top-k with k=2: normalize defaults to false (step 6 of tools/reference/moe_reference.py).
    assert!(!moe.normalize);
}

#[test]
fn normalize_default_follows_score_fn() {
    let p = resolve(&["moe.score_fn=sigmoid"], None).unwrap();
    assert!(p.moe.unwrap().normalize);
    let p = resolve(&["moe.pre_softmax=true"], None).unwrap();
    assert!(p.moe.unwrap().normalize);
    let p = resolve(&["moe.pre_softmax=true", "moe.normalize=false"], None).unwrap();
    assert!(!p.moe.unwrap().normalize);
}
