//! Checkpoints across layouts: a run under dp2 × ep2 (thread ranks) checkpoints at step 4,
//! sharded (each rank writes its pieces, rank 0 the index); that checkpoint resumes under
//! one rank, ep2, dp2 × ep2 with fsdp 2, dp2 and dp2 × ep2 with fsdp 3 (parameters
//! sharded between steps), tp2, pp2 DualPipeV, pp2 × tp2, pp2 × dp2 fsdp 2 and
//! dp2 × ep2 × pp2, and every resumed run's next steps have the losses of the
//! uninterrupted dp2 × ep2 run (f32, ≤ 1e-5 relative: only summation order differs
//! between layouts). A resume under the layout that wrote the checkpoint repeats them bit
//! for bit. Checkpoints written under dp2 fsdp 3, tp2, pp2 DualPipeV, pp2 × tp2,
//! pp2 × dp2 fsdp 2 and dp2 × ep2 × pp2 1F1B resume under their own layout (bit for bit),
//! one rank, pp2 and dp2 × ep2 the same way, and a resume into pp takes only the rank's
//! stages. Under dp2 × ep2 each rank's shard holds exactly its experts, and resharding is
//! exact: save → load → save through every layout (pp2 × dp2 fsdp 3 too) gives
//! bit-identical tensors.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use megamoe_plan::{RawConfig, TINY_CONFIG};
use megamoe_train::checkpoint::{ShardIndex, INDEX_FILE, MODEL_FILE};
use megamoe_train::distributed::run_thread_ranks;
use megamoe_train::{
    load_checkpoint, DataSource, Error, Expected, NamedTensor, Tokenizer, Trainer, TrainerOptions,
};

const STEPS: usize = 8;
const SAVE_AT: usize = 4;
/// Micro-batches of one step (one sequence each).
const MICRO: usize = 8;

fn sets(layout: &[&str], data_ranks: usize) -> Vec<String> {
    let mut s: Vec<String> = [
        "model.d_model=16",
        "model.n_layers=4",
        "model.n_heads=2",
        "model.n_kv_heads=2",
        "model.ffn_hidden=32",
        "model.seq_len=8",
        "moe.routed_experts=4",
        "moe.expert_hidden=16",
        "moe.shared_expert_hidden=16",
        "moe.expert_bias=true",
        "moe.aux_loss_weight=0.05",
        "model.tie_embeddings=true",
        "mtp.depth=1",
        "train.steps=8",
        "optim.warmup_steps=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    s.push(format!("train.global_batch={MICRO}"));
    s.push(format!("parallel.microbatches={}", MICRO / data_ranks));
    s.extend(layout.iter().map(|x| x.to_string()));
    s
}

fn raw(sets: &[String]) -> RawConfig {
    RawConfig::from_toml_str_with_overrides(TINY_CONFIG, sets).unwrap()
}

fn data() -> Arc<DataSource> {
    Arc::new(DataSource::synthetic(Tokenizer::bytes()))
}

/// Runs `layout` (world `world`, dp·ep = `data_ranks`) from `resume` (or fresh) up to
/// step [`STEPS`], saving a checkpoint under `save` at step [`SAVE_AT`]; returns rank 0's
/// losses of the steps it ran.
fn run(
    layout: &[&str],
    world: usize,
    data_ranks: usize,
    resume: Option<&Path>,
    save: Option<&Path>,
) -> Vec<f64> {
    let raw = raw(&sets(layout, data_ranks));
    let step_all = |t: &mut Trainer| -> Result<Vec<f64>, Error> {
        if let Some(dir) = resume {
            t.load_checkpoint(dir)?;
        }
        if let Some(p) = t.pipeline() {
            // Only the rank's stages: no whole-model set, less than the whole model.
            assert_eq!(
                t.params().numel(),
                0,
                "a pp rank holds no whole-model parameters"
            );
            assert!(
                p.param_elements() < t.counts().params,
                "a pp rank holds its stages"
            );
        }
        let mut losses = Vec::new();
        while (t.step_count() as usize) < STEPS {
            losses.push(t.step()?.loss.total);
            if t.step_count() as usize == SAVE_AT {
                if let Some(dir) = save {
                    if t.is_writer() {
                        t.save_checkpoint(dir)?;
                    } else {
                        t.join_checkpoint()?;
                    }
                }
            }
        }
        Ok(losses)
    };
    if world == 1 {
        let mut t = Trainer::new(&raw, data(), TrainerOptions::default()).unwrap();
        return step_all(&mut t).unwrap();
    }
    let curves = run_thread_ranks(world, |comm| {
        let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), comm)?;
        step_all(&mut t)
    })
    .unwrap();
    for c in &curves {
        assert_eq!(c, &curves[0], "every rank reports rank 0's losses");
    }
    curves[0].clone()
}

fn checkpoint(dir: &Path) -> PathBuf {
    dir.join(format!("ckpt-{SAVE_AT:08}"))
}

#[test]
fn a_dp2_ep2_checkpoint_resumes_under_other_layouts_with_the_same_losses() {
    let tmp = common::TestDir::new("resume-layouts");
    let dp2ep2 = ["parallel.dp=2", "parallel.ep=2"];
    let whole = run(&dp2ep2, 4, 4, None, Some(tmp.path()));
    assert_eq!(whole.len(), STEPS);
    assert!(checkpoint(tmp.path()).join(INDEX_FILE).is_file());
    assert!(!checkpoint(tmp.path()).join(MODEL_FILE).exists());
    let want = &whole[SAVE_AT..];

    // The layout that wrote it: bit for bit.
    let same = run(&dp2ep2, 4, 4, Some(tmp.path()), None);
    assert_eq!(same, want, "dp2 x ep2 resumed");

    for (name, layout, world, data_ranks) in [
        ("one rank", &[][..], 1, 1),
        ("ep2", &["parallel.ep=2"][..], 2, 2),
        (
            "dp2 x ep2 fsdp2",
            &["parallel.dp=2", "parallel.ep=2", "parallel.fsdp=2"][..],
            4,
            4,
        ),
        ("dp2 fsdp3", &["parallel.dp=2", "parallel.fsdp=3"][..], 2, 2),
        (
            "dp2 x ep2 fsdp3",
            &["parallel.dp=2", "parallel.ep=2", "parallel.fsdp=3"][..],
            4,
            4,
        ),
        ("tp2", &["parallel.tp=2"][..], 2, 1),
        (
            "pp2 dualpipev",
            &["parallel.pp=2", "parallel.schedule=\"dualpipev\""][..],
            2,
            1,
        ),
        ("pp2 x tp2", &PP2_TP2[..], 4, 1),
        ("pp2 x dp2 fsdp2", &PP2_FSDP2[..], 4, 2),
        (
            "dp2 x ep2 x pp2 1f1b",
            &[
                "parallel.dp=2",
                "parallel.ep=2",
                "parallel.pp=2",
                "parallel.schedule=\"1f1b\"",
            ][..],
            8,
            4,
        ),
    ] {
        let got = run(layout, world, data_ranks, Some(tmp.path()), None);
        assert_eq!(got.len(), STEPS - SAVE_AT, "{name}");
        let worst = got
            .iter()
            .zip(want)
            .map(|(g, w)| ((g - w) / w).abs())
            .fold(0.0, f64::max);
        eprintln!("{name}: resumed losses vs dp2 x ep2 uninterrupted: max rel diff {worst:.2e}");
        assert!(worst <= 1e-5, "{name}: {got:?} vs {want:?}");
    }
}

/// Max relative difference of two loss curves of the same length.
fn worst_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| ((g - w) / w).abs())
        .fold(0.0, f64::max)
}

#[test]
fn an_fsdp3_checkpoint_resumes_under_fsdp3_and_one_rank_with_the_same_losses() {
    let tmp = common::TestDir::new("resume-fsdp3");
    let fsdp3 = ["parallel.dp=2", "parallel.fsdp=3"];
    let whole = run(&fsdp3, 2, 2, None, Some(tmp.path()));
    assert_eq!(whole.len(), STEPS);
    assert!(checkpoint(tmp.path()).is_dir());
    let want = &whole[SAVE_AT..];
    // the curve moves, so equal losses mean the state was restored, not a stuck model
    assert!(((want[0] - want[STEPS - SAVE_AT - 1]) / want[0]).abs() > 1e-3);

    let same = run(&fsdp3, 2, 2, Some(tmp.path()), None);
    assert_eq!(same, want, "dp2 fsdp3 resumed: bit for bit");

    let one = run(&[], 1, 1, Some(tmp.path()), None);
    let worst = worst_rel(&one, want);
    eprintln!("one rank: resumed losses vs dp2 fsdp3 uninterrupted: max rel diff {worst:.2e}");
    assert!(worst <= 1e-5, "one rank: {one:?} vs {want:?}");
}

const PP2_TP2: [&str; 3] = [
    "parallel.pp=2",
    "parallel.tp=2",
    "parallel.schedule=\"1f1b\"",
];
const PP2_FSDP2: [&str; 4] = [
    "parallel.pp=2",
    "parallel.dp=2",
    "parallel.fsdp=2",
    "parallel.schedule=\"1f1b\"",
];

/// A checkpoint written by `writer` at step 4 resumes under one rank, under the writer's
/// layout (bit for bit), under pp2 1F1B and under dp2 × ep2, each continuing with the
/// writer's uninterrupted losses.
fn check_pipeline_checkpoint(label: &str, writer: &[&str], world: usize, data_ranks: usize) {
    let tmp = common::TestDir::new(label);
    let whole = run(writer, world, data_ranks, None, Some(tmp.path()));
    assert!(checkpoint(tmp.path()).join(INDEX_FILE).is_file());
    let want = &whole[SAVE_AT..];
    assert!(((want[0] - want[STEPS - SAVE_AT - 1]) / want[0]).abs() > 1e-3);
    let same = run(writer, world, data_ranks, Some(tmp.path()), None);
    assert_eq!(
        same, want,
        "{label} resumed under its own layout: bit for bit"
    );
    for (name, layout, world, data_ranks) in [
        ("one rank", &[][..], 1, 1),
        (
            "pp2 1f1b",
            &["parallel.pp=2", "parallel.schedule=\"1f1b\""][..],
            2,
            1,
        ),
        ("dp2 x ep2", &["parallel.dp=2", "parallel.ep=2"][..], 4, 4),
    ] {
        let got = run(layout, world, data_ranks, Some(tmp.path()), None);
        let worst = worst_rel(&got, want);
        eprintln!("{label} checkpoint under {name}: max rel diff {worst:.2e}");
        assert!(worst <= 1e-5, "{label} under {name}: {got:?} vs {want:?}");
    }
}

#[test]
fn a_pp2_dualpipev_checkpoint_resumes_under_one_rank_and_pp2() {
    check_pipeline_checkpoint(
        "resume-pp2-dualpipev",
        &["parallel.pp=2", "parallel.schedule=\"dualpipev\""],
        2,
        1,
    );
}

#[test]
fn a_dp2_ep2_pp2_checkpoint_resumes_under_one_rank_and_pp2() {
    check_pipeline_checkpoint(
        "resume-dp2-ep2-pp2",
        &[
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.pp=2",
            "parallel.schedule=\"1f1b\"",
        ],
        8,
        4,
    );
}

#[test]
fn tp2_pp2_tp2_and_pp2_fsdp2_checkpoints_resume_under_other_layouts() {
    check_pipeline_checkpoint("resume-tp2", &["parallel.tp=2"], 2, 1);
    check_pipeline_checkpoint("resume-pp2-tp2", &PP2_TP2, 4, 1);
    check_pipeline_checkpoint("resume-pp2-fsdp2", &PP2_FSDP2, 4, 2);
}

fn read_index(dir: &Path) -> ShardIndex {
    serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap()
}

/// Names and row counts (dim 0) of the tensors of safetensors file `path`.
fn file_rows(path: &Path) -> Vec<(String, usize)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, usize)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().first().copied().unwrap_or(1)))
        .collect();
    out.sort();
    out
}

#[test]
fn under_dp2_ep2_each_rank_writes_its_experts_and_replicas_write_nothing_twice() {
    let tmp = common::TestDir::new("shard-experts");
    run(
        &["parallel.dp=2", "parallel.ep=2"],
        4,
        4,
        None,
        Some(tmp.path()),
    );
    let dir = checkpoint(tmp.path());
    let index = read_index(&dir);
    assert_eq!(index.world, 4);
    let experts = 4;
    let banks: Vec<&String> = index
        .model
        .keys()
        .filter(|n| n.contains(".experts."))
        .collect();
    assert!(!banks.is_empty());
    for name in &banks {
        let e = &index.model[*name];
        assert_eq!(e.shape[0], experts, "{name}");
        // Two pieces (one per expert rank), each half of the experts, in different files.
        assert_eq!(e.pieces.len(), 2, "{name}: {:?}", e.pieces);
        let mut rows: Vec<(usize, usize)> = e
            .pieces
            .iter()
            .map(|p| (p.slab.offset[0], p.slab.shape[0]))
            .collect();
        rows.sort();
        assert_eq!(rows, [(0, 2), (2, 2)], "{name}");
        assert_ne!(e.pieces[0].file, e.pieces[1].file, "{name}");
        let optim = &index.optimizer;
        for (key, s) in optim.iter().filter(|(k, _)| k.ends_with(name.as_str())) {
            assert_eq!(s.pieces.len(), 2, "{key}");
        }
    }
    // Rank 0's files hold its experts only: each bank's 2 rows, never all 4.
    let rank0 = file_rows(&dir.join("model-r00000.safetensors"));
    for name in &banks {
        let got = rank0.iter().find(|(n, _)| n == *name).map(|(_, r)| *r);
        assert_eq!(got, Some(2), "{name} in rank 0's shard");
    }
    // Every dense tensor is one piece (written once), and two ranks (the expert ranks of
    // data rank 0) wrote model files: the data-parallel replicas wrote nothing.
    for (name, e) in index.model.iter().filter(|(n, _)| !n.contains(".experts.")) {
        assert_eq!(e.pieces.len(), 1, "{name}");
    }
    let model_files: Vec<&String> = index
        .files
        .keys()
        .filter(|f| f.starts_with("model-"))
        .collect();
    assert_eq!(model_files.len(), 2, "{model_files:?}");
    let on_disk = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(
        on_disk,
        index.files.len() + 1,
        "shards + state.json + index.json"
    );
}

/// The tensors of checkpoint `dir`, assembled whole.
fn tensors(dir: &Path) -> (Vec<NamedTensor>, Vec<NamedTensor>) {
    let c = load_checkpoint(dir, &Expected::default()).unwrap();
    (c.model, c.optimizer)
}

fn assert_bit_identical(a: &[NamedTensor], b: &[NamedTensor], label: &str) {
    assert_eq!(a.len(), b.len(), "{label}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.name, &x.shape), (&y.name, &y.shape), "{label}");
        let bits = |t: &NamedTensor| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(x) == bits(y), "{label}: {} differs", x.name);
    }
}

/// Loads checkpoint `from` under `layout` (world `world`) and saves it unchanged into
/// `to`; returns the checkpoint directory written.
fn resave(from: &Path, layout: &[&str], world: usize, data_ranks: usize, to: &Path) -> PathBuf {
    let raw = raw(&sets(layout, data_ranks));
    if world == 1 {
        let mut t = Trainer::new(&raw, data(), TrainerOptions::default()).unwrap();
        t.load_checkpoint(from).unwrap();
        return t.save_checkpoint(to).unwrap();
    }
    let dirs = run_thread_ranks(world, |comm| {
        let mut t = Trainer::new_rank(&raw, data(), TrainerOptions::default(), comm)?;
        t.load_checkpoint(from)?;
        if t.is_writer() {
            Ok(Some(t.save_checkpoint(to)?))
        } else {
            t.join_checkpoint()?;
            Ok(None)
        }
    })
    .unwrap();
    dirs.into_iter().flatten().next().unwrap()
}

#[test]
fn resharding_is_exact_through_every_layout_and_back() {
    let tmp = common::TestDir::new("reshard");
    let dp2ep2 = ["parallel.dp=2", "parallel.ep=2"];
    run(&dp2ep2, 4, 4, None, Some(&tmp.path().join("a")));
    let first = checkpoint(&tmp.path().join("a"));
    let (model, optim) = tensors(&first);
    let mut from = first.clone();
    for (i, (name, layout, world, data_ranks)) in [
        ("one rank", &[][..], 1, 1),
        ("tp2", &["parallel.tp=2"][..], 2, 1),
        ("dp2 fsdp3", &["parallel.dp=2", "parallel.fsdp=3"][..], 2, 2),
        (
            "dp2 x ep2 fsdp3",
            &["parallel.dp=2", "parallel.ep=2", "parallel.fsdp=3"][..],
            4,
            4,
        ),
        (
            "pp2 dualpipev",
            &["parallel.pp=2", "parallel.schedule=\"dualpipev\""][..],
            2,
            1,
        ),
        ("pp2 x tp2", &PP2_TP2[..], 4, 1),
        ("pp2 x dp2 fsdp2", &PP2_FSDP2[..], 4, 2),
        (
            "pp2 x dp2 fsdp3",
            &[
                "parallel.pp=2",
                "parallel.dp=2",
                "parallel.fsdp=3",
                "parallel.schedule=\"1f1b\"",
            ][..],
            4,
            2,
        ),
        ("dp2 x ep2 (back)", &dp2ep2[..], 4, 4),
    ]
    .into_iter()
    .enumerate()
    {
        let to = tmp.path().join(format!("r{i}"));
        let dir = resave(&from, layout, world, data_ranks, &to);
        if world == 1 {
            // One rank writes the one-rank files, no shards.
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            files.sort();
            let want = [
                "manifest.json",
                "model.safetensors",
                "optimizer.safetensors",
                "state.json",
            ];
            assert_eq!(files, want);
        }
        let (m, o) = tensors(&dir);
        assert_bit_identical(&m, &model, name);
        assert_bit_identical(&o, &optim, name);
        from = dir;
    }
    // Back under the layout that wrote it: the same shard files, byte for byte.
    let shards = read_index(&first).files;
    for f in shards.keys().filter(|f| f.ends_with(".safetensors")) {
        assert_eq!(
            std::fs::read(first.join(f)).unwrap(),
            std::fs::read(from.join(f)).unwrap(),
            "{f}"
        );
    }
}
