//! The committed PyTorch fixtures (tools/reference/moe_reference.py, float64 autograd):
//! for every `tests/fixtures/<name>.toml`, run the layer on `<name>.in.safetensors` and
//! compare with `<name>.out.safetensors` — counts exactly, every other tensor within
//! max|got − ref| ≤ 1e-5 · max|ref| (the f32 tolerance; the fixtures' own f32
//! reference run stays within 2e-6, so 1e-5 leaves a 5× margin for summation order).

#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::path::{Path, PathBuf};

use megamoe_moe::{run_probe, MoeConfig};
use megamoe_tensor::{load_safetensors, Tensor};

const RTOL: f32 = 1e-5;

/// The fixtures: `MEGAMOE_MOE_FIXTURES` when set (a test binary carried to a GPU machine),
/// else this crate's `tests/fixtures`.
fn fixture_dir() -> PathBuf {
    match std::env::var_os("MEGAMOE_MOE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

fn fixture_names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "toml").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    v.sort();
    v
}

/// Worst relative error over all float tensors, and the tensor it occurred in.
fn compare(name: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) -> (f32, String) {
    let mut worst = (0.0f32, String::new());
    for (n, w) in want {
        let g = got
            .iter()
            .find(|(gn, _)| gn == n)
            .unwrap_or_else(|| panic!("{name}: output `{n}` missing"))
            .1
            .clone();
        assert_eq!(g.dims(), w.dims(), "{name}: `{n}` shape");
        let (gv, wv) = (g.to_host_f32().unwrap(), w.to_host_f32().unwrap());
        if n == "tokens_per_expert" || n == "dropped" {
            assert_eq!(gv, wv, "{name}: `{n}` must match exactly");
            continue;
        }
        let scale = wv.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = gv
            .iter()
            .zip(&wv)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = if scale > 0.0 { diff / scale } else { diff };
        assert!(
            diff <= RTOL * scale,
            "{name}: `{n}` max|got-ref| = {diff:e} > 1e-5 · max|ref| = {:e}",
            RTOL * scale
        );
        if rel > worst.0 {
            worst = (rel, n.clone());
        }
    }
    for (n, _) in got {
        assert!(
            want.iter().any(|(w, _)| w == n),
            "{name}: extra output `{n}`"
        );
    }
    worst
}

#[test]
fn fixtures_match_pytorch_reference_within_1e5() {
    let names = fixture_names();
    assert!(
        names.len() >= 6,
        "expected the committed fixtures, found {names:?}"
    );
    for name in names {
        let dir = fixture_dir();
        let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
        let cfg = MoeConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inputs = load_safetensors(dir.join(format!("{name}.in.safetensors"))).unwrap();
        let want = load_safetensors(dir.join(format!("{name}.out.safetensors"))).unwrap();
        let got = run_probe(&cfg, &inputs).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (rel, worst) = compare(&name, &got, &want);
        eprintln!("{name}: worst rel. error {rel:.2e} ({worst})");
    }
}

/// The same fixtures on the GPU (CUDA tensor backend, feature `cuda`): inputs moved to the
/// device, the layer and its backward run there, outputs read back — within the same 1e-5
/// of the PyTorch reference; every capacity fixture also with `pad_to_capacity = true`
/// (static `[E·C, H]` buffers, strided expert GEMMs), which must not change any output.
/// Run the test binary with `--ignored` on a GPU machine (`MEGAMOE_MOE_FIXTURES` = the
/// fixture folder there).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn fixtures_match_pytorch_reference_on_the_gpu() {
    let gpu = megamoe_tensor::Device::Cuda(0);
    let names = fixture_names();
    assert!(
        names.len() >= 6,
        "expected the committed fixtures, found {names:?}"
    );
    for name in names {
        let dir = fixture_dir();
        let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
        let inputs: Vec<(String, Tensor)> =
            load_safetensors(dir.join(format!("{name}.in.safetensors")))
                .unwrap()
                .into_iter()
                .map(|(n, t)| (n, t.to_device(gpu).unwrap()))
                .collect();
        let want = load_safetensors(dir.join(format!("{name}.out.safetensors"))).unwrap();
        let mut variants = vec![(name.clone(), text.clone())];
        if text.contains("capacity_factor") && !text.contains("pad_to_capacity") {
            let padded = text.replacen("[moe]\n", "[moe]\npad_to_capacity = true\n", 1);
            assert_ne!(
                padded, text,
                "{name}: no [moe] line to add pad_to_capacity to"
            );
            variants.push((format!("{name} (pad_to_capacity)"), padded));
        }
        for (label, text) in variants {
            let cfg = MoeConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{label}: {e}"));
            let got = run_probe(&cfg, &inputs).unwrap_or_else(|e| panic!("{label}: {e}"));
            // (the counts come back through the stats read, as host tensors)
            for (n, t) in &got {
                let host = n == "tokens_per_expert" || n == "dropped";
                assert!(host || t.device() == gpu, "{label}: `{n}` left the GPU");
            }
            let (rel, worst) = compare(&label, &got, &want);
            eprintln!("{label} on the GPU: worst rel. error {rel:.2e} ({worst})");
        }
    }
}
