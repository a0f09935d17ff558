//! AdamW with bf16 moments (`optim.moment_dtype = "bf16"`) on the CUDA backend against the
//! CPU backend, bitwise, over three steps on fresh random inputs: the per-parameter op
//! (`adamw_step`), the captured-graph op (`adamw_step_device`) and the flat launch
//! (`segments_adamw`, with a clip factor and with / without weight decay) — parameters,
//! both bf16 moments and the bf16 weight copy. The flat launch runs on separate buffers
//! (aligned: the vector path, whole chunks, partial tail chunks) and with parameters and
//! gradients at odd offsets of flat buffers (4-byte aligned: the per-element path). Needs
//! feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test binary with `--ignored`).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;
use common::{adamw_hyper, bits};
use megamoe_tensor::{DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "bf16 moments", shape.to_vec(), std, Device::Cpu).unwrap()
}

/// Parameter, gradient of step `t`, bf16 moments (v ≥ 0) of one shape, on the CPU.
struct Param {
    p: Tensor,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

const SHAPES: [&[usize]; 5] = [&[1], &[257], &[64, 48], &[1_000_003], &[4096]];

fn params() -> Vec<Param> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let seed = 10 * i as u64;
            let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
            Param {
                p: randn(seed, s, 1.0),
                m: bf(randn(seed + 2, s, 0.01)),
                v: bf(randn(seed + 3, s, 0.01).square().unwrap()),
                decay: i % 2 == 0,
            }
        })
        .collect()
}

fn grad(i: usize, t: u64) -> Tensor {
    randn(1000 * t + i as u64, SHAPES[i], 0.05)
}

fn on(ps: &[Param], device: Device) -> Vec<Param> {
    ps.iter()
        .map(|p| Param {
            p: p.p.to_device(device).unwrap(),
            m: p.m.to_device(device).unwrap(),
            v: p.v.to_device(device).unwrap(),
            decay: p.decay,
        })
        .collect()
}

fn assert_same(got: &[Param], want: &[Param], what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.m.dtype(), DType::BF16, "{what} {i}: m stays bf16");
        assert_eq!(g.v.dtype(), DType::BF16, "{what} {i}: v stays bf16");
        assert_eq!(bits(&g.p), bits(&w.p), "{what} {i}: p");
        assert_eq!(bits(&g.m), bits(&w.m), "{what} {i}: m");
        assert_eq!(bits(&g.v), bits(&w.v), "{what} {i}: v");
    }
}

/// The CPU reference: three `adamw_step`s, the gradient scaled by `factor` first.
fn cpu_reference(factor: Option<f32>) -> Vec<Param> {
    let mut want = params();
    for t in 1..=3 {
        for (i, p) in want.iter_mut().enumerate() {
            let mut g = grad(i, t);
            if let Some(f) = factor {
                g.scale_by_assign(&Tensor::scalar(f, Device::Cpu).unwrap())
                    .unwrap();
            }
            p.p.adamw_step(&mut p.m, &mut p.v, &g, &adamw_hyper(t, p.decay))
                .unwrap();
        }
    }
    want
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn per_parameter_and_graph_ops_equal_the_cpu_bitwise() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    let want = cpu_reference(None);
    let mut op = on(&params(), GPU);
    let mut dev = on(&params(), GPU);
    let one = Tensor::scalar(1.0, GPU).unwrap().reshape([1]).unwrap();
    for t in 1..=3 {
        for (i, (a, b)) in op.iter_mut().zip(&mut dev).enumerate() {
            let g = grad(i, t).to_device(GPU).unwrap();
            a.p.adamw_step(&mut a.m, &mut a.v, &g, &adamw_hyper(t, a.decay))
                .unwrap();
            let w = backend
                .adamw_device_words(&adamw_hyper(t, b.decay))
                .unwrap();
            let consts = Tensor::from_vec_i32(w.to_vec(), [9], GPU).unwrap();
            backend
                .adamw_step_device(&mut b.p, &mut b.m, &mut b.v, &g, &consts, &one)
                .unwrap();
        }
    }
    assert_same(&op, &want, "adamw_step");
    assert_same(&dev, &want, "adamw_step_device");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn flat_launch_equals_the_cpu_bitwise() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    let factor = 0.37f32;
    let want = cpu_reference(Some(factor));
    for offset in [false, true] {
        let mut got = on(&params(), GPU);
        // Gradients: separate buffers, or views at odd offsets of one flat buffer (and the
        // parameters moved into another), which leaves only the per-element path.
        let total = 1 + SHAPES
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum::<usize>();
        // SAFETY: used by this test's thread only.
        let flat = || unsafe { Tensor::write_through_zeros([total], GPU) }.unwrap();
        let (fp, fg) = (flat(), flat());
        let mut grads = Vec::new();
        let mut at = 1;
        for (i, p) in got.iter_mut().enumerate() {
            let dims = SHAPES[i].to_vec();
            if offset {
                let mut pv = fp.view(at, dims.clone()).unwrap();
                pv.copy_from(&p.p).unwrap();
                p.p = pv;
                grads.push(fg.view(at, dims).unwrap());
            } else {
                grads.push(Tensor::zeros(dims, DType::F32, GPU).unwrap());
            }
            at += SHAPES[i].iter().product::<usize>();
        }
        let segs: Vec<_> = got
            .iter_mut()
            .zip(&grads)
            .map(|(p, g)| {
                backend
                    .adamw_segment(&mut p.p, &mut p.m, &mut p.v, g, p.decay)
                    .unwrap()
            })
            .collect();
        let table = backend.optimizer_segments(&segs).unwrap();
        let scale = Tensor::scalar(factor, GPU).unwrap();
        for t in 1..=3 {
            for (i, g) in grads.iter_mut().enumerate() {
                g.copy_from(&grad(i, t).to_device(GPU).unwrap()).unwrap();
            }
            let words = |decay| {
                let w = backend.adamw_device_words(&adamw_hyper(t, decay)).unwrap();
                Tensor::from_vec_i32(w.to_vec(), [9], GPU).unwrap()
            };
            let (with, without) = (words(true), words(false));
            backend
                .segments_adamw(&table, (&with, &without), Some(&scale), None)
                .unwrap();
        }
        assert_same(&got, &want, &format!("segments_adamw (offset {offset})"));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn mixed_moment_dtypes_are_refused_by_name() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    let mut p = Tensor::zeros([8], DType::F32, GPU).unwrap();
    let mut m = Tensor::zeros([8], DType::BF16, GPU).unwrap();
    let mut v = Tensor::zeros([8], DType::F32, GPU).unwrap();
    let g = Tensor::zeros([8], DType::F32, GPU).unwrap();
    let e = p
        .adamw_step(&mut m, &mut v, &g, &adamw_hyper(1, false))
        .unwrap_err();
    assert!(e.to_string().contains("both f32 or both bf16"), "{e}");
    let e = backend
        .adamw_segment(&mut p, &mut m, &mut v, &g, false)
        .unwrap_err();
    assert!(e.to_string().contains("both f32 or both bf16"), "{e}");
}
