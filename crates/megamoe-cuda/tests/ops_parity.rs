//! GPU tests: the step kernels of `megamoe_cuda::ops` against megamoe-tensor's CPU ops of
//! the same names, in f32 (≤ 1e-5 relative) and bf16 storage (≤ 1e-2 relative, CPU fed the
//! same bf16-rounded inputs). Fresh random inputs (never zeros), outputs poisoned with NaN
//! before each run, NaN never passes. `#[ignore]`d: run the test binary with `--ignored` on
//! a machine with an NVIDIA GPU.
#![allow(clippy::unwrap_used)]

use megamoe_cuda::{
    AdamWParams, AttentionGrads, AttentionShape, DeviceBuffer, Elem, Gpu, Moments, Ops,
};
use megamoe_tensor::AdamWStep;
use megamoe_tensor::{Device, Tensor};

const NEEDS_GPU: &str = "needs an NVIDIA GPU: run the test binary with --ignored there";

/// ‖got − want‖ / ‖want‖ in f64 (NaN if either side has a NaN).
fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den).sqrt()
}

fn check(name: &str, got: &[f32], want: &[f32], tol: f64) {
    let r = rel(got, want);
    eprintln!("  {name:<24} rel {r:.3e} (tol {tol:.0e})");
    assert!(
        want.iter().any(|&v| v != 0.0),
        "{name}: reference is all zeros"
    );
    assert!(
        r.is_finite() && r <= tol,
        "{name}: rel error {r:e} > {tol:e}"
    );
}

fn randn(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    Tensor::randn_named(seed, name, [n], std, Device::Cpu)
        .unwrap()
        .to_host_f32()
        .unwrap()
}

/// The values the GPU sees when storing `v` in `elem`.
fn stored(v: &[f32], elem: Elem) -> Vec<f32> {
    match elem {
        Elem::F32 => v.to_vec(),
        Elem::Bf16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
    }
}

fn tol(elem: Elem) -> f64 {
    match elem {
        Elem::F32 => 1e-5,
        Elem::Bf16 => 1e-2,
    }
}

fn cpu(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec_f32(v.to_vec(), shape.to_vec(), Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_host_f32().unwrap()
}

/// Uploads `v` as `elem`.
fn up(gpu: &Gpu, v: &[f32], elem: Elem) -> DeviceBuffer {
    let buf = gpu.alloc(v.len() * elem.size()).unwrap();
    match elem {
        Elem::F32 => gpu.upload(&buf, v).unwrap(),
        Elem::Bf16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            gpu.upload(&buf, &h).unwrap()
        }
    }
    buf
}

fn up_i32(gpu: &Gpu, v: &[i32]) -> DeviceBuffer {
    let buf = gpu.alloc(v.len() * 4).unwrap();
    gpu.upload(&buf, v).unwrap();
    buf
}

/// A buffer of `n` elements of `elem`, poisoned with NaN (all bits set).
fn poisoned(gpu: &Gpu, n: usize, elem: Elem) -> DeviceBuffer {
    let buf = gpu.alloc(n * elem.size()).unwrap();
    gpu.memset(&buf, 0xff).unwrap();
    buf
}

fn down(gpu: &Gpu, buf: &DeviceBuffer, n: usize, elem: Elem) -> Vec<f32> {
    match elem {
        Elem::F32 => {
            let mut v = vec![0f32; n];
            gpu.download(buf, &mut v).unwrap();
            v
        }
        Elem::Bf16 => {
            let mut v = vec![half::bf16::ZERO; n];
            gpu.download(buf, &mut v).unwrap();
            v.into_iter().map(f32::from).collect()
        }
    }
}

fn setup(elem: Elem) -> (Gpu, Ops) {
    let mut gpu = Gpu::new(0).expect(NEEDS_GPU);
    let ops = Ops::new(&mut gpu, elem).unwrap();
    eprintln!("{elem:?} on {}", gpu.info().name);
    (gpu, ops)
}

fn rms_norm_case(elem: Elem) {
    let (gpu, ops) = setup(elem);
    let (rows, h, eps) = (67, 520, 1e-5f32);
    let x = stored(&randn(1, "x", rows * h, 1.0), elem);
    let w = stored(&randn(2, "w", h, 1.0), elem);
    let dy = stored(&randn(3, "dy", rows * h, 1.0), elem);
    let (xt, wt, dyt) = (cpu(&x, &[rows, h]), cpu(&w, &[h]), cpu(&dy, &[rows, h]));
    let (y_ref, rstd_ref) = xt.rms_norm(&wt, eps).unwrap();
    let dx_ref = dyt.rms_norm_backward_input(&xt, &wt, &rstd_ref).unwrap();
    let dw_ref = host(&dyt.rms_norm_backward_weight(&xt, &rstd_ref).unwrap());

    let (dx_, dw_, dy_) = (up(&gpu, &x, elem), up(&gpu, &w, elem), up(&gpu, &dy, elem));
    let y = poisoned(&gpu, rows * h, elem);
    let rstd = poisoned(&gpu, rows, Elem::F32);
    ops.rms_norm(&gpu, &dx_, &dw_, &y, &rstd, rows, h, eps)
        .unwrap();
    check(
        "rms_norm y",
        &down(&gpu, &y, rows * h, elem),
        &host(&y_ref),
        tol(elem),
    );
    check(
        "rms_norm rstd",
        &down(&gpu, &rstd, rows, Elem::F32),
        &host(&rstd_ref),
        1e-5,
    );
    let dx = poisoned(&gpu, rows * h, elem);
    ops.rms_norm_backward_input(&gpu, &dy_, &dx_, &dw_, &rstd, &dx, rows, h)
        .unwrap();
    check(
        "rms_norm dx",
        &down(&gpu, &dx, rows * h, elem),
        &host(&dx_ref),
        tol(elem),
    );
    let dw = poisoned(&gpu, h, Elem::F32);
    ops.rms_norm_backward_weight(&gpu, &dy_, &dx_, &rstd, &dw, rows, h, false)
        .unwrap();
    check(
        "rms_norm dw",
        &down(&gpu, &dw, h, Elem::F32),
        &dw_ref,
        tol(elem),
    );
    ops.rms_norm_backward_weight(&gpu, &dy_, &dx_, &rstd, &dw, rows, h, true)
        .unwrap();
    let twice: Vec<f32> = dw_ref.iter().map(|v| 2.0 * v).collect();
    check(
        "rms_norm dw accumulated",
        &down(&gpu, &dw, h, Elem::F32),
        &twice,
        tol(elem),
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn rms_norm_matches_cpu() {
    rms_norm_case(Elem::F32);
    rms_norm_case(Elem::Bf16);
}

fn rope_case(elem: Elem) {
    let (gpu, ops) = setup(elem);
    let (b, t, nh, d, theta) = (2, 300, 3, 64, 10000f32);
    let n = b * t * nh * d;
    let x = stored(&randn(4, "x", n, 1.0), elem);
    let xt = cpu(&x, &[b, t, nh, d]);
    let y_ref = host(&xt.rope(theta).unwrap());
    let dx_ref = host(&xt.rope_backward(theta).unwrap());
    let xb = up(&gpu, &x, elem);
    let y = poisoned(&gpu, n, elem);
    ops.rope(&gpu, &xb, &y, (b, t, nh, d), theta, false)
        .unwrap();
    check("rope fwd", &down(&gpu, &y, n, elem), &y_ref, tol(elem));
    // in place, backward direction
    ops.rope(&gpu, &xb, &xb, (b, t, nh, d), theta, true)
        .unwrap();
    check(
        "rope bwd in place",
        &down(&gpu, &xb, n, elem),
        &dx_ref,
        tol(elem),
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn rope_matches_cpu() {
    rope_case(Elem::F32);
    rope_case(Elem::Bf16);
}

fn cross_entropy_case(elem: Elem) {
    let (gpu, ops) = setup(elem);
    let (n, v, ignore) = (45, 1000, -100);
    let x = stored(&randn(5, "logits", n * v, 3.0), elem);
    let targets: Vec<i32> = (0..n)
        .map(|r| {
            if r % 7 == 3 {
                ignore
            } else {
                ((r * 7919 + 13) % v) as i32
            }
        })
        .collect();
    let tt = Tensor::from_vec_i32(targets.clone(), [n], Device::Cpu).unwrap();
    let (loss_ref, d_ref) = cpu(&x, &[n, v]).cross_entropy(&tt, ignore).unwrap();
    let (loss_ref, d_ref) = (host(&loss_ref), host(&d_ref));
    let xb = up(&gpu, &x, elem);
    let tb = up_i32(&gpu, &targets);
    let d = poisoned(&gpu, n * v, elem);
    let loss = poisoned(&gpu, 1, Elem::F32);
    ops.cross_entropy(&gpu, &xb, &tb, &d, &loss, (n, v), ignore, 0)
        .unwrap();
    check("ce loss", &down(&gpu, &loss, 1, Elem::F32), &loss_ref, 1e-5);
    check(
        "ce d_logits",
        &down(&gpu, &d, n * v, elem),
        &d_ref,
        tol(elem),
    );
    // in place over the logits
    let loss2 = poisoned(&gpu, 1, Elem::F32);
    ops.cross_entropy(&gpu, &xb, &tb, &xb, &loss2, (n, v), ignore, 0)
        .unwrap();
    check(
        "ce loss (in place)",
        &down(&gpu, &loss2, 1, Elem::F32),
        &loss_ref,
        1e-5,
    );
    check(
        "ce d_logits (in place)",
        &down(&gpu, &xb, n * v, elem),
        &d_ref,
        tol(elem),
    );
    // an out-of-range target poisons the loss instead of passing silently
    let mut bad = targets.clone();
    bad[1] = v as i32;
    let xb = up(&gpu, &x, elem);
    let bb = up_i32(&gpu, &bad);
    ops.cross_entropy(&gpu, &xb, &bb, &d, &loss, (n, v), ignore, 0)
        .unwrap();
    assert!(down(&gpu, &loss, 1, Elem::F32)[0].is_nan());
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn cross_entropy_matches_cpu() {
    cross_entropy_case(Elem::F32);
    cross_entropy_case(Elem::Bf16);
}

/// Vocabularies at and past the register-resident kernel's limit (32768 bf16 / 16384 f32
/// values per row) and one not a multiple of its vector width (the scalar kernel).
fn cross_entropy_vocab_case(elem: Elem) {
    let (gpu, ops) = setup(elem);
    let max = if elem == Elem::Bf16 { 32768 } else { 16384 };
    for v in [max, max + 8, 1001] {
        let (n, ignore) = (5, -100);
        let x = stored(&randn(9, "logits", n * v, 3.0), elem);
        let targets: Vec<i32> = vec![0, ignore, (v - 1) as i32, 17, (v / 2) as i32];
        let tt = Tensor::from_vec_i32(targets.clone(), [n], Device::Cpu).unwrap();
        let (loss_ref, d_ref) = cpu(&x, &[n, v]).cross_entropy(&tt, ignore).unwrap();
        let xb = up(&gpu, &x, elem);
        let tb = up_i32(&gpu, &targets);
        let d = poisoned(&gpu, n * v, elem);
        let loss = poisoned(&gpu, 1, Elem::F32);
        ops.cross_entropy(&gpu, &xb, &tb, &d, &loss, (n, v), ignore, 0)
            .unwrap();
        check(
            &format!("ce loss v={v}"),
            &down(&gpu, &loss, 1, Elem::F32),
            &host(&loss_ref),
            1e-5,
        );
        check(
            &format!("ce d_logits v={v}"),
            &down(&gpu, &d, n * v, elem),
            &host(&d_ref),
            tol(elem),
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn cross_entropy_large_vocab_matches_cpu() {
    cross_entropy_vocab_case(Elem::F32);
    cross_entropy_vocab_case(Elem::Bf16);
}

fn embedding_case(elem: Elem) {
    let (gpu, ops) = setup(elem);
    // 700 ids over 90 rows (heavy repeats; rows 80..90 never used), h not a multiple of 256
    let (n, rows, h) = (700, 90, 300);
    let table = stored(&randn(6, "table", rows * h, 1.0), elem);
    let d_out = stored(&randn(7, "d_out", n * h, 1.0), elem);
    let ids: Vec<i32> = (0..n).map(|r| ((r * r * 31 + 7) % 80) as i32).collect();
    let it = Tensor::from_vec_i32(ids.clone(), [n], Device::Cpu).unwrap();
    let out_ref = host(&cpu(&table, &[rows, h]).index_select(&it).unwrap());
    let prior = randn(8, "prior", rows * h, 1.0);
    let acc_ref = host(
        &cpu(&prior, &[rows, h])
            .index_add_rows(&it, &cpu(&d_out, &[n, h]), None)
            .unwrap(),
    );
    let fresh_ref = host(
        &Tensor::zeros([rows, h], megamoe_tensor::DType::F32, Device::Cpu)
            .unwrap()
            .index_add_rows(&it, &cpu(&d_out, &[n, h]), None)
            .unwrap(),
    );
    let (tb, ib, db) = (
        up(&gpu, &table, elem),
        up_i32(&gpu, &ids),
        up(&gpu, &d_out, elem),
    );
    let out = poisoned(&gpu, n * h, elem);
    ops.embedding(&gpu, &tb, &ib, &out, (n, rows, h)).unwrap();
    check(
        "embedding",
        &down(&gpu, &out, n * h, elem),
        &out_ref,
        tol(elem).min(1e-6),
    );
    let dt = up(&gpu, &prior, Elem::F32);
    ops.embedding_backward(&gpu, &db, &ib, &dt, (n, rows, h), true)
        .unwrap();
    let got = down(&gpu, &dt, rows * h, Elem::F32);
    check("embedding bwd (acc)", &got, &acc_ref, 1e-5);
    let dt2 = poisoned(&gpu, rows * h, Elem::F32);
    ops.embedding_backward(&gpu, &db, &ib, &dt2, (n, rows, h), false)
        .unwrap();
    let fresh = down(&gpu, &dt2, rows * h, Elem::F32);
    check("embedding bwd (fresh)", &fresh, &fresh_ref, 1e-5);
    assert!(
        fresh[80 * h..].iter().all(|&v| v == 0.0),
        "unused rows must be 0"
    );
    // deterministic: a second run gives the same bits
    let dt3 = poisoned(&gpu, rows * h, Elem::F32);
    ops.embedding_backward(&gpu, &db, &ib, &dt3, (n, rows, h), false)
        .unwrap();
    let again = down(&gpu, &dt3, rows * h, Elem::F32);
    assert!(fresh
        .iter()
        .zip(&again)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn embedding_matches_cpu_and_is_deterministic() {
    embedding_case(Elem::F32);
    embedding_case(Elem::Bf16);
}

fn attention_case(elem: Elem) {
    let (gpu, ops) = setup(elem);
    let s = AttentionShape {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq: 40,
        head_dim: 32,
    };
    let (b, nh, nkv, t, d) = (s.batch, s.heads, s.kv_heads, s.seq, s.head_dim);
    let scale = 1.0 / (d as f32).sqrt();
    let q = stored(&randn(9, "q", s.q_elems(), 1.0), elem);
    let k = stored(&randn(10, "k", s.kv_elems(), 1.0), elem);
    let v = stored(&randn(11, "v", s.kv_elems(), 1.0), elem);
    let d_o = stored(&randn(12, "d_o", s.q_elems(), 1.0), elem);
    // CPU reference as megamoe-model computes it: repeat KV heads, bmm, causal softmax.
    let rows: Vec<i32> = (0..b * nh)
        .map(|r| ((r / nh) * nkv + (r % nh) / (nh / nkv)) as i32)
        .collect();
    let rows = Tensor::from_vec_i32(rows, [b * nh], Device::Cpu).unwrap();
    let rep = |x: &[f32]| {
        cpu(x, &[b * nkv, t * d])
            .index_select(&rows)
            .unwrap()
            .reshape([b * nh, t, d])
            .unwrap()
    };
    let reduce = |x: &Tensor| {
        host(
            &Tensor::zeros([b * nkv, t * d], megamoe_tensor::DType::F32, Device::Cpu)
                .unwrap()
                .index_add_rows(&rows, &x.reshape([b * nh, t * d]).unwrap(), None)
                .unwrap(),
        )
    };
    let (qt, kt, vt, dot) = (
        cpu(&q, &[b * nh, t, d]),
        rep(&k),
        rep(&v),
        cpu(&d_o, &[b * nh, t, d]),
    );
    let p_ref = qt
        .bmm(&kt, false, true)
        .unwrap()
        .causal_softmax(scale)
        .unwrap();
    let o_ref = p_ref.bmm(&vt, false, false).unwrap();
    let dv_ref = reduce(&p_ref.bmm(&dot, true, false).unwrap());
    let d_p = dot.bmm(&vt, false, true).unwrap();
    let d_s = p_ref.causal_softmax_backward(&d_p, scale).unwrap();
    let dq_ref = host(&d_s.bmm(&kt, false, false).unwrap());
    let dk_ref = reduce(&d_s.bmm(&qt, true, false).unwrap());

    let (qb, kb, vb, db) = (
        up(&gpu, &q, elem),
        up(&gpu, &k, elem),
        up(&gpu, &v, elem),
        up(&gpu, &d_o, elem),
    );
    let o = poisoned(&gpu, s.q_elems(), elem);
    let p = poisoned(&gpu, s.probs_elems(), elem);
    ops.attention(&gpu, s, &qb, &kb, &vb, &o, &p, scale)
        .unwrap();
    check(
        "attention probs",
        &down(&gpu, &p, s.probs_elems(), elem),
        &host(&p_ref),
        tol(elem),
    );
    check(
        "attention o",
        &down(&gpu, &o, s.q_elems(), elem),
        &host(&o_ref),
        tol(elem),
    );
    let (dq, dk, dv) = (
        poisoned(&gpu, s.q_elems(), elem),
        poisoned(&gpu, s.kv_elems(), elem),
        poisoned(&gpu, s.kv_elems(), elem),
    );
    let grads = AttentionGrads {
        dq: &dq,
        dk: &dk,
        dv: &dv,
    };
    ops.attention_backward(&gpu, s, &db, &qb, &kb, &vb, &p, grads, scale)
        .unwrap();
    check(
        "attention dq",
        &down(&gpu, &dq, s.q_elems(), elem),
        &dq_ref,
        tol(elem),
    );
    check(
        "attention dk",
        &down(&gpu, &dk, s.kv_elems(), elem),
        &dk_ref,
        tol(elem),
    );
    check(
        "attention dv",
        &down(&gpu, &dv, s.kv_elems(), elem),
        &dv_ref,
        tol(elem),
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn causal_gqa_attention_matches_cpu() {
    attention_case(Elem::F32);
    attention_case(Elem::Bf16);
}

fn adamw_case(elem: Elem) {
    let (gpu, ops) = setup(elem);
    let n = 5000;
    let p0 = randn(13, "p", n, 1.0);
    let mut pt = cpu(&p0, &[n]);
    let mut mt = cpu(&vec![0.0; n], &[n]);
    let mut vt = cpu(&vec![0.0; n], &[n]);
    let (pb, mb, vb) = (
        up(&gpu, &p0, Elem::F32),
        up(&gpu, &vec![0.0; n], Elem::F32),
        up(&gpu, &vec![0.0; n], Elem::F32),
    );
    let copy = poisoned(&gpu, n, elem);
    for step in 1..=3u64 {
        let g = stored(&randn(100 + step, "g", n, 0.1), elem);
        let h = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            t: step,
        };
        pt.adamw_step(&mut mt, &mut vt, &cpu(&g, &[n]), &h).unwrap();
        let hp = AdamWParams {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            t: h.t,
        };
        let gb = up(&gpu, &g, elem);
        ops.adamw(
            &gpu,
            &pb,
            &mb,
            &vb,
            &gb,
            Some(&copy),
            (n, Moments::F32),
            &hp,
        )
        .unwrap();
    }
    let (p_ref, m_ref, v_ref) = (host(&pt), host(&mt), host(&vt));
    let p = down(&gpu, &pb, n, Elem::F32);
    check("adamw p", &p, &p_ref, 1e-6);
    check("adamw m", &down(&gpu, &mb, n, Elem::F32), &m_ref, 1e-6);
    check("adamw v", &down(&gpu, &vb, n, Elem::F32), &v_ref, 1e-6);
    let same = p
        .iter()
        .zip(&p_ref)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    eprintln!("  adamw p bit-identical to the CPU op: {same}/{n}");
    assert_eq!(
        down(&gpu, &copy, n, elem),
        stored(&p, elem),
        "copy = stored(p)"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn adamw_matches_cpu() {
    adamw_case(Elem::F32);
    adamw_case(Elem::Bf16);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn bad_shapes_and_short_buffers_are_named_errors() {
    let (gpu, ops) = setup(Elem::F32);
    let buf = gpu.alloc(4096).unwrap();
    let s = AttentionShape {
        batch: 1,
        heads: 3,
        kv_heads: 2,
        seq: 4,
        head_dim: 8,
    };
    let e = ops
        .attention(&gpu, s, &buf, &buf, &buf, &buf, &buf, 1.0)
        .unwrap_err();
    assert!(e.to_string().contains("kv_heads"), "{e}");
    let e = ops
        .rms_norm(&gpu, &buf, &buf, &buf, &buf, 64, 64, 1e-5)
        .unwrap_err();
    assert!(e.to_string().contains("rms_norm x"), "{e}");
    let e = ops
        .rope(&gpu, &buf, &buf, (1, 2, 1, 3), 1e4, false)
        .unwrap_err();
    assert!(e.to_string().contains("head_dim"), "{e}");
}
