//! The CUDA backend against the CPU backend: every op family through the public `Tensor`
//! API, the same fresh random inputs on both devices, f32 results within 1e-5 relative
//! (most bitwise equal), integer results equal, NaN never passes. Needs feature `cuda` and
//! an NVIDIA GPU (`#[ignore]`d: run the test binary with `--ignored` there).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use megamoe_tensor::{
    AdamWStep, BinaryOp, DType, Device, RowGroups, Tensor, UnaryOp, IGNORE_INDEX,
};

const GPU: Device = Device::Cuda(0);

fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "x", shape.to_vec(), std, Device::Cpu).unwrap()
}

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

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

/// `got` (on the GPU) matches `want` (on the CPU): shape, dtype, values within `tol`.
fn same(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.device(), GPU, "{name}: result left the GPU");
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    assert_eq!(got.dtype(), want.dtype(), "{name}: dtype");
    if want.dtype() == DType::I32 {
        assert_eq!(
            got.to_host_i32().unwrap(),
            want.to_host_i32().unwrap(),
            "{name}"
        );
        eprintln!("  {name:<32} equal");
        return;
    }
    let (g, w) = (got.to_host_f32().unwrap(), want.to_host_f32().unwrap());
    if w.is_empty() {
        return;
    }
    let r = rel(&g, &w);
    eprintln!("  {name:<32} rel {r:.3e}");
    assert!(r.is_finite() && r <= tol, "{name}: rel {r:e} > {tol:e}");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn elementwise_scalar_and_reductions_match_cpu() {
    let x = randn(1, &[37, 300], 1.5);
    let pos = x.unary(UnaryOp::Abs).unwrap().add_scalar(0.1).unwrap();
    let b = randn(2, &[37, 300], 1.0);
    let (xg, pg, bg) = (gpu(&x), gpu(&pos), gpu(&b));
    for op in [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Tanh,
        UnaryOp::Silu,
        UnaryOp::GeluErf,
        UnaryOp::Relu2,
    ] {
        same(
            &format!("{op:?}"),
            &xg.unary(op).unwrap(),
            &x.unary(op).unwrap(),
            1e-5,
        );
    }
    same(
        "log",
        &pg.unary(UnaryOp::Log).unwrap(),
        &pos.unary(UnaryOp::Log).unwrap(),
        1e-5,
    );
    for op in [
        BinaryOp::Add,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::SiluBackward,
    ] {
        let (wa, wb) = if op == BinaryOp::Div {
            (&x, &pos)
        } else {
            (&x, &b)
        };
        let (ga, gb) = if op == BinaryOp::Div {
            (&xg, &pg)
        } else {
            (&xg, &bg)
        };
        same(
            &format!("{op:?}"),
            &ga.binary(gb, op).unwrap(),
            &wa.binary(wb, op).unwrap(),
            1e-5,
        );
    }
    same(
        "swiglu",
        &xg.swiglu(&bg).unwrap(),
        &x.swiglu(&b).unwrap(),
        1e-5,
    );
    let dy = randn(3, &[37, 300], 1.0);
    let (dg, du) = Tensor::swiglu_backward(&xg, &bg, &gpu(&dy)).unwrap();
    let (cg, cu) = Tensor::swiglu_backward(&x, &b, &dy).unwrap();
    same("swiglu d_gate", &dg, &cg, 1e-5);
    same("swiglu d_up", &du, &cu, 1e-5);
    let row = randn(4, &[300], 1.0);
    let col = randn(5, &[37], 1.0);
    same(
        "add_row",
        &xg.add_row(&gpu(&row)).unwrap(),
        &x.add_row(&row).unwrap(),
        0.0,
    );
    same(
        "mul_row",
        &xg.mul_row(&gpu(&row)).unwrap(),
        &x.mul_row(&row).unwrap(),
        0.0,
    );
    same(
        "mul_col",
        &xg.mul_col(&gpu(&col)).unwrap(),
        &x.mul_col(&col).unwrap(),
        0.0,
    );
    let s = Tensor::scalar(0.37, Device::Cpu).unwrap();
    same(
        "scale_by",
        &xg.scale_by(&gpu(&s)).unwrap(),
        &x.scale_by(&s).unwrap(),
        0.0,
    );
    let (mut acc_c, mut acc_g) = (x.clone(), xg.clone());
    acc_c.axpy(-0.625, &b).unwrap();
    acc_g.axpy(-0.625, &bg).unwrap();
    same("axpy (copy-on-write)", &acc_g, &acc_c, 0.0);
    same("axpy left its source alone", &xg, &x, 0.0);
    acc_c.scale_by_assign(&s).unwrap();
    acc_g.scale_by_assign(&gpu(&s)).unwrap();
    same("scale_by_assign", &acc_g, &acc_c, 0.0);
    acc_g.fill_in_place(0.5).unwrap();
    acc_c.fill_in_place(0.5).unwrap();
    same("fill_in_place", &acc_g, &acc_c, 0.0);
    let m = x.gt_scalar(0.2).unwrap();
    same("gt_scalar", &xg.gt_scalar(0.2).unwrap(), &m, 0.0);
    same(
        "where_cond",
        &gpu(&m).where_cond(&xg, &bg).unwrap(),
        &m.where_cond(&x, &b).unwrap(),
        0.0,
    );
    let ints =
        Tensor::from_vec_i32((0..64).map(|i| (i * 37) % 11).collect(), [64], Device::Cpu).unwrap();
    let ig = gpu(&ints);
    same(
        "add_i32",
        &ig.add_i32(&ig).unwrap(),
        &ints.add_i32(&ints).unwrap(),
        0.0,
    );
    same(
        "eq_scalar",
        &ig.eq_scalar(3.0).unwrap(),
        &ints.eq_scalar(3.0).unwrap(),
        0.0,
    );
    same(
        "exclusive_cumsum_i32",
        &ig.exclusive_cumsum_i32().unwrap(),
        &ints.exclusive_cumsum_i32().unwrap(),
        0.0,
    );
    same(
        "sum_all",
        &xg.sum_all().unwrap(),
        &x.sum_all().unwrap(),
        1e-6,
    );
    same(
        "mean_all",
        &xg.mean_all().unwrap(),
        &x.mean_all().unwrap(),
        1e-6,
    );
    same("norm", &xg.norm().unwrap(), &x.norm().unwrap(), 1e-6);
    same(
        "sum_last_dim",
        &xg.sum_last_dim().unwrap(),
        &x.sum_last_dim().unwrap(),
        1e-6,
    );
    same(
        "max_last_dim",
        &xg.max_last_dim().unwrap(),
        &x.max_last_dim().unwrap(),
        0.0,
    );
    same(
        "logsumexp_last_dim",
        &xg.logsumexp_last_dim().unwrap(),
        &x.logsumexp_last_dim().unwrap(),
        1e-6,
    );
    same(
        "sum_rows",
        &xg.sum_rows().unwrap(),
        &x.sum_rows().unwrap(),
        1e-6,
    );
    same(
        "norm_rows",
        &xg.norm_rows().unwrap(),
        &x.norm_rows().unwrap(),
        1e-6,
    );
    let bf = x.to_dtype(DType::BF16).unwrap();
    same(
        "to_dtype bf16",
        &xg.to_dtype(DType::BF16).unwrap(),
        &bf,
        0.0,
    );
    same(
        "bf16 input widened",
        &gpu(&bf).unary(UnaryOp::Exp).unwrap(),
        &bf.unary(UnaryOp::Exp).unwrap(),
        1e-5,
    );
    same("deep_copy", &xg.deep_copy().unwrap(), &x, 0.0);
    // a view at an offset: narrow along dim 0 shares the buffer
    same(
        "offset view",
        &xg.narrow(0, 5, 7).unwrap().exp().unwrap(),
        &x.narrow(0, 5, 7).unwrap().exp().unwrap(),
        1e-5,
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn softmax_topk_index_and_copies_match_cpu() {
    let x = randn(6, &[45, 70], 2.0);
    let dy = randn(7, &[45, 70], 1.0);
    let (xg, dg) = (gpu(&x), gpu(&dy));
    let (y, yg) = (x.softmax().unwrap(), xg.softmax().unwrap());
    same("softmax", &yg, &y, 1e-6);
    same(
        "softmax_backward",
        &yg.softmax_backward(&dg).unwrap(),
        &y.softmax_backward(&dy).unwrap(),
        1e-5,
    );
    let (l, lg) = (x.log_softmax().unwrap(), xg.log_softmax().unwrap());
    same("log_softmax", &lg, &l, 1e-6);
    same(
        "log_softmax_backward",
        &lg.log_softmax_backward(&dg).unwrap(),
        &l.log_softmax_backward(&dy).unwrap(),
        1e-5,
    );
    let sc = randn(8, &[6, 20, 20], 1.0);
    let (p, pg) = (
        sc.causal_softmax(0.3).unwrap(),
        gpu(&sc).causal_softmax(0.3).unwrap(),
    );
    same("causal_softmax", &pg, &p, 1e-6);
    let d = randn(9, &[6, 20, 20], 1.0);
    same(
        "causal_softmax_backward",
        &pg.causal_softmax_backward(&gpu(&d), 0.3).unwrap(),
        &p.causal_softmax_backward(&d, 0.3).unwrap(),
        1e-5,
    );
    let (v, i) = x.topk(5).unwrap();
    let (vg, ig) = xg.topk(5).unwrap();
    same("topk values", &vg, &v, 0.0);
    same("topk indices", &ig, &i, 0.0);
    let ids = Tensor::from_vec_i32(
        (0..200).map(|r| (r * r * 7 + 3) % 45).collect(),
        [200],
        Device::Cpu,
    )
    .unwrap();
    let idg = gpu(&ids);
    same(
        "index_select",
        &xg.index_select(&idg).unwrap(),
        &x.index_select(&ids).unwrap(),
        0.0,
    );
    let src = randn(10, &[200, 70], 1.0);
    let w = randn(11, &[200], 1.0);
    same(
        "index_add_rows",
        &xg.index_add_rows(&idg, &gpu(&src), Some(&gpu(&w))).unwrap(),
        &x.index_add_rows(&ids, &src, Some(&w)).unwrap(),
        0.0,
    );
    let cols = Tensor::from_vec_i32(
        (0..45 * 3).map(|i| i * 5 % 70).collect(),
        [45, 3],
        Device::Cpu,
    )
    .unwrap();
    let gc = x.gather_cols(&cols).unwrap();
    same(
        "gather_cols",
        &xg.gather_cols(&gpu(&cols)).unwrap(),
        &gc,
        0.0,
    );
    same(
        "scatter_cols",
        &gpu(&gc).scatter_cols(&gpu(&cols), 70).unwrap(),
        &gc.scatter_cols(&cols, 70).unwrap(),
        0.0,
    );
    let t4 = randn(12, &[3, 5, 4, 6], 1.0);
    let t4g = gpu(&t4);
    same(
        "permute",
        &t4g.permute(&[0, 2, 1, 3]).unwrap(),
        &t4.permute(&[0, 2, 1, 3]).unwrap(),
        0.0,
    );
    same(
        "narrow inner",
        &t4g.narrow(2, 1, 2).unwrap(),
        &t4.narrow(2, 1, 2).unwrap(),
        0.0,
    );
    let t5 = randn(13, &[3, 5, 2, 6], 1.0);
    same(
        "cat dim 2",
        &Tensor::cat(&[&t4g, &gpu(&t5)], 2).unwrap(),
        &Tensor::cat(&[&t4, &t5], 2).unwrap(),
        0.0,
    );
    same(
        "transpose2d",
        &xg.transpose2d().unwrap(),
        &x.transpose2d().unwrap(),
        0.0,
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn matmuls_norm_rope_loss_and_adamw_match_cpu() {
    let a = randn(20, &[33, 40], 1.0);
    let b = randn(21, &[40, 29], 1.0);
    let bt = b.transpose2d().unwrap();
    let at = a.transpose2d().unwrap();
    let (ag, bg, btg, atg) = (gpu(&a), gpu(&b), gpu(&bt), gpu(&at));
    same(
        "matmul",
        &ag.matmul(&bg, false, false).unwrap(),
        &a.matmul(&b, false, false).unwrap(),
        1e-6,
    );
    same(
        "matmul tb",
        &ag.matmul(&btg, false, true).unwrap(),
        &a.matmul(&bt, false, true).unwrap(),
        1e-6,
    );
    same(
        "matmul ta",
        &atg.matmul(&bg, true, false).unwrap(),
        &at.matmul(&b, true, false).unwrap(),
        1e-6,
    );
    let c0 = randn(22, &[33, 29], 1.0);
    let (mut cc, mut cg) = (c0.clone(), gpu(&c0));
    cc.matmul_acc(&a, &b, false, false, 0.5).unwrap();
    cg.matmul_acc(&ag, &bg, false, false, 0.5).unwrap();
    same("matmul_acc", &cg, &cc, 1e-6);
    let ab = a.to_dtype(DType::BF16).unwrap();
    let bb = b.to_dtype(DType::BF16).unwrap();
    same(
        "matmul bf16 x bf16",
        &gpu(&ab).matmul(&gpu(&bb), false, false).unwrap(),
        &ab.matmul(&bb, false, false).unwrap(),
        1e-5,
    );
    same(
        "matmul f32 x bf16",
        &ag.matmul(&gpu(&bb), false, false).unwrap(),
        &a.matmul(&bb, false, false).unwrap(),
        1e-6,
    );
    let q = randn(23, &[6, 20, 16], 1.0);
    let k = randn(24, &[6, 20, 16], 1.0);
    same(
        "bmm",
        &gpu(&q).bmm(&gpu(&k), false, true).unwrap(),
        &q.bmm(&k, false, true).unwrap(),
        1e-6,
    );
    same(
        "bmm shared b",
        &gpu(&q)
            .bmm(&gpu(&b.narrow(0, 0, 16).unwrap()), false, false)
            .unwrap(),
        &q.bmm(&b.narrow(0, 0, 16).unwrap(), false, false).unwrap(),
        1e-6,
    );
    // grouped: 4 packed groups with an empty one, rows past the groups
    let x = randn(25, &[30, 12], 1.0);
    let w = randn(26, &[4, 12, 9], 1.0);
    let groups = RowGroups::from_sizes(&[7, 0, 11, 9], Device::Cpu).unwrap();
    let groups_g = RowGroups::from_sizes(&[7, 0, 11, 9], GPU).unwrap();
    let (xg, wg) = (gpu(&x), gpu(&w));
    let y = x.grouped_matmul(&groups, &w, false).unwrap();
    same(
        "grouped_matmul",
        &xg.grouped_matmul(&groups_g, &wg, false).unwrap(),
        &y,
        1e-6,
    );
    let dy = randn(27, &[30, 9], 1.0);
    same(
        "grouped_matmul_wgrad",
        &Tensor::grouped_matmul_wgrad(&gpu(&dy), &xg, &groups_g).unwrap(),
        &Tensor::grouped_matmul_wgrad(&dy, &x, &groups).unwrap(),
        1e-6,
    );
    // RMSNorm, RoPE, cross-entropy
    let h = randn(28, &[50, 64], 1.0);
    let nw = randn(29, &[64], 1.0);
    let (hg, nwg) = (gpu(&h), gpu(&nw));
    let (y, r) = h.rms_norm(&nw, 1e-5).unwrap();
    let (yg, rg) = hg.rms_norm(&nwg, 1e-5).unwrap();
    same("rms_norm y", &yg, &y, 1e-6);
    same("rms_norm rstd", &rg, &r, 1e-6);
    let d = randn(30, &[50, 64], 1.0);
    let dgpu = gpu(&d);
    same(
        "rms_norm dx",
        &dgpu.rms_norm_backward_input(&hg, &nwg, &rg).unwrap(),
        &d.rms_norm_backward_input(&h, &nw, &r).unwrap(),
        1e-6,
    );
    same(
        "rms_norm dw",
        &dgpu.rms_norm_backward_weight(&hg, &rg).unwrap(),
        &d.rms_norm_backward_weight(&h, &r).unwrap(),
        1e-6,
    );
    let x4 = randn(31, &[2, 25, 2, 32], 1.0);
    same(
        "rope",
        &gpu(&x4).rope(1e4).unwrap(),
        &x4.rope(1e4).unwrap(),
        1e-6,
    );
    same(
        "rope_backward",
        &gpu(&x4).rope_backward(1e4).unwrap(),
        &x4.rope_backward(1e4).unwrap(),
        1e-6,
    );
    let logits = randn(32, &[40, 300], 2.0);
    let tg: Vec<i32> = (0..40)
        .map(|i| {
            if i % 9 == 4 {
                IGNORE_INDEX
            } else {
                i * 31 % 300
            }
        })
        .collect();
    let targets = Tensor::from_vec_i32(tg, [40], Device::Cpu).unwrap();
    let (lc, dc) = logits.cross_entropy(&targets, IGNORE_INDEX).unwrap();
    let (lg, dgr) = gpu(&logits)
        .cross_entropy(&gpu(&targets), IGNORE_INDEX)
        .unwrap();
    same("cross_entropy loss", &lg, &lc, 1e-6);
    same("cross_entropy d_logits", &dgr, &dc, 1e-6);
    // AdamW: three steps, bitwise equal to the CPU op
    let p0 = randn(33, &[1000], 1.0);
    let z = Tensor::zeros([1000], DType::F32, Device::Cpu).unwrap();
    let (mut pc, mut mc, mut vc) = (p0.clone(), z.clone(), z.clone());
    let (mut pg, mut mg, mut vg) = (gpu(&p0), gpu(&z), gpu(&z));
    for t in 1..=3u64 {
        let g = randn(40 + t, &[1000], 0.1);
        let h = AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            t,
        };
        pc.adamw_step(&mut mc, &mut vc, &g, &h).unwrap();
        pg.adamw_step(&mut mg, &mut vg, &gpu(&g), &h).unwrap();
    }
    same("adamw p", &pg, &pc, 0.0);
    same("adamw m", &mg, &mc, 0.0);
    same("adamw v", &vg, &vc, 0.0);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn fused_norm_backward_and_vectorised_norm_rope_match_cpu() {
    // Rows of 520 and 2048 take the vectorised / fused kernels (h % 8 == 0); 100 and 30
    // the scalar kernels and the unfused fallback.
    for (i, &(rows, h)) in [(67, 520), (70, 2048), (33, 100), (5, 30)]
        .iter()
        .enumerate()
    {
        let s = 100 + 10 * i as u64;
        let x = randn(s, &[rows, h], 1.0);
        let w = randn(s + 1, &[h], 1.0);
        let dy = randn(s + 2, &[rows, h], 1.0);
        let res = randn(s + 3, &[rows, h], 1.0);
        let (xg, wg) = (gpu(&x), gpu(&w));
        let (y, r) = x.rms_norm(&w, 1e-5).unwrap();
        let (yg, rg) = xg.rms_norm(&wg, 1e-5).unwrap();
        same(&format!("rms_norm y {h}"), &yg, &y, 1e-6);
        same(&format!("rms_norm rstd {h}"), &rg, &r, 1e-6);
        let want = dy.rms_norm_backward_add(&x, &w, &r, &res, true).unwrap();
        let got = gpu(&dy)
            .rms_norm_backward_add(&xg, &wg, &rg, &gpu(&res), true)
            .unwrap();
        same(
            &format!("rms_norm_backward_add sum {h}"),
            &got.sum,
            &want.sum,
            1e-5,
        );
        same(
            &format!("rms_norm_backward_add act {h}"),
            &got.act,
            &want.sum,
            1e-5,
        );
        same(
            &format!("rms_norm_backward_add d_w {h}"),
            &got.d_w,
            &want.d_w,
            1e-5,
        );
        // The fused sum is the unfused ops' residual + dx.
        let dx = dy.rms_norm_backward_input(&x, &w, &r).unwrap();
        same(
            &format!("rms_norm_backward_add = res + dx {h}"),
            &got.sum,
            &res.add(&dx).unwrap(),
            1e-5,
        );
    }
    // RoPE: head_dim 128 and 64 vectorised (half a multiple of 8), 12 scalar; in both
    // directions.
    for (i, &d) in [128usize, 64, 12].iter().enumerate() {
        let x4 = randn(200 + i as u64, &[2, 37, 3, d], 1.0);
        same(
            &format!("rope d={d}"),
            &gpu(&x4).rope(1e4).unwrap(),
            &x4.rope(1e4).unwrap(),
            1e-5,
        );
        same(
            &format!("rope_backward d={d}"),
            &gpu(&x4).rope_backward(1e4).unwrap(),
            &x4.rope_backward(1e4).unwrap(),
            1e-5,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn constructors_and_host_reads() {
    let z = Tensor::zeros([3, 4], DType::F32, GPU).unwrap();
    assert_eq!(z.device(), GPU);
    assert_eq!(z.to_host_f32().unwrap(), vec![0.0; 12]);
    let f = Tensor::full([5], 7.0, DType::I32, GPU).unwrap();
    assert_eq!(f.to_host_i32().unwrap(), vec![7; 5]);
    let v = Tensor::from_vec_f32((0..6).map(|i| i as f32).collect(), [2, 3], GPU).unwrap();
    assert_eq!(v.to_host_f32().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let before = megamoe_tensor::host_reads();
    let _ = v.exp().unwrap().matmul(&v, false, true).unwrap();
    assert_eq!(
        megamoe_tensor::host_reads(),
        before,
        "device ops read nothing to the host"
    );
    let mixed = Tensor::zeros([2, 3], DType::F32, Device::Cpu).unwrap();
    assert!(
        v.add(&mixed).is_err(),
        "operands on two devices are an error"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn shape_constants_are_one_device_copy_per_content() {
    let a = Tensor::constant_i32(vec![0, 8, 16], [3], GPU).unwrap();
    let b = Tensor::constant_i32(vec![0, 8, 16], [3], GPU).unwrap();
    assert!(a.same_storage(&b), "the second call reuses the first copy");
    assert_eq!(b.to_host_i32().unwrap(), vec![0, 8, 16]);
    let other_shape = Tensor::constant_i32(vec![0, 8, 16], [1, 3], GPU).unwrap();
    let other_values = Tensor::constant_i32(vec![0, 8, 17], [3], GPU).unwrap();
    assert!(!a.same_storage(&other_shape) && !a.same_storage(&other_values));
    assert_eq!(other_values.to_host_i32().unwrap(), vec![0, 8, 17]);
    // An in-place write to a handle copies first: later calls still read the constant.
    let mut w = Tensor::constant_i32(vec![0, 8, 16], [3], GPU).unwrap();
    w.fill_in_place(5.0).unwrap();
    assert!(!w.same_storage(&a));
    assert_eq!(w.to_host_f32().unwrap(), vec![5.0; 3]);
    let c = Tensor::constant_i32(vec![0, 8, 16], [3], GPU).unwrap();
    assert_eq!(c.to_host_i32().unwrap(), vec![0, 8, 16]);
    // Static-capacity groups and host-sized groups: their offsets (and the host sizes)
    // are such constants, so a step's MoE layers upload them once.
    let sizes = Tensor::zeros([4], DType::I32, GPU).unwrap();
    let (s1, s2) = (
        RowGroups::strided(&sizes, 8).unwrap(),
        RowGroups::strided(&sizes, 8).unwrap(),
    );
    assert!(s1.offsets().same_storage(s2.offsets()));
    assert_eq!(s1.offsets().to_host_i32().unwrap(), vec![0, 8, 16, 24]);
    let (h1, h2) = (
        RowGroups::from_sizes(&[3, 0, 5], GPU).unwrap(),
        RowGroups::from_sizes(&[3, 0, 5], GPU).unwrap(),
    );
    assert!(h1.sizes().same_storage(h2.sizes()) && h1.offsets().same_storage(h2.offsets()));
    assert_eq!(h1.sizes().to_host_i32().unwrap(), vec![3, 0, 5]);
    assert_eq!(h1.offsets().to_host_i32().unwrap(), vec![0, 3, 3]);
}
