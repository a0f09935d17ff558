//! The CUDA backend's MoE routing and capacity families against the CPU backend: the same
//! fresh random routing (real and null slots, skewed experts, tied gates) on both devices;
//! ids, keeps, layouts and counts equal, f32 results within 1e-6 relative; no host read in
//! static-capacity ops; bad ids reported by the device check at the next read, not a fault.
//! Needs feature `cuda` and an NVIDIA GPU (`#[ignore]`d: run the test binary with
//! `--ignored --test-threads=1` there; `host_reads` is a process-wide counter).
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{rand_t, rand_vec};
use megamoe_tensor::ops::routing::KeepOrder;
use megamoe_tensor::{DType, Device, Error, RowGroups, Tensor, IGNORE_INDEX};

const GPU: Device = Device::Cuda(0);

fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// `got` (GPU) equals `want` (CPU): shape, dtype, i32 exactly, f32 within `tol` relative
/// (L2), no NaN.
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
        eprintln!("  {name:<28} equal");
        return;
    }
    let (g, w) = (got.to_host_f32().unwrap(), want.to_host_f32().unwrap());
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in g.iter().zip(&w) {
        assert!(!a.is_nan() || b.is_nan(), "{name}: NaN");
        if a.is_infinite() && a == b {
            continue;
        }
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    let r = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    eprintln!("  {name:<28} rel {r:.3e}");
    assert!(r.is_finite() && r <= tol, "{name}: rel {r:e} > {tol:e}");
}

/// A random routing of `t` tokens with `k` slots over a pool of `pool` slots (`e` real):
/// distinct slots per token, skewed towards low experts; gates in steps of 1/8 (ties).
fn routing(seed: u64, t: usize, k: usize, e: usize, pool: usize) -> (Tensor, Tensor) {
    let u = rand_vec(seed, t * k * 4);
    let mut slots = Vec::with_capacity(t * k);
    let mut gates = Vec::with_capacity(t * k);
    for tok in 0..t {
        let mut mine: Vec<i32> = Vec::new();
        let mut q = 0;
        while mine.len() < k {
            let v = (u[(tok * k * 4 + q) % u.len()] + 1.0) / 2.0;
            q += 1;
            // skew: squared uniform picks low ids more often
            let s = ((v * v * pool as f32) as usize).min(pool - 1) as i32;
            let s = if mine.contains(&s) {
                (0..pool as i32).find(|c| !mine.contains(c)).unwrap()
            } else {
                s
            };
            mine.push(s);
        }
        for &s in &mine {
            slots.push(s);
            let g = ((u[(tok * 7 + s as usize) % u.len()] + 1.0) * 4.0).floor() / 8.0;
            gates.push(if (s as usize) < e { g } else { 0.0 });
        }
    }
    (
        Tensor::from_vec_i32(slots, [t, k], Device::Cpu).unwrap(),
        Tensor::from_vec_f32(gates, [t, k], Device::Cpu).unwrap(),
    )
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn router_helpers_match_cpu() {
    let (t, e) = (300, 16);
    let sel = rand_t(1, &[t, e]);
    for (g, m) in [(4, 2), (8, 3), (16, 16), (2, 1)] {
        same(
            &format!("group_limited_mask {g}/{m}"),
            &gpu(&sel).group_limited_mask(g, m).unwrap(),
            &sel.group_limited_mask(g, m).unwrap(),
            0.0,
        );
    }
    let zn = rand_t(2, &[t, 1]);
    let pool = sel.expand_null_slots(&zn, 5).unwrap();
    same(
        "expand_null_slots",
        &gpu(&sel).expand_null_slots(&gpu(&zn), 5).unwrap(),
        &pool,
        0.0,
    );
    let (dz, dn) = pool.reduce_null_slots(e).unwrap();
    let (gz, gn) = gpu(&pool).reduce_null_slots(e).unwrap();
    same("reduce_null_slots d_z", &gz, &dz, 0.0);
    same("reduce_null_slots d_null", &gn, &dn, 1e-7);
    let (idx, gates) = routing(3, t, 4, e, e + 3);
    same(
        "real_slot_mask",
        &gpu(&idx).real_slot_mask(e).unwrap(),
        &idx.real_slot_mask(e).unwrap(),
        0.0,
    );
    let g = rand_t(4, &[t, 4]).abs().unwrap();
    let dn = rand_t(5, &[t, 4]);
    same(
        "normalize_rows",
        &gpu(&g).normalize_rows(1e-20).unwrap(),
        &g.normalize_rows(1e-20).unwrap(),
        1e-7,
    );
    same(
        "normalize_rows_backward",
        &gpu(&g).normalize_rows_backward(&gpu(&dn), 1e-20).unwrap(),
        &g.normalize_rows_backward(&dn, 1e-20).unwrap(),
        1e-7,
    );
    let counts = idx.slot_counts(None, e + 3, t).unwrap();
    same(
        "slot_counts",
        &gpu(&idx).slot_counts(None, e + 3, t).unwrap(),
        &counts,
        0.0,
    );
    let keep = idx
        .capacity_keep(&gates, e, Some(40), KeepOrder::HighestGate)
        .unwrap();
    same(
        "slot_counts per segment, kept",
        &gpu(&idx).slot_counts(Some(&gpu(&keep)), e + 3, 50).unwrap(),
        &idx.slot_counts(Some(&keep), e + 3, 50).unwrap(),
        0.0,
    );
    let real = counts.narrow(1, 0, e).unwrap().reshape([e]).unwrap();
    for centre in [false, true] {
        same(
            "expert_bias_step",
            &gpu(&real).expert_bias_step(0.001, centre).unwrap(),
            &real.expert_bias_step(0.001, centre).unwrap(),
            0.0,
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn capacity_and_layouts_match_cpu() {
    let (t, k, e, d) = (600, 4, 8, 48);
    // 3 null copies in the pool; skewed experts; gates with ties
    let (idx, gates) = routing(7, t, k, e, e + 3);
    let (ig, gg) = (gpu(&idx), gpu(&gates));
    let x = rand_t(8, &[t, d]);
    let xg = gpu(&x);
    for cap in [None, Some(1), Some(150), Some(300), Some(10_000)] {
        for order in [KeepOrder::HighestGate, KeepOrder::Earliest] {
            let keep = idx.capacity_keep(&gates, e, cap, order).unwrap();
            let kg = ig.capacity_keep(&gg, e, cap, order).unwrap();
            same(&format!("capacity_keep {cap:?} {order:?}"), &kg, &keep, 0.0);
            // packed layout (dropless path)
            let p = idx.sort_by_expert(&keep, e).unwrap();
            let pg = ig.sort_by_expert(&kg, e).unwrap();
            same("sort_by_expert token", &pg.token, &p.token, 0.0);
            same(
                "sort_by_expert assignment",
                &pg.assignment,
                &p.assignment,
                0.0,
            );
            same("sort_by_expert counts", &pg.counts, &p.counts, 0.0);
            same("sort_by_expert slot_row", &pg.slot_row, &p.slot_row, 0.0);
            let Some(c) = cap else { continue };
            let c = c.min(t * k);
            // static layout
            let before = megamoe_tensor::host_reads();
            let (buf_g, sp_g) = xg.permute_to_capacity(&ig, &kg, e, c).unwrap();
            let reads = megamoe_tensor::host_reads() - before;
            assert_eq!(reads, 0, "the static permute reads nothing to the host");
            let (buf, sp) = x.permute_to_capacity(&idx, &keep, e, c).unwrap();
            same("capacity slot_row", &sp_g.slot_row, &sp.slot_row, 0.0);
            same("capacity row_token", &sp_g.row_token, &sp.row_token, 0.0);
            same("capacity counts", &sp_g.counts, &sp.counts, 0.0);
            same("permute_to_capacity rows", &buf_g, &buf, 0.0);
            let w = gates.clone();
            same(
                "combine_slots weighted",
                &buf_g.combine_slots(&sp_g.slot_row, Some(&gg)).unwrap(),
                &buf.combine_slots(&sp.slot_row, Some(&w)).unwrap(),
                0.0,
            );
            same(
                "combine_slots unweighted",
                &buf_g.combine_slots(&sp_g.slot_row, None).unwrap(),
                &buf.combine_slots(&sp.slot_row, None).unwrap(),
                0.0,
            );
            let dy = rand_t(9, &[t, d]);
            let (dr, dw) = buf.combine_slots_backward(&dy, &sp.slot_row, &w).unwrap();
            let (drg, dwg) = buf_g
                .combine_slots_backward(&gpu(&dy), &sp_g.slot_row, &gg)
                .unwrap();
            same("combine_slots_backward d_rows", &drg, &dr, 0.0);
            same("combine_slots_backward d_w", &dwg, &dw, 1e-7);
            // pad / unpad of the packed rows
            let packed = x.index_select(&p.token).unwrap();
            let padded = packed.pad_groups(&p.counts, c).unwrap();
            let pg_rows = gpu(&packed).pad_groups(&pg.counts, c).unwrap();
            same("pad_groups", &pg_rows, &padded, 0.0);
            let r = packed.dims()[0];
            same(
                "unpad_groups",
                &pg_rows.unpad_groups(&pg.counts, c, r).unwrap(),
                &padded.unpad_groups(&p.counts, c, r).unwrap(),
                0.0,
            );
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn strided_grouped_matmuls_match_cpu_without_host_reads() {
    let (g, c, h, f) = (5, 24, 40, 56);
    let sizes = vec![24, 0, 7, 13, 1];
    let st = Tensor::from_vec_i32(sizes, [g], Device::Cpu).unwrap();
    // non-zero pad rows: the op must ignore them
    let x = rand_t(11, &[g * c + 3, h]);
    let w = rand_t(12, &[g, f, h]);
    let dy = rand_t(13, &[g * c + 3, f]);
    let groups = RowGroups::strided(&st, c).unwrap();
    let gg = RowGroups::strided(&gpu(&st), c).unwrap();
    let (xg, wg, dyg) = (gpu(&x), gpu(&w), gpu(&dy));
    let before = megamoe_tensor::host_reads();
    let y_g = xg.grouped_matmul(&gg, &wg, true).unwrap();
    let dx_g = dyg.grouped_matmul(&gg, &wg, false).unwrap();
    let mut acc_g = gpu(&rand_t(14, &[g * c + 3, h]));
    acc_g
        .grouped_matmul_acc(&dyg, &gg, &wg, false, 0.5)
        .unwrap();
    let dw_g = Tensor::grouped_matmul_wgrad(&dyg, &xg, &gg).unwrap();
    let mut dwacc_g = gpu(&rand_t(15, &[g, f, h]));
    dwacc_g
        .grouped_matmul_wgrad_acc(&dyg, &xg, &gg, 1.0)
        .unwrap();
    assert_eq!(
        megamoe_tensor::host_reads(),
        before,
        "strided grouped matmuls read nothing to the host"
    );
    same(
        "strided grouped_matmul",
        &y_g,
        &x.grouped_matmul(&groups, &w, true).unwrap(),
        1e-6,
    );
    same(
        "strided grouped_matmul (w)",
        &dx_g,
        &dy.grouped_matmul(&groups, &w, false).unwrap(),
        1e-6,
    );
    let mut acc = rand_t(14, &[g * c + 3, h]);
    acc.grouped_matmul_acc(&dy, &groups, &w, false, 0.5)
        .unwrap();
    same("strided grouped_matmul_acc", &acc_g, &acc, 1e-6);
    same(
        "strided grouped_matmul_wgrad",
        &dw_g,
        &Tensor::grouped_matmul_wgrad(&dy, &x, &groups).unwrap(),
        1e-6,
    );
    let mut dwacc = rand_t(15, &[g, f, h]);
    dwacc
        .grouped_matmul_wgrad_acc(&dy, &x, &groups, 1.0)
        .unwrap();
    same("strided grouped_matmul_wgrad_acc", &dwacc_g, &dwacc, 1e-6);
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn bad_ids_are_reported_at_the_next_read() {
    let x = gpu(&rand_t(21, &[10, 8]));
    let rows = Tensor::from_vec_i32(vec![0, -1, 12, 3], [4], GPU).unwrap();
    let out = x.gather_rows_or_zero(&rows).unwrap(); // queued: no fault, no read
    let err = out.to_host_f32().unwrap_err().to_string();
    eprintln!("  {err}");
    assert!(err.contains("12"), "names the bad id: {err}");
    // the record is cleared: the next read succeeds
    let ok = x.gather_rows_or_zero(&Tensor::from_vec_i32(vec![1, -1], [2], GPU).unwrap());
    assert_eq!(ok.unwrap().to_host_f32().unwrap().len(), 16);
    let idx = Tensor::from_vec_i32(vec![0, 1, 2, 9], [2, 2], GPU).unwrap();
    let counts = idx.slot_counts(None, 4, 2).unwrap();
    let err = counts.to_host_f32().unwrap_err().to_string();
    eprintln!("  {err}");
    assert!(err.contains("slot_counts"), "names the op: {err}");
    // over capacity: 3 kept assignments of expert 0 with capacity 2
    let idx = Tensor::from_vec_i32(vec![0, 0, 0], [3, 1], GPU).unwrap();
    let keep = Tensor::full([3, 1], 1.0, DType::F32, GPU).unwrap();
    let p = idx.capacity_permutation(&keep, 2, 2).unwrap();
    let err = p.slot_row.to_host_i32().unwrap_err().to_string();
    eprintln!("  {err}");
    assert!(err.contains("capacity"), "names the rule: {err}");
}

/// Highest-gate capacity at scale against the CPU: one expert with thousands of assignments
/// (several tiles of the device select), one whose every gate ties (thousands of equal
/// gates), ±0 gates (equal), negative gates, null slots and empty experts; the GPU keeps
/// exactly the CPU's set, and each expert keeps min(count, capacity).
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn highest_gate_capacity_keeps_the_cpu_set_on_ties_skew_and_empty_experts() {
    let (t, k, e) = (8192, 4, 32);
    let u = rand_vec(31, t * k * 2);
    let unit = |i: usize| (u[i] + 1.0) / 2.0; // [0, 1)
    let (mut slots, mut gates) = (Vec::with_capacity(t * k), Vec::with_capacity(t * k));
    for tok in 0..t {
        for j in 0..k {
            let (v, w) = (unit((tok * k + j) * 2), unit((tok * k + j) * 2 + 1));
            let step = (w * 16.0).floor() / 16.0; // 16 levels: ties everywhere
                                                  // columns use disjoint slot ranges (distinct slots per token); 20..32 stay empty
            let (slot, gate) = match j {
                0 if v < 0.6 => (0, step),                // skew: expert 0 ≈ 4900 rows
                0 => (1 + (v * 100.0) as i32 % 4, step),  // experts 1..4
                1 if v < 0.5 => (5, 0.25),                // expert 5: every gate equal
                1 => (6 + (v * 100.0) as i32 % 4, -step), // experts 6..9: gates <= 0
                2 if v < 0.3 => (10, if tok % 2 == 0 { 0.0 } else { -0.0 }),
                2 => (11 + (v * 100.0) as i32 % 9, step), // experts 11..19
                _ => (if v < 0.5 { 32 } else { 33 }, 0.0), // null slots
            };
            slots.push(slot);
            gates.push(gate);
        }
    }
    let mut count = vec![0usize; e];
    for &s in &slots {
        if (s as usize) < e {
            count[s as usize] += 1;
        }
    }
    assert!(count[0] > 4000 && count[5] > 3000 && count[10] > 2000 && count[25] == 0);
    let idx = Tensor::from_vec_i32(slots.clone(), [t, k], Device::Cpu).unwrap();
    let g = Tensor::from_vec_f32(gates, [t, k], Device::Cpu).unwrap();
    let (ig, gg) = (gpu(&idx), gpu(&g));
    for cap in [0, 1, 7, 100, 1000, 1500, 3000, 4500, 40_000] {
        let want = idx
            .capacity_keep(&g, e, Some(cap), KeepOrder::HighestGate)
            .unwrap()
            .to_host_f32()
            .unwrap();
        let got = ig
            .capacity_keep(&gg, e, Some(cap), KeepOrder::HighestGate)
            .unwrap()
            .to_host_f32()
            .unwrap();
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "capacity {cap}: {diff} keeps differ from the CPU");
        let mut kept = vec![0usize; e];
        for (&s, &kv) in slots.iter().zip(&got) {
            assert!(kv == 0.0 || kv == 1.0);
            if kv == 1.0 {
                kept[s as usize] += 1;
            }
        }
        let want_kept: Vec<usize> = count.iter().map(|&c| c.min(cap)).collect();
        assert_eq!(kept, want_kept, "capacity {cap}: kept per expert");
        eprintln!("  capacity_keep highest gate, capacity {cap:<6} equal");
    }
}

/// The deterministic scatter-add at scale against the CPU, bitwise: destinations past 256
/// and 65 536 (two and three radix passes), one destination taking a third of the sources
/// (its segment spans many sort blocks), weighted and bf16 sources, one-column rows.
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn index_add_rows_at_scale_is_bitwise_the_cpu() {
    let u = rand_vec(41, 70_000);
    for (m, n, row) in [
        (5000, 20_000, 96),
        (70_000, 65_536, 1),
        (33, 65_536, 1),
        (1, 3000, 40),
    ] {
        let ids: Vec<i32> = (0..n)
            .map(|i| {
                let v = (u[i % u.len()] + 1.0) / 2.0;
                if v < 0.33 {
                    (m / 2) as i32
                } else {
                    ((v * 1e6) as usize % m) as i32
                }
            })
            .collect();
        let it = Tensor::from_vec_i32(ids, [n], Device::Cpu).unwrap();
        let dst = rand_t(42, &[m, row]);
        let src = rand_t(43, &[n, row]);
        let w = rand_t(44, &[n]);
        let want = dst.index_add_rows(&it, &src, Some(&w)).unwrap();
        let got = gpu(&dst)
            .index_add_rows(&gpu(&it), &gpu(&src), Some(&gpu(&w)))
            .unwrap();
        let (a, b) = (got.to_host_f32().unwrap(), want.to_host_f32().unwrap());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "index_add_rows m={m} n={n} row={row}: not bitwise the CPU"
        );
        // bf16 sources, unweighted, accumulated in place
        let sb = src.to_dtype(DType::BF16).unwrap();
        let mut want = dst.clone();
        want.index_add_rows_acc(&it, &sb, None).unwrap();
        let mut got = gpu(&dst);
        got.index_add_rows_acc(&gpu(&it), &gpu(&sb), None).unwrap();
        let (a, b) = (got.to_host_f32().unwrap(), want.to_host_f32().unwrap());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "index_add_rows_acc bf16 m={m} n={n} row={row}: not bitwise the CPU"
        );
        eprintln!("  index_add_rows m={m:<6} n={n:<6} row={row:<3} bitwise equal");
    }
}

/// Every index op checks its ids on the device: an out-of-range id is an `IndexOutOfRange`
/// error naming the op, the id, its position and the bound at the next read (no fault, no
/// host read in the op), and the record is cleared after it.
#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn out_of_range_index_op_ids_are_named_errors_at_the_next_read() {
    let x = gpu(&rand_t(51, &[6, 5]));
    let ids = |v: Vec<i32>| Tensor::from_vec_i32(v.clone(), [v.len()], GPU).unwrap();
    let expect =
        |r: Result<Vec<f32>, Error>, op: &str, index: i64, position: usize, bound: usize| {
            let err = r.expect_err(op);
            eprintln!("  {err}");
            match err {
                Error::IndexOutOfRange {
                    op: o,
                    index: i,
                    position: p,
                    bound: b,
                } => assert_eq!((o, i, p, b), (op, index, position, bound)),
                other => panic!("{op}: expected IndexOutOfRange, got {other:?}"),
            }
        };
    let before = megamoe_tensor::host_reads();
    let sel = x.index_select(&ids(vec![0, 5, 6, 1])).unwrap();
    assert_eq!(
        megamoe_tensor::host_reads(),
        before,
        "no host read in the op"
    );
    expect(sel.to_host_f32(), "index_select", 6, 2, 6);
    assert_eq!(
        x.index_select(&ids(vec![5, 0]))
            .unwrap()
            .to_host_f32()
            .unwrap()
            .len(),
        10
    );
    let src = gpu(&rand_t(52, &[3, 5]));
    let added = x.index_add_rows(&ids(vec![1, -3, 2]), &src, None).unwrap();
    expect(added.to_host_f32(), "index_add_rows", -3, 1, 6);
    let cols = Tensor::from_vec_i32(vec![0, 4, 5, 1], [2, 2], GPU).unwrap();
    let two = gpu(&rand_t(53, &[2, 5]));
    expect(
        two.gather_cols(&cols).unwrap().to_host_f32(),
        "gather_cols",
        5,
        2,
        5,
    );
    let vals = gpu(&rand_t(54, &[2, 2]));
    expect(
        vals.scatter_cols(&cols, 5).unwrap().to_host_f32(),
        "scatter_cols",
        5,
        2,
        5,
    );
    let logits = gpu(&rand_t(55, &[3, 7]));
    let targets = ids(vec![2, IGNORE_INDEX, 7]);
    let (loss, _) = logits.cross_entropy(&targets, IGNORE_INDEX).unwrap();
    expect(loss.to_host_f32(), "cross_entropy", 7, 2, 7);
    let (loss, _) = logits
        .cross_entropy(&ids(vec![2, IGNORE_INDEX, 6]), IGNORE_INDEX)
        .unwrap();
    assert!(loss.to_host_f32().unwrap()[0].is_finite(), "record cleared");
}
