//! Checkpoint save/load: round trip, file format, truncation, corruption, crashes
//! mid-save (resume scans for the newest complete checkpoint, never trusting
//! `latest`), replacing a re-reached step, config and shape mismatches.

// Test helpers outside #[test] fns: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod common;
use common::TestDir;

use std::collections::BTreeMap;

use megamoe_tensor::{Device, Tensor};
use megamoe_train::checkpoint::{
    list_checkpoints, prune_checkpoints, resolve_checkpoint, retire_checkpoints_after,
    scan_checkpoints, CHECKPOINTS_DIR, LATEST_FILE, MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE,
    STATE_FILE,
};
use megamoe_train::{
    load_checkpoint, save_checkpoint, DataPosition, Error, Expected, GoodputTotals, NamedTensor,
    TensorSpec, TrainState,
};

const CONFIG: &str = "[model]\nhidden = 64\nlayers = 2\n\n[train]\nsteps = 20\n";

fn state(step: u64) -> TrainState {
    TrainState {
        step,
        rng: vec![0xDEAD_BEEF, step],
        optimizer_steps: step - 1,
        data: DataPosition {
            source: "synthetic".into(),
            fingerprint: 0x1234,
            seed: 7,
            seq_len: 32,
            sequences_consumed: step * 8,
        },
        config_toml: CONFIG.to_string(),
        goodput: GoodputTotals {
            wall_s: 12.5,
            step_s: 10.0,
            ..Default::default()
        },
        extra: BTreeMap::from([("adam_step".to_string(), serde_json::json!(step))]),
    }
}

fn model(scale: f32) -> Vec<NamedTensor> {
    vec![
        NamedTensor::new(
            "embed.weight",
            vec![4, 3],
            (0..12).map(|i| i as f32 * scale).collect(),
        ),
        NamedTensor::new(
            "layers.0.norm.weight",
            vec![3],
            vec![1.0, -0.5, f32::MIN_POSITIVE],
        ),
        NamedTensor::new("scalar", vec![], vec![std::f32::consts::PI]),
    ]
}

fn optimizer() -> Vec<NamedTensor> {
    vec![NamedTensor::new(
        "embed.weight.exp_avg",
        vec![4, 3],
        vec![0.25; 12],
    )]
}

fn specs(t: &[NamedTensor]) -> Vec<TensorSpec> {
    t.iter().map(NamedTensor::spec).collect()
}

#[test]
fn save_then_load_round_trips_everything() {
    let dir = TestDir::new("ckpt_round_trip");
    let ckpts = dir.path().join(CHECKPOINTS_DIR);
    let saved = save_checkpoint(&ckpts, &state(10), &model(1.0), &optimizer()).unwrap();
    assert_eq!(saved, ckpts.join("ckpt-00000010"));
    let m = model(1.0);
    let o = optimizer();
    let (ms, os) = (specs(&m), specs(&o));
    let expected = Expected {
        config_toml: Some(CONFIG),
        model: Some(&ms),
        optimizer: Some(&os),
    };
    // Run dir, checkpoints dir and checkpoint dir all resolve to the same one.
    for p in [dir.path().to_path_buf(), ckpts.clone(), saved.clone()] {
        let c = load_checkpoint(&p, &expected).unwrap();
        assert_eq!(c.dir, saved);
        assert_eq!(c.state, state(10));
        assert_eq!(c.model, m);
        assert_eq!(c.optimizer, o);
    }
    // Without expectations tensors come back sorted by name.
    let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
    let names: Vec<_> = c.model.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["embed.weight", "layers.0.norm.weight", "scalar"]);
    // No temporary files remain.
    let leftovers: Vec<_> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("partial") || n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn safetensors_file_layout_follows_the_published_format() {
    // Format (huggingface/safetensors README): u64 LE header length N, then N
    // bytes of JSON {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
    // then the raw little-endian data.
    let dir = TestDir::new("ckpt_layout");
    let saved = save_checkpoint(dir.path(), &state(1), &model(2.0), &[]).unwrap();
    let bytes = std::fs::read(saved.join(MODEL_FILE)).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    assert_eq!(header["embed.weight"]["dtype"], "F32");
    assert_eq!(header["embed.weight"]["shape"], serde_json::json!([4, 3]));
    let [start, end] = [0, 1]
        .map(|i| header["embed.weight"]["data_offsets"][i].as_u64().unwrap() as usize + 8 + n);
    let values: Vec<f32> = bytes[start..end]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want: Vec<f32> = (0..12).map(|i| i as f32 * 2.0).collect();
    assert_eq!(values, want);
}

#[test]
fn truncated_model_file_is_named_error() {
    let dir = TestDir::new("ckpt_truncated");
    let saved = save_checkpoint(dir.path(), &state(3), &model(1.0), &optimizer()).unwrap();
    let file = saved.join(MODEL_FILE);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
    match &err {
        Error::CheckpointTruncated {
            path,
            expected,
            actual,
        } => {
            assert_eq!(path, &file);
            assert_eq!((*expected, *actual), (len, len - 5));
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn flipped_byte_is_corrupt_error() {
    let dir = TestDir::new("ckpt_corrupt");
    let saved = save_checkpoint(dir.path(), &state(3), &model(1.0), &optimizer()).unwrap();
    let file = saved.join(OPTIMIZER_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
    assert!(matches!(err, Error::CheckpointCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
}

#[test]
fn crash_leaving_tmp_dir_keeps_latest_loadable_and_next_save_succeeds() {
    let dir = TestDir::new("ckpt_crash");
    save_checkpoint(dir.path(), &state(10), &model(1.0), &optimizer()).unwrap();
    // Simulate a crash during the save of step 20: a partial temp dir, a
    // half-written file, no rename, `latest` not updated.
    let tmp = dir.path().join("ckpt-00000020.tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors.partial"), b"\x08\x00\x00").unwrap();
    let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
    assert_eq!(c.state.step, 10);
    assert_eq!(list_checkpoints(dir.path()).unwrap(), [10]);
    // The retried save clears the debris and publishes step 20.
    let saved = save_checkpoint(dir.path(), &state(20), &model(3.0), &optimizer()).unwrap();
    assert!(!tmp.exists());
    let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
    assert_eq!((c.dir, c.state.step), (saved, 20));
}

#[test]
fn crash_after_rename_before_latest_update_loads_the_newest_commit() {
    let dir = TestDir::new("ckpt_crash_latest");
    save_checkpoint(dir.path(), &state(10), &model(1.0), &optimizer()).unwrap();
    let latest_before = std::fs::read(dir.path().join(LATEST_FILE)).unwrap();
    save_checkpoint(dir.path(), &state(20), &model(1.0), &optimizer()).unwrap();
    // Roll `latest` back, as if the process died right before replacing it: the
    // rename committed step 20, so resume takes step 20 whatever `latest` says.
    std::fs::write(dir.path().join(LATEST_FILE), latest_before).unwrap();
    let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
    assert_eq!(c.state.step, 20);
    // Without `latest` at all the same.
    std::fs::remove_file(dir.path().join(LATEST_FILE)).unwrap();
    let c = load_checkpoint(dir.path(), &Expected::default()).unwrap();
    assert_eq!(c.state.step, 20);
}

#[test]
fn damaged_newest_checkpoint_is_skipped_and_reported() {
    let dir = TestDir::new("ckpt_scan");
    save_checkpoint(dir.path(), &state(10), &model(1.0), &optimizer()).unwrap();
    let newest = save_checkpoint(dir.path(), &state(20), &model(2.0), &optimizer()).unwrap();
    std::fs::remove_file(newest.join(MANIFEST_FILE)).unwrap();
    std::fs::create_dir(dir.path().join("ckpt-00000030.tmp")).unwrap();
    let scan = scan_checkpoints(dir.path()).unwrap();
    assert_eq!(scan.newest, Some((10, dir.path().join("ckpt-00000010"))));
    let skipped: Vec<_> = scan.skipped().into_iter().map(|s| s.dir).collect();
    assert_eq!(skipped, [newest, dir.path().join("ckpt-00000030.tmp")]);
    let resolved = resolve_checkpoint(dir.path()).unwrap();
    assert_eq!(resolved.dir, dir.path().join("ckpt-00000010"));
    assert!(
        resolved.skipped[0].reason.contains(MANIFEST_FILE),
        "{}",
        resolved.skipped[0].reason
    );
}

#[test]
fn crash_while_replacing_a_step_falls_back_and_resume_cleans_up() {
    let dir = TestDir::new("ckpt_replace_crash");
    save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
    let old = save_checkpoint(dir.path(), &state(10), &model(1.0), &optimizer()).unwrap();
    // The state a death between moving the old step-10 checkpoint aside and renaming
    // the new one into place leaves: both complete, neither under the final name.
    let replaced = dir.path().join("ckpt-00000010.replaced");
    let tmp = dir.path().join("ckpt-00000010.tmp");
    std::fs::rename(&old, &replaced).unwrap();
    copy_dir(&replaced, &tmp);
    let scan = scan_checkpoints(dir.path()).unwrap();
    assert_eq!(scan.newest.unwrap().0, 5);
    assert_eq!(scan.debris, [replaced.clone(), tmp.clone()]);
    retire_checkpoints_after(dir.path(), 5).unwrap();
    assert!(!tmp.exists() && !replaced.exists());
    // Re-reaching step 10 saves it normally.
    save_checkpoint(dir.path(), &state(10), &model(2.0), &optimizer()).unwrap();
    assert_eq!(list_checkpoints(dir.path()).unwrap(), [5, 10]);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn editing_state_json_is_detected_by_the_manifest() {
    let dir = TestDir::new("ckpt_state_edit");
    let saved = save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
    let path = saved.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"step\": 5", "\"step\": 6")).unwrap();
    let err = load_checkpoint(&saved, &Expected::default()).unwrap_err();
    assert!(matches!(err, Error::CheckpointCorrupt { .. }), "{err}");
    assert!(err.to_string().contains(STATE_FILE), "{err}");
}

#[test]
fn resume_from_an_older_step_retires_later_checkpoints_and_debris() {
    let dir = TestDir::new("ckpt_retire");
    for step in [5, 10, 15] {
        save_checkpoint(dir.path(), &state(step), &model(1.0), &optimizer()).unwrap();
    }
    std::fs::create_dir(dir.path().join("ckpt-00000020.tmp")).unwrap();
    let notes = retire_checkpoints_after(dir.path(), 10).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(list_checkpoints(dir.path()).unwrap(), [5, 10]);
    assert!(dir.path().join("ckpt-00000015.superseded").is_dir());
    assert!(!dir.path().join("ckpt-00000020.tmp").exists());
    assert_eq!(
        load_checkpoint(dir.path(), &Expected::default())
            .unwrap()
            .state
            .step,
        10
    );
}

#[test]
fn other_config_is_error_naming_first_differing_line() {
    let dir = TestDir::new("ckpt_config");
    save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
    let other = CONFIG.replace("layers = 2", "layers = 4");
    let expected = Expected {
        config_toml: Some(&other),
        ..Default::default()
    };
    let err = load_checkpoint(dir.path(), &expected).unwrap_err();
    match &err {
        Error::CheckpointConfigMismatch {
            key,
            saved,
            current,
            ..
        } => {
            assert_eq!(key, "model.layers");
            assert_eq!(saved, "2");
            assert_eq!(current, "4");
        }
        other => panic!("wrong error: {other}"),
    }
    // Trailing whitespace and CRLF line ends are not differences.
    let crlf = CONFIG.replace('\n', "  \r\n");
    let same = Expected {
        config_toml: Some(&crlf),
        ..Default::default()
    };
    load_checkpoint(dir.path(), &same).unwrap();
}

#[test]
fn shape_missing_and_unexpected_tensors_are_named_errors() {
    let dir = TestDir::new("ckpt_shapes");
    save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
    let mut want = specs(&model(1.0));
    want[0].shape = vec![4, 5];
    let err = load_checkpoint(
        dir.path(),
        &Expected {
            model: Some(&want),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "checkpoint file {}: tensor embed.weight expected shape [4, 5], got [4, 3]",
            dir.path().join("ckpt-00000005").join(MODEL_FILE).display()
        )
    );

    let mut want = specs(&model(1.0));
    want.push(TensorSpec {
        name: "lm_head.weight".into(),
        shape: vec![3, 4],
    });
    let err = load_checkpoint(
        dir.path(),
        &Expected {
            model: Some(&want),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::CheckpointTensorMissing { tensor, .. } if tensor == "lm_head.weight"),
        "{err}"
    );

    let want = specs(&model(1.0))[..2].to_vec();
    let err = load_checkpoint(
        dir.path(),
        &Expected {
            model: Some(&want),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::CheckpointTensorUnexpected { tensor, .. } if tensor == "scalar"),
        "{err}"
    );
}

#[test]
fn missing_checkpoint_and_missing_file_are_named_errors() {
    let dir = TestDir::new("ckpt_missing");
    let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
    assert!(matches!(err, Error::CheckpointMissing { .. }), "{err}");
    let err = load_checkpoint(&dir.path().join("nope"), &Expected::default()).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");

    let saved = save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
    std::fs::remove_file(saved.join(OPTIMIZER_FILE)).unwrap();
    let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CheckpointFileMissing {
                file: OPTIMIZER_FILE,
                ..
            }
        ),
        "{err}"
    );

    // `latest` naming a checkpoint that does not exist changes nothing.
    std::fs::write(dir.path().join(LATEST_FILE), "ckpt-00000099\n").unwrap();
    let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
    assert!(matches!(err, Error::CheckpointFileMissing { .. }), "{err}");
}

#[test]
fn other_format_version_is_error() {
    let dir = TestDir::new("ckpt_version");
    let saved = save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
    let path = saved.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("\"format_version\": 2", "\"format_version\": 99"),
    )
    .unwrap();
    let err = load_checkpoint(dir.path(), &Expected::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CheckpointVersion {
                found: 99,
                supported: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn re_reaching_a_step_replaces_it_and_bad_tensors_are_refused() {
    let dir = TestDir::new("ckpt_refuse");
    let saved = save_checkpoint(dir.path(), &state(5), &model(1.0), &optimizer()).unwrap();
    let again = save_checkpoint(dir.path(), &state(5), &model(9.0), &optimizer()).unwrap();
    assert_eq!(again, saved);
    let c = load_checkpoint(&saved, &Expected::default()).unwrap();
    assert_eq!(c.model[0].data[1], 9.0, "the new save replaced the old one");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with(".replaced") || n.ends_with(".tmp")),
        "{names:?}"
    );

    let mut bad = model(1.0);
    bad[1].data.pop();
    let err = save_checkpoint(dir.path(), &state(6), &bad, &optimizer()).unwrap_err();
    assert!(err.to_string().contains("layers.0.norm.weight"), "{err}");
    let dup = vec![model(1.0)[0].clone(), model(1.0)[0].clone()];
    let err = save_checkpoint(dir.path(), &state(6), &dup, &optimizer()).unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
    assert_eq!(list_checkpoints(dir.path()).unwrap(), [5]);
    assert_eq!(
        load_checkpoint(dir.path(), &Expected::default())
            .unwrap()
            .state
            .step,
        5
    );
}

#[test]
fn tensor_conversion_round_trips_f32_and_bf16_values() {
    use megamoe_tensor::DType;
    let t = Tensor::from_vec_f32(vec![1.0, -2.5, 3.25, 1e-3], vec![2, 2], Device::Cpu).unwrap();
    let n = NamedTensor::from_tensor("w", &t).unwrap();
    assert_eq!(
        (n.shape.as_slice(), n.data.as_slice()),
        (&[2, 2][..], &[1.0, -2.5, 3.25, 1e-3][..])
    );
    assert_eq!(
        n.to_tensor(Device::Cpu).unwrap().to_host_f32().unwrap(),
        n.data
    );
    // BF16 keeps 8 mantissa bits: 1e-3 becomes the nearest bf16, and saving that
    // as f32 then converting back gives the same bf16 bits.
    let b = t.to_dtype(DType::BF16).unwrap();
    let saved = NamedTensor::from_tensor("w", &b).unwrap();
    let back = saved
        .to_tensor(Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(back.to_host_bf16().unwrap(), b.to_host_bf16().unwrap());
}

#[test]
fn prune_keeps_the_newest() {
    let dir = TestDir::new("ckpt_prune");
    for step in [1, 2, 3, 4] {
        save_checkpoint(dir.path(), &state(step), &model(1.0), &optimizer()).unwrap();
    }
    let removed = prune_checkpoints(dir.path(), 2).unwrap();
    assert_eq!(removed.len(), 2);
    assert_eq!(list_checkpoints(dir.path()).unwrap(), [3, 4]);
    assert_eq!(
        load_checkpoint(dir.path(), &Expected::default())
            .unwrap()
            .state
            .step,
        4
    );
}
