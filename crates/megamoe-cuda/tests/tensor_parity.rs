//! GPU tests: `megamoe_cuda::tensor` kernels against megamoe-tensor's CPU ops of the same
//! names, on fresh random inputs (never zeros), outputs poisoned with NaN first, f32 within
//! 1e-5 relative (most are bitwise equal), bf16 inputs within 1e-2. `#[ignore]`d: run the
//! test binary with `--ignored` on a machine with an NVIDIA GPU.
#![allow(clippy::unwrap_used)]

use megamoe_cuda::tensor::{Binary, Broadcast, Dev, Dtype, RowReduce, TensorKernels, Unary};
use megamoe_cuda::{DeviceBuffer, Gpu};
use megamoe_tensor::{BinaryOp, DType, Device, Tensor, UnaryOp};

const NEEDS_GPU: &str = "needs an NVIDIA GPU: run the test binary with --ignored there";

fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_infinite() && g == w {
            continue;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn check(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let r = rel(got, want);
    eprintln!("  {name:<28} rel {r:.3e} (tol {tol:.0e})");
    assert!(
        want.iter().any(|&v| v != 0.0),
        "{name}: reference is all zeros"
    );
    assert!(
        r.is_finite() && r <= tol,
        "{name}: rel error {r:e} > {tol:e}"
    );
}

fn randn(seed: u64, n: usize, std: f32) -> Vec<f32> {
    Tensor::randn_named(seed, "t", [n], std, Device::Cpu)
        .unwrap()
        .to_host_f32()
        .unwrap()
}

fn cpu(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec_f32(v.to_vec(), shape.to_vec(), Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_host_f32().unwrap()
}

struct Env {
    gpu: Gpu,
    k: TensorKernels,
    keep: Vec<DeviceBuffer>,
}

impl Env {
    fn new() -> Env {
        let mut gpu = Gpu::new(0).expect(NEEDS_GPU);
        let k = TensorKernels::new(&mut gpu).unwrap();
        Env {
            gpu,
            k,
            keep: Vec::new(),
        }
    }
    /// Uploads `v` as `dtype` (bf16 rounds; i32 truncates).
    fn up(&mut self, v: &[f32], dtype: Dtype) -> Dev {
        let buf = self.gpu.alloc(v.len().max(1) * dtype.size()).unwrap();
        match dtype {
            Dtype::F32 => self.gpu.upload(&buf, v).unwrap(),
            Dtype::Bf16 => {
                let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
                self.gpu.upload(&buf, &h).unwrap()
            }
            Dtype::I32 => {
                let h: Vec<i32> = v.iter().map(|&x| x as i32).collect();
                self.gpu.upload(&buf, &h).unwrap()
            }
        }
        let d = Dev::new(buf.ptr(), dtype);
        self.keep.push(buf);
        d
    }
    fn up_i32(&mut self, v: &[i32]) -> u64 {
        let buf = self.gpu.alloc(v.len().max(1) * 4).unwrap();
        self.gpu.upload(&buf, v).unwrap();
        let p = buf.ptr();
        self.keep.push(buf);
        p
    }
    /// `n` NaN-poisoned elements of `dtype`.
    fn out(&mut self, n: usize, dtype: Dtype) -> Dev {
        let buf = self.gpu.alloc(n.max(1) * dtype.size()).unwrap();
        self.gpu.memset(&buf, 0xff).unwrap();
        let d = Dev::new(buf.ptr(), dtype);
        self.keep.push(buf);
        d
    }
    fn down(&self, d: Dev, n: usize) -> Vec<f32> {
        let buf = self.keep.iter().find(|b| b.ptr() == d.ptr).unwrap();
        match d.dtype {
            Dtype::F32 => {
                let mut v = vec![0f32; n];
                self.gpu.download(buf, &mut v).unwrap();
                v
            }
            Dtype::Bf16 => {
                let mut v = vec![half::bf16::ZERO; n];
                self.gpu.download(buf, &mut v).unwrap();
                v.into_iter().map(f32::from).collect()
            }
            Dtype::I32 => {
                let mut v = vec![0i32; n];
                self.gpu.download(buf, &mut v).unwrap();
                v.into_iter().map(|x| x as f32).collect()
            }
        }
    }
}

/// (name, op, broadcast, b, expected).
type BroadcastCase<'a> = (&'static str, Binary, Broadcast, &'a [f32], Vec<f32>);

fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn elementwise_ops_match_cpu() {
    let mut env = Env::new();
    let (r, h) = (37, 300);
    let n = r * h;
    let x = randn(1, n, 1.5);
    let pos: Vec<f32> = x.iter().map(|v| v.abs() + 0.1).collect();
    let unary = [
        (Unary::Neg, UnaryOp::Neg),
        (Unary::Abs, UnaryOp::Abs),
        (Unary::Exp, UnaryOp::Exp),
        (Unary::Log, UnaryOp::Log),
        (Unary::Sqrt, UnaryOp::Sqrt),
        (Unary::Recip, UnaryOp::Recip),
        (Unary::Square, UnaryOp::Square),
        (Unary::Sigmoid, UnaryOp::Sigmoid),
        (Unary::Tanh, UnaryOp::Tanh),
        (Unary::Silu, UnaryOp::Silu),
        (Unary::GeluErf, UnaryOp::GeluErf),
        (Unary::GeluTanh, UnaryOp::GeluTanh),
        (Unary::Relu, UnaryOp::Relu),
        (Unary::Relu2, UnaryOp::Relu2),
        (
            Unary::Affine {
                mul: 0.7,
                add: -0.3,
            },
            UnaryOp::Affine {
                mul: 0.7,
                add: -0.3,
            },
        ),
    ];
    for (g, c) in unary {
        let input = if matches!(c, UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Recip) {
            &pos
        } else {
            &x
        };
        let want = host(&cpu(input, &[r, h]).unary(c).unwrap());
        for dt in [Dtype::F32, Dtype::Bf16] {
            let xi = env.up(input, dt);
            let y = env.out(n, Dtype::F32);
            unsafe { env.k.unary(&env.gpu, g, xi, y, n).unwrap() };
            let want = if dt == Dtype::F32 {
                want.clone()
            } else {
                host(&cpu(&rounded(input), &[r, h]).unary(c).unwrap())
            };
            check(&format!("{c:?} {dt:?}"), &env.down(y, n), &want, 1e-5);
        }
    }
    let b = randn(2, n, 1.0);
    let bpos: Vec<f32> = b.iter().map(|v| v.abs() + 0.5).collect();
    let sig: Vec<f32> = x.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
    let binary = [
        (Binary::Add, BinaryOp::Add),
        (Binary::Sub, BinaryOp::Sub),
        (Binary::Mul, BinaryOp::Mul),
        (Binary::Div, BinaryOp::Div),
        (Binary::Maximum, BinaryOp::Maximum),
        (Binary::Minimum, BinaryOp::Minimum),
        (Binary::SiluBackward, BinaryOp::SiluBackward),
        (Binary::GeluErfBackward, BinaryOp::GeluErfBackward),
        (Binary::GeluTanhBackward, BinaryOp::GeluTanhBackward),
        (Binary::SigmoidBackward, BinaryOp::SigmoidBackward),
        (Binary::TanhBackward, BinaryOp::TanhBackward),
        (Binary::ReluBackward, BinaryOp::ReluBackward),
        (Binary::Relu2Backward, BinaryOp::Relu2Backward),
    ];
    for (g, c) in binary {
        let a = if matches!(c, BinaryOp::SigmoidBackward | BinaryOp::TanhBackward) {
            &sig
        } else {
            &x
        };
        let bb = if c == BinaryOp::Div { &bpos } else { &b };
        let want = host(&cpu(a, &[r, h]).binary(&cpu(bb, &[r, h]), c).unwrap());
        let (ad, bd) = (env.up(a, Dtype::F32), env.up(bb, Dtype::F32));
        let y = env.out(n, Dtype::F32);
        unsafe {
            env.k
                .binary(&env.gpu, g, ad, bd, y, n, Broadcast::None, 1.0)
                .unwrap()
        };
        check(&format!("{c:?}"), &env.down(y, n), &want, 1e-5);
    }
    // broadcasts: add_row, mul_row, mul_col, scale_by; in-place axpy
    let row = randn(3, h, 1.0);
    let col = randn(4, r, 1.0);
    let s = [0.37f32];
    let xt = cpu(&x, &[r, h]);
    let xd = env.up(&x, Dtype::F32);
    let cases: [BroadcastCase<'_>; 4] = [
        (
            "add_row",
            Binary::Add,
            Broadcast::Row(h),
            &row,
            host(&xt.add_row(&cpu(&row, &[h])).unwrap()),
        ),
        (
            "mul_row",
            Binary::Mul,
            Broadcast::Row(h),
            &row,
            host(&xt.mul_row(&cpu(&row, &[h])).unwrap()),
        ),
        (
            "mul_col",
            Binary::Mul,
            Broadcast::Col(h),
            &col,
            host(&xt.mul_col(&cpu(&col, &[r])).unwrap()),
        ),
        (
            "scale_by",
            Binary::Mul,
            Broadcast::Scalar,
            &s,
            host(&xt.scale_by(&cpu(&s, &[])).unwrap()),
        ),
    ];
    for (name, op, bc, bv, want) in cases {
        let bd = env.up(bv, Dtype::F32);
        let y = env.out(n, Dtype::F32);
        unsafe { env.k.binary(&env.gpu, op, xd, bd, y, n, bc, 1.0).unwrap() };
        check(name, &env.down(y, n), &want, 0.0);
    }
    let (ad, bd) = (env.up(&x, Dtype::F32), env.up(&b, Dtype::Bf16));
    unsafe {
        env.k
            .binary(
                &env.gpu,
                Binary::Add,
                ad,
                bd,
                ad,
                n,
                Broadcast::None,
                -0.625,
            )
            .unwrap()
    };
    let mut acc_b = cpu(&x, &[r, h]);
    acc_b.axpy(-0.625, &cpu(&rounded(&b), &[r, h])).unwrap();
    check(
        "axpy in place (bf16 x)",
        &env.down(ad, n),
        &host(&acc_b),
        0.0,
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn binary_vectorised_path_matches_the_scalar_path_bitwise() {
    // bf16 operands of a multiple of 8 elements, 16-byte aligned: the 8-wide path; the same
    // data one element into its buffers (2-byte aligned): the scalar path. Same bits, and
    // the bits of the CPU op on the rounded inputs, rounded once (bf16 output), or as is
    // (f32 output, in place as axpy runs it).
    let mut env = Env::new();
    let n = 8 * 1031;
    let (a, b) = (rounded(&randn(41, n, 1.0)), rounded(&randn(42, n, 2.0)));
    let pad = |v: &[f32]| [&[0.5f32][..], v].concat();
    let bf = |v: Vec<f32>| rounded(&v);
    for (g, c) in [
        (Binary::Add, BinaryOp::Add),
        (Binary::Sub, BinaryOp::Sub),
        (Binary::Mul, BinaryOp::Mul),
    ] {
        let want = bf(host(&cpu(&a, &[n]).binary(&cpu(&b, &[n]), c).unwrap()));
        let (ad, bd, y) = (
            env.up(&a, Dtype::Bf16),
            env.up(&b, Dtype::Bf16),
            env.out(n, Dtype::Bf16),
        );
        let (ap, bp) = (env.up(&pad(&a), Dtype::Bf16), env.up(&pad(&b), Dtype::Bf16));
        let yp = env.out(n + 1, Dtype::Bf16);
        let shift = |d: Dev| Dev::new(d.ptr + 2, Dtype::Bf16);
        unsafe {
            env.k
                .binary(&env.gpu, g, ad, bd, y, n, Broadcast::None, 1.0)
                .unwrap();
            env.k
                .binary(
                    &env.gpu,
                    g,
                    shift(ap),
                    shift(bp),
                    shift(yp),
                    n,
                    Broadcast::None,
                    1.0,
                )
                .unwrap();
        }
        let (vec, scalar) = (env.down(y, n), env.down(yp, n + 1)[1..].to_vec());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&vec), bits(&scalar), "{c:?}: 8-wide vs scalar path");
        assert_eq!(bits(&vec), bits(&want), "{c:?}: vs the CPU op, rounded");
        check(&format!("{c:?} bf16 8-wide"), &vec, &want, 0.0);
    }
    // in place, f32 accumulator += alpha * bf16 (axpy), 8-wide
    let acc = env.up(&a, Dtype::F32);
    let bd = env.up(&b, Dtype::Bf16);
    unsafe {
        env.k
            .binary(
                &env.gpu,
                Binary::Add,
                acc,
                bd,
                acc,
                n,
                Broadcast::None,
                -0.625,
            )
            .unwrap()
    };
    let mut want = cpu(&a, &[n]);
    want.axpy(-0.625, &cpu(&b, &[n])).unwrap();
    check("axpy in place 8-wide", &env.down(acc, n), &host(&want), 0.0);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn masks_casts_and_integer_ops_match_cpu() {
    let mut env = Env::new();
    let n = 5000;
    let x = randn(5, n, 1.0);
    let xt = cpu(&x, &[n]);
    let xd = env.up(&x, Dtype::F32);
    let m = env.out(n, Dtype::F32);
    unsafe {
        env.k
            .compare_scalar(&env.gpu, true, xd, m.ptr, n, 0.2)
            .unwrap()
    };
    check(
        "gt_scalar",
        &env.down(m, n),
        &host(&xt.gt_scalar(0.2).unwrap()),
        0.0,
    );
    let ints: Vec<i32> = (0..n as i32).map(|i| (i * 7919) % 13 - 6).collect();
    let it = Tensor::from_vec_i32(ints.clone(), [n], Device::Cpu).unwrap();
    let id = Dev::i32(env.up_i32(&ints));
    let e = env.out(n, Dtype::F32);
    unsafe {
        env.k
            .compare_scalar(&env.gpu, false, id, e.ptr, n, 3.0)
            .unwrap()
    };
    check(
        "eq_scalar i32",
        &env.down(e, n),
        &host(&it.eq_scalar(3.0).unwrap()),
        0.0,
    );
    let other = randn(6, n, 1.0);
    let od = env.up(&other, Dtype::F32);
    let w = env.out(n, Dtype::F32);
    unsafe { env.k.where_cond(&env.gpu, m, xd, od, w.ptr, n).unwrap() };
    let want = host(
        &xt.gt_scalar(0.2)
            .unwrap()
            .where_cond(&xt, &cpu(&other, &[n]))
            .unwrap(),
    );
    check("where_cond", &env.down(w, n), &want, 0.0);
    // casts: f32 -> bf16 -> f32 equals the CPU's to_dtype round trip
    let b = env.out(n, Dtype::Bf16);
    let back = env.out(n, Dtype::F32);
    unsafe {
        env.k.cast(&env.gpu, xd, b, n).unwrap();
        env.k.cast(&env.gpu, b, back, n).unwrap();
    }
    let want = host(
        &xt.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    );
    check("cast f32->bf16->f32", &env.down(back, n), &want, 0.0);
    let f = env.out(n, Dtype::F32);
    unsafe { env.k.fill(&env.gpu, f, n, 2.5).unwrap() };
    assert!(env.down(f, n).iter().all(|&v| v == 2.5));
    // integer sums and the exclusive prefix sum
    let sum = env.out(n, Dtype::I32);
    unsafe { env.k.add_i32(&env.gpu, id.ptr, id.ptr, sum.ptr, n).unwrap() };
    let want: Vec<f32> = host(&it.add_i32(&it).unwrap().to_dtype(DType::F32).unwrap());
    check("add_i32", &env.down(sum, n), &want, 0.0);
    let counts: Vec<i32> = (0..100).map(|i| (i * 37) % 11).collect();
    let ct = Tensor::from_vec_i32(counts.clone(), [100], Device::Cpu).unwrap();
    let cd = env.up_i32(&counts);
    let cs = env.out(100, Dtype::I32);
    let flag = env.out(1, Dtype::I32);
    unsafe {
        env.k
            .exclusive_cumsum_i32(&env.gpu, cd, cs.ptr, 100, flag.ptr)
            .unwrap()
    };
    let want: Vec<f32> = ct
        .exclusive_cumsum_i32()
        .unwrap()
        .to_host_i32()
        .unwrap()
        .iter()
        .map(|&v| v as f32)
        .collect();
    check("exclusive_cumsum_i32", &env.down(cs, 100), &want, 0.0);
    assert_eq!(env.down(flag, 1), vec![0.0]);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn reductions_softmax_and_topk_match_cpu() {
    let mut env = Env::new();
    let (r, h) = (45, 700);
    let n = r * h;
    let x = randn(7, n, 2.0);
    let xt = cpu(&x, &[r, h]);
    for dt in [Dtype::F32, Dtype::Bf16] {
        let xv = if dt == Dtype::F32 {
            x.clone()
        } else {
            rounded(&x)
        };
        let xt = cpu(&xv, &[r, h]);
        let xd = env.up(&x, dt);
        let cases = [
            (RowReduce::Sum, host(&xt.sum_last_dim().unwrap())),
            (RowReduce::Mean, host(&xt.mean_last_dim().unwrap())),
            (RowReduce::Max, host(&xt.max_last_dim().unwrap())),
            (
                RowReduce::LogSumExp,
                host(&xt.logsumexp_last_dim().unwrap()),
            ),
            (RowReduce::Norm, host(&xt.norm_rows().unwrap())),
        ];
        for (op, want) in cases {
            let y = env.out(r, Dtype::F32);
            unsafe { env.k.reduce_rows(&env.gpu, op, xd, y.ptr, r, h).unwrap() };
            check(&format!("{op:?} {dt:?}"), &env.down(y, r), &want, 1e-6);
        }
        let y = env.out(h, Dtype::F32);
        unsafe { env.k.sum_cols(&env.gpu, xd, y.ptr, r, h).unwrap() };
        check(
            &format!("sum_rows {dt:?}"),
            &env.down(y, h),
            &host(&xt.sum_rows().unwrap()),
            1e-6,
        );
        let all = env.out(1, Dtype::F32);
        unsafe {
            env.k
                .reduce_rows(&env.gpu, RowReduce::SumSquares, xd, all.ptr, 1, n)
                .unwrap()
        };
        check(
            &format!("sum_squares {dt:?}"),
            &env.down(all, 1),
            &host(&xt.sum_squares().unwrap()),
            1e-6,
        );
    }
    let xd = env.up(&x, Dtype::F32);
    let dy = randn(8, n, 1.0);
    let dyd = env.up(&dy, Dtype::F32);
    for log in [false, true] {
        let (y_ref, dx_ref) = if log {
            let y = xt.log_softmax().unwrap();
            let dx = y.log_softmax_backward(&cpu(&dy, &[r, h])).unwrap();
            (host(&y), host(&dx))
        } else {
            let y = xt.softmax().unwrap();
            let dx = y.softmax_backward(&cpu(&dy, &[r, h])).unwrap();
            (host(&y), host(&dx))
        };
        let y = env.out(n, Dtype::F32);
        let dx = env.out(n, Dtype::F32);
        unsafe {
            env.k.softmax_rows(&env.gpu, log, xd, y, r, h).unwrap();
            env.k
                .softmax_rows_backward(&env.gpu, log, y, dyd, dx, r, h)
                .unwrap();
        }
        check(&format!("softmax log={log}"), &env.down(y, n), &y_ref, 1e-6);
        check(
            &format!("softmax_backward log={log}"),
            &env.down(dx, n),
            &dx_ref,
            1e-5,
        );
    }
    // top-k with ties (values rounded to a coarse grid) and k = len
    let (tr, e) = (300, 64);
    let tx: Vec<f32> = randn(9, tr * e, 1.0)
        .iter()
        .map(|v| (v * 4.0).round() / 4.0)
        .collect();
    let tt = cpu(&tx, &[tr, e]);
    let td = env.up(&tx, Dtype::F32);
    for k in [1, 6, e] {
        let (v_ref, i_ref) = tt.topk(k).unwrap();
        let (v, i) = (env.out(tr * k, Dtype::F32), env.out(tr * k, Dtype::I32));
        unsafe { env.k.topk(&env.gpu, td, v.ptr, i.ptr, tr, e, k).unwrap() };
        check(
            &format!("topk values k={k}"),
            &env.down(v, tr * k),
            &host(&v_ref),
            0.0,
        );
        let want: Vec<f32> = i_ref
            .to_host_i32()
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect();
        assert_eq!(env.down(i, tr * k), want, "topk indices k={k}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn index_and_copy_ops_match_cpu() {
    let mut env = Env::new();
    let (m, h, n) = (50, 70, 400);
    let table = randn(10, m * h, 1.0);
    let tt = cpu(&table, &[m, h]);
    let ids: Vec<i32> = (0..n as i32).map(|i| (i * i * 13 + 5) % 45).collect();
    let it = Tensor::from_vec_i32(ids.clone(), [n], Device::Cpu).unwrap();
    let idp = env.up_i32(&ids);
    let err = env.up_i32(&[0; 4]);
    for dt in [Dtype::F32, Dtype::Bf16] {
        let td = env.up(&table, dt);
        let out = env.out(n * h, dt);
        unsafe {
            env.k
                .gather_rows(&env.gpu, (td, m), idp, out.ptr, n, h, err)
                .unwrap()
        };
        let src = if dt == Dtype::F32 {
            table.clone()
        } else {
            rounded(&table)
        };
        let want = host(&cpu(&src, &[m, h]).index_select(&it).unwrap());
        check(
            &format!("index_select {dt:?}"),
            &env.down(out, n * h),
            &want,
            0.0,
        );
    }
    // odd bf16 rows take the 2-byte path
    let odd = randn(11, m * 7, 1.0);
    let od = env.up(&odd, Dtype::Bf16);
    let oo = env.out(n * 7, Dtype::Bf16);
    unsafe {
        env.k
            .gather_rows(&env.gpu, (od, m), idp, oo.ptr, n, 7, err)
            .unwrap()
    };
    let want = host(&cpu(&rounded(&odd), &[m, 7]).index_select(&it).unwrap());
    check(
        "index_select bf16 odd rows",
        &env.down(oo, n * 7),
        &want,
        0.0,
    );
    // deterministic scatter-add with weights: bitwise equal to the CPU
    let src = randn(12, n * h, 1.0);
    let w = randn(13, n, 1.0);
    let want = host(
        &tt.index_add_rows(&it, &cpu(&src, &[n, h]), Some(&cpu(&w, &[n])))
            .unwrap(),
    );
    let dst = env.up(&table, Dtype::F32);
    let (sd, wd) = (env.up(&src, Dtype::F32), env.up(&w, Dtype::F32));
    unsafe {
        env.k
            .index_add_rows(&env.gpu, dst.ptr, (m, h), idp, sd, Some(wd.ptr), n, err)
            .unwrap()
    };
    check(
        "index_add_rows (weights)",
        &env.down(dst, m * h),
        &want,
        0.0,
    );
    // per-row column gather / scatter
    let (rows, e, k) = (90, 16, 4);
    let x = randn(14, rows * e, 1.0);
    let cols: Vec<i32> = (0..rows * k)
        .map(|i| ((i * 5 + i / k) % e) as i32)
        .collect();
    let ct = Tensor::from_vec_i32(cols.clone(), [rows, k], Device::Cpu).unwrap();
    let (xd, cd) = (env.up(&x, Dtype::F32), env.up_i32(&cols));
    let g = env.out(rows * k, Dtype::F32);
    unsafe {
        env.k
            .gather_cols(&env.gpu, xd, cd, g.ptr, rows, e, k, err)
            .unwrap()
    };
    let gref = cpu(&x, &[rows, e]).gather_cols(&ct).unwrap();
    check("gather_cols", &env.down(g, rows * k), &host(&gref), 0.0);
    let sc = env.out(rows * e, Dtype::F32);
    unsafe {
        env.k
            .scatter_cols(&env.gpu, g, cd, sc.ptr, rows, e, k, err)
            .unwrap()
    };
    check(
        "scatter_cols",
        &env.down(sc, rows * e),
        &host(&gref.scatter_cols(&ct, e).unwrap()),
        0.0,
    );
    // permute of a rank-4 tensor and a transpose
    let dims = [3usize, 5, 4, 6];
    let p = randn(15, 360, 1.0);
    let pd = env.up(&p, Dtype::F32);
    let perm = [0usize, 2, 1, 3];
    let po = env.out(360, Dtype::F32);
    unsafe { env.k.permute(&env.gpu, pd, po.ptr, &dims, &perm).unwrap() };
    check(
        "permute 0213",
        &env.down(po, 360),
        &host(&cpu(&p, &dims).permute(&perm).unwrap()),
        0.0,
    );
    let to = env.out(360, Dtype::F32);
    unsafe {
        env.k
            .permute(&env.gpu, pd, to.ptr, &[15, 24], &[1, 0])
            .unwrap()
    };
    check(
        "transpose2d",
        &env.down(to, 360),
        &host(&cpu(&p, &[15, 24]).transpose2d().unwrap()),
        0.0,
    );
}
