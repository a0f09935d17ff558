//! The CUDA backend's MoE glue in bf16-activation mode, on fresh random inputs: the
//! static-buffer gather writes bf16 rows that are exact copies, the weighted combine and the
//! combine backward's row gradients are the f32 results rounded once to bf16 (bitwise the
//! CPU's f32 ops rounded), the unweighted combine and the gate gradients stay f32, and
//! SwiGLU over gate‖up rows and its backward write bf16 with exactly the bits of the f32
//! mode rounded (and of the separate-tensor SwiGLU ops on the two halves). Every case runs
//! through the kernels' 8-column path and their one-column path (a width that is not a
//! multiple of 8, and an unaligned view of the same values), which must agree bitwise. Its
//! own test binary: the mode is process-wide. Needs feature `cuda` and an NVIDIA GPU
//! (`#[ignore]`d: run the test binary with `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use megamoe_tensor::ops::routing::KeepOrder;
use megamoe_tensor::{DType, Device, Tensor};

const GPU: Device = Device::Cuda(0);

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "x", shape.to_vec(), std, Device::Cpu).unwrap()
}

/// `t` (CPU, f32) on the GPU as `dtype`; `unaligned`: a view at element offset 1 of a
/// one-longer buffer (same values, not 16-byte aligned: the kernels' one-column path).
fn on_gpu(t: &Tensor, dtype: DType, unaligned: bool) -> Tensor {
    if !unaligned {
        return t.to_device(GPU).unwrap().to_dtype(dtype).unwrap();
    }
    let n = t.numel();
    let mut v = vec![0f32];
    v.extend(t.to_host_f32().unwrap());
    Tensor::from_vec_f32(v, [n + 1], GPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .narrow(0, 1, n)
        .unwrap()
        .reshape(t.dims().to_vec())
        .unwrap()
}

/// The f32 bits of `t`'s values (bf16 widened exactly), asserting no NaN.
fn bits(name: &str, t: &Tensor) -> Vec<u32> {
    let v = t.to_dtype(DType::F32).unwrap().to_host_f32().unwrap();
    assert!(v.iter().all(|x| !x.is_nan()), "{name}: NaN");
    v.iter().map(|x| x.to_bits()).collect()
}

/// `got` is `dtype` and bitwise `want` (any device; f32 values, or bf16 widened).
fn same_bits(name: &str, got: &Tensor, want: &Tensor, dtype: DType) {
    assert_eq!(got.dtype(), dtype, "{name}: dtype");
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    assert_eq!(bits(name, got), bits(name, want), "{name}: not bitwise");
    eprintln!("  {name:<44} {dtype:<5} bitwise");
}

/// `want` (CPU f32) rounded to bf16 as the CUDA cast rounds (nearest even).
fn round_bf16(want: &Tensor) -> Tensor {
    want.to_dtype(DType::BF16).unwrap()
}

/// Relative L2 error of `got` against `want`, no NaN.
fn rel(name: &str, got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (
        got.to_dtype(DType::F32).unwrap().to_host_f32().unwrap(),
        want.to_host_f32().unwrap(),
    );
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in g.iter().zip(&w) {
        assert!(!a.is_nan(), "{name}: NaN");
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// A random routing of `t` tokens to `k` distinct of `e` experts (skewed towards low ids)
/// and gates in (0, 1): (`idx [t, k]` i32, `gates [t, k]` f32), on the CPU.
fn routing(seed: u64, t: usize, k: usize, e: usize) -> (Tensor, Tensor) {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let (mut idx, mut gates) = (Vec::new(), Vec::new());
    for _ in 0..t {
        let mut mine: Vec<i32> = Vec::new();
        while mine.len() < k {
            let a = next() as usize % e;
            let x = (a * (next() as usize % e) / e) as i32;
            if !mine.contains(&x) {
                mine.push(x);
            }
        }
        idx.extend(&mine);
        gates.extend((0..k).map(|_| (next() % 1000 + 1) as f32 / 1001.0));
    }
    (
        Tensor::from_vec_i32(idx, [t, k], Device::Cpu).unwrap(),
        Tensor::from_vec_f32(gates, [t, k], Device::Cpu).unwrap(),
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn moe_glue_writes_bf16_activations_with_the_bits_of_the_f32_ops_rounded() {
    let backend = megamoe_tensor::cuda::cuda_backend(0).unwrap();
    backend.set_bf16_matmul(true);
    let (bf, f32_) = (DType::BF16, DType::F32);
    let (t, k, e, cap) = (300, 4, 8, 160);
    let (idx, gates) = routing(21, t, k, e);
    let keep = idx
        .capacity_keep(&gates, e, Some(cap), KeepOrder::HighestGate)
        .unwrap();
    let perm = idx.capacity_permutation(&keep, e, cap).unwrap();
    let (slot_row, row_token) = (
        perm.slot_row.to_device(GPU).unwrap(),
        perm.row_token.to_device(GPU).unwrap(),
    );
    let gates_g = gates.to_device(GPU).unwrap();
    // (width, unaligned): 8-column path, one-column path (odd width), one-column path on the
    // first case's values (unaligned view)
    let mut first: Option<Vec<Tensor>> = None;
    for (d, unaligned) in [(64, false), (20, false), (64, true)] {
        let case = |what: &str| format!("d{d}{} {what}", if unaligned { " unaligned" } else { "" });
        let x = randn(30 + d as u64, &[t, d], 1.0);
        let dy = randn(40 + d as u64, &[t, d], 1.0);
        let xg = on_gpu(&x, bf, unaligned);
        // The CPU references read the same bf16-rounded inputs.
        let xc = xg.to_device(Device::Cpu).unwrap().to_dtype(f32_).unwrap();
        let buf_c = xc.gather_rows_or_zero(&perm.row_token).unwrap();
        let y_c = buf_c.combine_slots(&perm.slot_row, Some(&gates)).unwrap();
        let sum_c = buf_c.combine_slots(&perm.slot_row, None).unwrap();
        let (dr_c, dw_c) = buf_c
            .combine_slots_backward(&dy, &perm.slot_row, &gates)
            .unwrap();

        // f32 mode: f32 outputs, the CPU's bits (the parity path).
        backend.set_bf16_activations(false);
        let buf32 = xg.gather_rows_or_zero(&row_token).unwrap();
        same_bits(&case("f32 mode gather"), &buf32, &buf_c, f32_);
        same_bits(
            &case("f32 mode combine"),
            &buf32.combine_slots(&slot_row, Some(&gates_g)).unwrap(),
            &y_c,
            f32_,
        );
        let dy32 = on_gpu(&dy, f32_, unaligned);
        let (dr32, dw32) = buf32
            .combine_slots_backward(&dy32, &slot_row, &gates_g)
            .unwrap();
        same_bits(
            &case("f32 mode combine_backward d_rows"),
            &dr32,
            &dr_c,
            f32_,
        );
        let r = rel(&case("f32 mode d_w"), &dw32, &dw_c);
        assert!(r <= 1e-7, "{}: rel {r:e}", case("f32 mode d_w"));

        // bf16 mode.
        backend.set_bf16_activations(true);
        let buf = xg.gather_rows_or_zero(&row_token).unwrap();
        same_bits(&case("gather (exact copy)"), &buf, &buf_c, bf);
        let buf_g = on_gpu(&buf_c, bf, unaligned);
        let y = buf_g.combine_slots(&slot_row, Some(&gates_g)).unwrap();
        same_bits(&case("combine weighted"), &y, &round_bf16(&y_c), bf);
        let sum = buf_g.combine_slots(&slot_row, None).unwrap();
        same_bits(&case("combine unweighted (f32)"), &sum, &sum_c, f32_);
        let mut outs = vec![buf.clone(), y.clone(), sum.clone()];
        for dy_dtype in [f32_, bf] {
            let dyg = on_gpu(&dy, dy_dtype, unaligned);
            let (dr, dw) = buf_g
                .combine_slots_backward(&dyg, &slot_row, &gates_g)
                .unwrap();
            let w = format!("combine_backward (d_y {dy_dtype})");
            // the reference reads d_y as the kernel does (bf16-rounded for a bf16 d_y)
            let dy_c = dyg.to_device(Device::Cpu).unwrap().to_dtype(f32_).unwrap();
            let (dr_ref, dw_ref) = buf_c
                .combine_slots_backward(&dy_c, &perm.slot_row, &gates)
                .unwrap();
            same_bits(&case(&format!("{w} d_rows")), &dr, &round_bf16(&dr_ref), bf);
            assert_eq!(dw.dtype(), f32_, "{}", case("d_w dtype"));
            let r = rel(&case("d_w"), &dw, &dw_ref);
            eprintln!("  {:<44} f32   rel {r:.3e}", case(&format!("{w} d_w")));
            assert!(r <= 1e-7, "{}: rel {r:e}", case("d_w"));
            // (the gate gradients' f64 sums run in another order on the two paths)
            outs.push(dr);
        }

        // SwiGLU over gate‖up rows [37, 2d]: bf16 mode = f32 mode rounded, near the CPU.
        let gu = randn(50 + d as u64, &[37, 2 * d], 2.0);
        let dya = randn(60 + d as u64, &[37, d], 1.0);
        let (gug, dyag) = (on_gpu(&gu, bf, unaligned), on_gpu(&dya, bf, unaligned));
        let y_act = gug.swiglu_gate_up().unwrap();
        let d_gu = Tensor::swiglu_gate_up_backward(&gug, &dyag).unwrap();
        backend.set_bf16_activations(false);
        let y_act32 = gug.swiglu_gate_up().unwrap();
        let d_gu32 = Tensor::swiglu_gate_up_backward(&gug, &dyag).unwrap();
        backend.set_bf16_activations(true);
        same_bits(
            &case("swiglu_gate_up = f32 mode rounded"),
            &y_act,
            &y_act32.to_dtype(bf).unwrap(),
            bf,
        );
        same_bits(
            &case("swiglu_gate_up_backward = f32 mode rounded"),
            &d_gu,
            &d_gu32.to_dtype(bf).unwrap(),
            bf,
        );
        // The separate-tensor SwiGLU ops on the two halves: the same bits.
        let (gate, up) = (gug.narrow(1, 0, d).unwrap(), gug.narrow(1, d, d).unwrap());
        same_bits(
            &case("swiglu on the halves = swiglu_gate_up"),
            &gate.swiglu(&up).unwrap(),
            &y_act,
            bf,
        );
        let (dg, du) = Tensor::swiglu_backward(&gate, &up, &dyag).unwrap();
        same_bits(
            &case("swiglu_backward d_gate = gate-up d_gate"),
            &dg,
            &d_gu.narrow(1, 0, d).unwrap(),
            bf,
        );
        same_bits(
            &case("swiglu_backward d_up = gate-up d_up"),
            &du,
            &d_gu.narrow(1, d, d).unwrap(),
            bf,
        );
        let (guc, dyac) = (
            gug.to_device(Device::Cpu).unwrap().to_dtype(f32_).unwrap(),
            dyag.to_device(Device::Cpu).unwrap().to_dtype(f32_).unwrap(),
        );
        for (what, got, want) in [
            (
                "swiglu_gate_up vs CPU",
                &y_act32,
                guc.swiglu_gate_up().unwrap(),
            ),
            (
                "swiglu_gate_up_backward vs CPU",
                &d_gu32,
                Tensor::swiglu_gate_up_backward(&guc, &dyac).unwrap(),
            ),
        ] {
            let r = rel(&case(what), got, &want);
            eprintln!("  {:<44} f32   rel {r:.3e}", case(what));
            assert!(r <= 1e-5, "{}: rel {r:e}", case(what));
        }
        outs.extend([y_act, d_gu, y_act32, d_gu32]);

        // The one-column path on the first case's values: the same bits.
        match (&first, unaligned) {
            (None, false) if d == 64 => first = Some(outs),
            (Some(want), true) => {
                for (i, (g, w)) in outs.iter().zip(want).enumerate() {
                    assert_eq!(
                        bits("path", g),
                        bits("path", w),
                        "{}",
                        case(&format!("output {i}: one-column path = 8-column path"))
                    );
                }
                eprintln!("  {:<44} bitwise", case("one-column path = 8-column path"));
            }
            _ => {}
        }
    }
}
