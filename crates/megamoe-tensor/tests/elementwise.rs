//! Elementwise ops against f64 reference formulas; every backward helper against a central
//! finite difference of the f64 reference forward.
//!
//! FD tolerance: central difference with h = 1e-4 in f64 has truncation error
//! ~h²·|f'''|/6 ≈ 1e-9 and rounding ~1e-16/h = 1e-12, so it is exact to far below f32
//! precision; the analytic f32 gradients then agree to a few f32 ulps: rtol 1e-5, atol 1e-6.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::{Device, Tensor};

fn erf64(x: f64) -> f64 {
    // Abramowitz–Stegun 7.1.26 is too coarse; integrate the series erf(x) = 2/√π Σ
    // (−1)ⁿ x^(2n+1) / (n! (2n+1)), convergent for |x| ≤ 4 in ≤ 80 terms at f64 precision.
    let mut sum = 0.0;
    let mut term = x; // (−1)ⁿ x^(2n+1)/n!
    for n in 0..200 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
        if term.abs() < 1e-300 {
            break;
        }
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

fn sig(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

type F = fn(f64) -> f64;

fn refs() -> Vec<(&'static str, F)> {
    vec![
        ("sigmoid", sig as F),
        ("tanh", |x: f64| x.tanh()),
        ("silu", |x: f64| x * sig(x)),
        ("gelu", |x: f64| 0.5 * x * (1.0 + erf64(x / 2f64.sqrt()))),
        ("gelu_tanh", |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        }),
        ("relu", |x: f64| x.max(0.0)),
        ("relu2", |x: f64| x.max(0.0).powi(2)),
        ("exp", |x: f64| x.exp()),
        ("neg", |x: f64| -x),
        ("square", |x: f64| x * x),
    ]
}

fn forward(name: &str, t: &Tensor) -> Tensor {
    match name {
        "sigmoid" => t.sigmoid(),
        "tanh" => t.tanh(),
        "silu" => t.silu(),
        "gelu" => t.gelu(),
        "gelu_tanh" => t.gelu_tanh(),
        "relu" => t.relu(),
        "relu2" => t.relu2(),
        "exp" => t.exp(),
        "neg" => t.neg(),
        "square" => t.square(),
        _ => unreachable!(),
    }
    .unwrap()
}

fn inputs() -> Vec<f32> {
    // Spread over [-4, 4), avoiding the ReLU kink at exactly 0.
    rand_vec(21, 257)
        .into_iter()
        .map(|v| 4.0 * v + 1e-3)
        .collect()
}

fn activations_match_f64_reference(dev: Device) {
    let x = inputs();
    let t = Tensor::from_slice(&x, [257], dev).unwrap();
    for (name, f) in refs() {
        let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
        assert_close(&host(&forward(name, &t)), &want, 2e-6, 1e-7);
    }
}

fn activation_backward_helpers_match_finite_differences(dev: Device) {
    let x = inputs();
    let dy = rand_vec(22, x.len());
    let xt = Tensor::from_slice(&x, [x.len()], dev).unwrap();
    let dyt = Tensor::from_slice(&dy, [x.len()], dev).unwrap();
    let h = 1e-4;
    for (name, f) in refs() {
        let got = match name {
            "sigmoid" => xt.sigmoid().unwrap().sigmoid_backward(&dyt),
            "tanh" => xt.tanh().unwrap().tanh_backward(&dyt),
            "silu" => xt.silu_backward(&dyt),
            "gelu" => xt.gelu_backward(&dyt),
            "gelu_tanh" => xt.gelu_tanh_backward(&dyt),
            "relu" => xt.relu_backward(&dyt),
            "relu2" => xt.relu2_backward(&dyt),
            _ => continue,
        }
        .unwrap();
        let want: Vec<f64> = x
            .iter()
            .zip(&dy)
            .map(|(&v, &d)| d as f64 * (f(v as f64 + h) - f(v as f64 - h)) / (2.0 * h))
            .collect();
        assert_close(&host(&got), &want, 1e-5, 1e-6);
    }
}

fn swiglu_and_backward_match_reference_and_finite_differences(dev: Device) {
    let n = 300;
    let g = inputs()[..n.min(257)].to_vec();
    let n = g.len();
    let u = rand_vec(23, n);
    let dy = rand_vec(24, n);
    let gt = Tensor::from_slice(&g, [n], dev).unwrap();
    let ut = Tensor::from_slice(&u, [n], dev).unwrap();
    let dyt = Tensor::from_slice(&dy, [n], dev).unwrap();
    let f = |g: f64, u: f64| g * sig(g) * u;
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&a, &b)| f(a as f64, b as f64))
        .collect();
    assert_close(&host(&gt.swiglu(&ut).unwrap()), &want, 2e-6, 1e-7);
    let (dg, du) = Tensor::swiglu_backward(&gt, &ut, &dyt).unwrap();
    let h = 1e-4;
    let want_dg: Vec<f64> = (0..n)
        .map(|i| {
            let (a, b) = (g[i] as f64, u[i] as f64);
            dy[i] as f64 * (f(a + h, b) - f(a - h, b)) / (2.0 * h)
        })
        .collect();
    let want_du: Vec<f64> = (0..n)
        .map(|i| {
            let (a, b) = (g[i] as f64, u[i] as f64);
            dy[i] as f64 * (f(a, b + h) - f(a, b - h)) / (2.0 * h)
        })
        .collect();
    assert_close(&host(&dg), &want_dg, 1e-5, 1e-6);
    assert_close(&host(&du), &want_du, 1e-5, 1e-6);
}

/// SwiGLU on gate‖up rows (one `[rows, 2F]` GEMM output) gives the bits of SwiGLU on the two
/// halves as separate tensors, forward and backward; rows span several CPU tasks.
fn swiglu_gate_up_gives_the_bits_of_swiglu_on_the_halves(dev: Device) {
    let (rows, f) = (37, 600);
    let gate = rand_on(dev, 40, &[rows, f]).scale(4.0).unwrap();
    let up = rand_on(dev, 41, &[rows, f]);
    let dy = rand_on(dev, 42, &[rows, f]);
    let gate_up = Tensor::cat(&[&gate, &up], 1).unwrap();
    let y = gate_up.swiglu_gate_up().unwrap();
    assert_eq!(y.dims(), &[rows, f]);
    assert!(same_bits(&host(&y), &host(&gate.swiglu(&up).unwrap())));
    let d = Tensor::swiglu_gate_up_backward(&gate_up, &dy).unwrap();
    let (dg, du) = Tensor::swiglu_backward(&gate, &up, &dy).unwrap();
    let want = Tensor::cat(&[&dg, &du], 1).unwrap();
    assert_eq!(d.dims(), &[rows, 2 * f]);
    assert!(same_bits(&host(&d), &host(&want)));
    // An odd width has no halves; dy must be the halved shape.
    let odd = rand_on(dev, 43, &[rows, 7]);
    assert!(odd.swiglu_gate_up().is_err());
    assert!(Tensor::swiglu_gate_up_backward(&gate_up, &gate_up).is_err());
}

fn binary_scalar_and_broadcast_ops_match_loops(dev: Device) {
    let (n, h) = (5, 7);
    let a = rand_vec(30, n * h);
    let b: Vec<f32> = rand_vec(31, n * h).iter().map(|v| v + 2.0).collect(); // no zero divisor
    let at = Tensor::from_slice(&a, [n, h], dev).unwrap();
    let bt = Tensor::from_slice(&b, [n, h], dev).unwrap();
    let pairs = |f: fn(f64, f64) -> f64| -> Vec<f64> {
        a.iter()
            .zip(&b)
            .map(|(&x, &y)| f(x as f64, y as f64))
            .collect()
    };
    assert_close(
        &host(&at.add(&bt).unwrap()),
        &pairs(|x, y| x + y),
        1e-6,
        1e-7,
    );
    assert_close(
        &host(&at.sub(&bt).unwrap()),
        &pairs(|x, y| x - y),
        1e-6,
        1e-7,
    );
    assert_close(
        &host(&at.mul(&bt).unwrap()),
        &pairs(|x, y| x * y),
        1e-6,
        1e-7,
    );
    assert_close(
        &host(&at.div(&bt).unwrap()),
        &pairs(|x, y| x / y),
        1e-6,
        1e-7,
    );
    let s: Vec<f64> = a.iter().map(|&x| x as f64 * 3.0 - 0.5).collect();
    assert_close(
        &host(&at.scale(3.0).unwrap().add_scalar(-0.5).unwrap()),
        &s,
        1e-6,
        1e-7,
    );
    let row = rand_vec(32, h);
    let col = rand_vec(33, n);
    let rt = Tensor::from_slice(&row, [h], dev).unwrap();
    let ct = Tensor::from_slice(&col, [n], dev).unwrap();
    let add_row: Vec<f64> = (0..n * h)
        .map(|i| a[i] as f64 + row[i % h] as f64)
        .collect();
    let mul_row: Vec<f64> = (0..n * h)
        .map(|i| a[i] as f64 * row[i % h] as f64)
        .collect();
    let mul_col: Vec<f64> = (0..n * h)
        .map(|i| a[i] as f64 * col[i / h] as f64)
        .collect();
    assert_close(&host(&at.add_row(&rt).unwrap()), &add_row, 1e-6, 1e-7);
    assert_close(&host(&at.mul_row(&rt).unwrap()), &mul_row, 1e-6, 1e-7);
    assert_close(&host(&at.mul_col(&ct).unwrap()), &mul_col, 1e-6, 1e-7);
    assert!(at.add_row(&ct).is_err());
    assert!(at.add(&rt).is_err());
}

fn add_assign_and_axpy_are_copy_on_write(dev: Device) {
    let a = rand_vec(40, 10);
    let b = rand_vec(41, 10);
    let mut acc = Tensor::from_slice(&a, [10], dev).unwrap();
    let alias = acc.clone();
    let bt = Tensor::from_slice(&b, [10], dev).unwrap();
    acc.add_assign(&bt).unwrap();
    acc.axpy(-2.0, &bt).unwrap();
    let want: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| x as f64 - y as f64)
        .collect();
    assert_close(&host(&acc), &want, 1e-6, 1e-6);
    assert_eq!(host(&alias), a);
    // self-aliasing: x += x
    let mut s = alias.clone();
    let s2 = s.clone();
    s.add_assign(&s2).unwrap();
    assert_close(
        &host(&s),
        &a.iter().map(|&x| 2.0 * x as f64).collect::<Vec<_>>(),
        0.0,
        0.0,
    );
}

fn bf16_round_trip_and_bf16_inputs_widen(dev: Device) {
    // Values exactly representable in bf16 survive the round trip bit-exactly.
    let exact = [1.0f32, -2.5, 0.0078125, 1.0e10, -0.0];
    let exact: Vec<f32> = exact
        .iter()
        .map(|&v| megamoe_tensor::bf16::from_f32(v).to_f32())
        .collect();
    let t = Tensor::from_slice(&exact, [exact.len()], dev).unwrap();
    let b = t.to_dtype(megamoe_tensor::DType::BF16).unwrap();
    assert_eq!(b.dtype(), megamoe_tensor::DType::BF16);
    assert!(same_bits(
        &host(&b.to_dtype(megamoe_tensor::DType::F32).unwrap()),
        &exact
    ));
    // bf16 keeps 7 mantissa bits: spacing at 1 is 2^-7 = 4/512. 1+1/512 rounds down to 1,
    // 1+3/512 up to 1+4/512, and the tie 1+2/512 goes to the even mantissa (1).
    let r = Tensor::from_slice(
        &[1.0 + 1.0 / 512.0, 1.0 + 3.0 / 512.0, 1.0 + 2.0 / 512.0],
        [3],
        dev,
    )
    .unwrap();
    let back = host(&r.to_dtype(megamoe_tensor::DType::BF16).unwrap());
    assert_eq!(back, vec![1.0, 1.0 + 4.0 / 512.0, 1.0]);
    // ops accept bf16 and produce f32
    assert_eq!(b.add(&b).unwrap().dtype(), megamoe_tensor::DType::F32);
}

fn elementwise_same_bits_for_1_and_3_threads(dev: Device) {
    let x = rand_on(dev, 50, &[333, 129]);
    let run = || {
        (
            host(&x.gelu().unwrap()),
            host(
                &x.add_row(&x.narrow(0, 0, 1).unwrap().reshape([129]).unwrap())
                    .unwrap(),
            ),
        )
    };
    let (a1, b1) = in_pool(1, run);
    let (a3, b3) = in_pool(3, run);
    assert!(same_bits(&a1, &a3) && same_bits(&b1, &b3));
}

fn swiglu_wide_range_matches_reference_and_is_thread_count_invariant(dev: Device) {
    // Several rayon pieces (16k elements each) and gates over [-100, 100] plus edge values,
    // so the vectorised sigmoid is checked far into both tails and at 0.
    let n = 40_000;
    let mut g: Vec<f32> = rand_vec(25, n).into_iter().map(|v| 100.0 * v).collect();
    g[..6].copy_from_slice(&[0.0, -0.0, 1e-30, -1e-30, 87.5, -87.5]);
    let u = rand_vec(26, n);
    let dy = rand_vec(27, n);
    let gt = Tensor::from_slice(&g, [n], dev).unwrap();
    let ut = Tensor::from_slice(&u, [n], dev).unwrap();
    let dyt = Tensor::from_slice(&dy, [n], dev).unwrap();
    let run = || {
        let y = host(&gt.swiglu(&ut).unwrap());
        let (dg, du) = Tensor::swiglu_backward(&gt, &ut, &dyt).unwrap();
        (y, host(&dg), host(&du))
    };
    let (y, dg, du) = in_pool(1, run);
    // f64 closed forms: y = g σ(g) u, ∂y/∂g = u σ(g)(1 + g(1 − σ(g))), ∂y/∂u = g σ(g).
    let want_y: Vec<f64> = (0..n)
        .map(|i| g[i] as f64 * sig(g[i] as f64) * u[i] as f64)
        .collect();
    let want_dg: Vec<f64> = (0..n)
        .map(|i| {
            let (a, s) = (g[i] as f64, sig(g[i] as f64));
            dy[i] as f64 * u[i] as f64 * s * (1.0 + a * (1.0 - s))
        })
        .collect();
    let want_du: Vec<f64> = (0..n)
        .map(|i| dy[i] as f64 * g[i] as f64 * sig(g[i] as f64))
        .collect();
    assert_close(&y, &want_y, 2e-6, 1e-7);
    assert_close(&dg, &want_dg, 1e-5, 1e-6);
    assert_close(&du, &want_du, 1e-5, 1e-6);
    let three = in_pool(3, run);
    assert!(same_bits(&y, &three.0), "swiglu 1 vs 3 threads");
    assert!(same_bits(&dg, &three.1), "swiglu d_gate 1 vs 3 threads");
    assert!(same_bits(&du, &three.2), "swiglu d_up 1 vs 3 threads");
}

fn fill_in_place_reuses_a_unique_buffer_and_copies_a_shared_one(dev: Device) {
    let a = rand_vec(42, 6);
    let mut t = Tensor::from_slice(&a, [2, 3], dev).unwrap();
    let before = t.storage() as *const _ as usize;
    t.fill_in_place(0.0).unwrap();
    assert_eq!(t.storage() as *const _ as usize, before, "same buffer");
    assert_eq!(host(&t), vec![0.0; 6]);
    let alias = t.clone();
    t.fill_in_place(1.5).unwrap();
    assert_eq!(host(&t), vec![1.5; 6]);
    assert_eq!(host(&alias), vec![0.0; 6], "copy-on-write");
}

backend_tests!(
    activations_match_f64_reference,
    activation_backward_helpers_match_finite_differences,
    swiglu_and_backward_match_reference_and_finite_differences,
    swiglu_gate_up_gives_the_bits_of_swiglu_on_the_halves,
    binary_scalar_and_broadcast_ops_match_loops,
    add_assign_and_axpy_are_copy_on_write,
    bf16_round_trip_and_bf16_inputs_widen,
    elementwise_same_bits_for_1_and_3_threads,
    swiglu_wide_range_matches_reference_and_is_thread_count_invariant,
    fill_in_place_reuses_a_unique_buffer_and_copies_a_shared_one,
);
