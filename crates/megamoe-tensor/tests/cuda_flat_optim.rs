//! The flat optimizer ops of the CUDA backend against the per-parameter ops they replace,
//! bitwise: the global gradient norm over many gradients (`segments_grad_norm`) equals
//! `√(Σ sum_squares)` computed gradient by gradient (`sum_squares` each, concatenated,
//! `sum_all`, `sqrt`), and one `segments_adamw` launch with a clip factor equals scaling
//! each gradient in place (`scale_by_assign`) then `adamw_step` per parameter — parameters
//! and both moments, with and without weight decay, gradients left unscaled; a zero
//! go-ahead leaves everything alone. Shapes include one larger than a reduction grid's
//! block clamp (2112 blocks of 256) and one of a single element; the flat path runs on
//! separate buffers (16-byte aligned: the vector path, whole chunks) and on views of flat
//! buffers at odd offsets (4-byte aligned only: the per-element path). Needs feature `cuda` and
//! an NVIDIA GPU (`#[ignore]`d: run the test binary with `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
use common::{adamw_hyper, bits};
use megamoe_tensor::{Device, Tensor};

const GPU: Device = Device::Cuda(0);

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "flat", shape.to_vec(), std, Device::Cpu).unwrap()
}

/// A fresh GPU copy (its own buffer) of the CPU tensor `t`.
fn fresh(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

struct Param {
    p: Tensor,
    g: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// CPU originals of parameters, gradients and moments (v ≥ 0), decay on every other one.
fn params() -> Vec<Param> {
    let shapes: [&[usize]; 6] = [&[1], &[257], &[64, 48], &[1_000_003], &[3, 5, 7], &[4096]];
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let seed = 10 * i as u64;
            Param {
                p: randn(seed, s, 1.0),
                g: randn(seed + 1, s, 0.05),
                m: randn(seed + 2, s, 0.01),
                v: randn(seed + 3, s, 0.01).square().unwrap(),
                decay: i % 2 == 0,
            }
        })
        .collect()
}

fn on_gpu(ps: &[Param]) -> Vec<Param> {
    ps.iter()
        .map(|p| Param {
            p: fresh(&p.p),
            g: fresh(&p.g),
            m: fresh(&p.m),
            v: fresh(&p.v),
            decay: p.decay,
        })
        .collect()
}

/// GPU copies as views of four write-through flat buffers, the first one at element 1 and
/// the others packed after it (so no segment is 16-byte aligned but the last by chance).
fn in_flat(ps: &[Param]) -> Vec<Param> {
    let total = 1 + ps.iter().map(|p| p.p.numel()).sum::<usize>();
    // SAFETY: used by this test's thread only.
    let flat = || unsafe { Tensor::write_through_zeros([total], GPU) }.unwrap();
    let (fp, fg, fm, fv) = (flat(), flat(), flat(), flat());
    let mut at = 1;
    ps.iter()
        .map(|p| {
            let dims = p.p.dims().to_vec();
            let place = |f: &Tensor, t: &Tensor| {
                let mut v = f.view(at, dims.clone()).unwrap();
                v.copy_from(&fresh(t)).unwrap();
                v
            };
            let out = Param {
                p: place(&fp, &p.p),
                g: place(&fg, &p.g),
                m: place(&fm, &p.m),
                v: place(&fv, &p.v),
                decay: p.decay,
            };
            at += p.p.numel();
            out
        })
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn flat_norm_and_adamw_equal_the_per_parameter_ops_bitwise() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    let host = params();
    for (scaled, offset) in [(true, false), (false, false), (true, true)] {
        // the per-parameter path
        let mut want = on_gpu(&host);
        let parts: Vec<Tensor> = want
            .iter()
            .map(|p| p.g.sum_squares().unwrap().reshape([1]).unwrap())
            .collect();
        let refs: Vec<&Tensor> = parts.iter().collect();
        let norm_want = Tensor::cat(&refs, 0)
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap();
        let factor = Tensor::scalar(0.37, GPU).unwrap();
        for p in &mut want {
            if scaled {
                p.g.scale_by_assign(&factor).unwrap();
            }
            p.p.adamw_step(&mut p.m, &mut p.v, &p.g, &adamw_hyper(7, p.decay))
                .unwrap();
        }
        // the flat path
        let mut got = if offset {
            in_flat(&host)
        } else {
            on_gpu(&host)
        };
        let segs: Vec<_> = got
            .iter_mut()
            .map(|p| {
                backend
                    .adamw_segment(&mut p.p, &mut p.m, &mut p.v, &p.g, p.decay)
                    .unwrap()
            })
            .collect();
        let table = backend.optimizer_segments(&segs).unwrap();
        let norm = backend.segments_grad_norm(&table).unwrap();
        assert_eq!(bits(&norm), bits(&norm_want), "norm");
        let words = |decay| {
            let w = backend.adamw_device_words(&adamw_hyper(7, decay)).unwrap();
            Tensor::from_vec_i32(w.to_vec(), [9], GPU).unwrap()
        };
        let (with, without) = (words(true), words(false));
        let scale = scaled.then_some(&factor);
        // a zero go-ahead changes nothing
        let zero = Tensor::scalar(0.0, GPU).unwrap().reshape([1]).unwrap();
        backend
            .segments_adamw(&table, (&with, &without), scale, Some(&zero))
            .unwrap();
        for (i, (g, h)) in got.iter().zip(&host).enumerate() {
            assert_eq!(bits(&g.p), bits(&h.p), "apply 0: param {i}");
            assert_eq!(bits(&g.m), bits(&h.m), "apply 0: m {i}");
        }
        backend
            .segments_adamw(&table, (&with, &without), scale, None)
            .unwrap();
        for (i, ((g, w), h)) in got.iter().zip(&want).zip(&host).enumerate() {
            let n = format!(
                "scaled {scaled}, offset {offset}, param {i} {:?}",
                h.p.dims()
            );
            assert_eq!(bits(&g.p), bits(&w.p), "{n}: p");
            assert_eq!(bits(&g.m), bits(&w.m), "{n}: m");
            assert_eq!(bits(&g.v), bits(&w.v), "{n}: v");
            assert_eq!(bits(&g.g), bits(&h.g), "{n}: the gradient stays unscaled");
            assert_ne!(bits(&g.p), bits(&h.p), "{n}: updated");
        }
    }
}
