//! Index and shape ops against plain loops.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::{DType, Device, Error, Tensor};

fn idx(dev: Device, v: &[i32]) -> Tensor {
    Tensor::from_vec_i32(v.to_vec(), [v.len()], dev).unwrap()
}

fn index_select_gathers_rows_and_rejects_bad_index(dev: Device) {
    let x = rand_vec(70, 4 * 3);
    let t = Tensor::from_slice(&x, [4, 3], dev).unwrap();
    let y = host(&t.index_select(&idx(dev, &[3, 0, 3])).unwrap());
    let want: Vec<f32> = [3, 0, 3]
        .iter()
        .flat_map(|&r| x[r * 3..r * 3 + 3].to_vec())
        .collect();
    assert_eq!(y, want);
    // i32 tensors gather too
    let it = Tensor::from_vec_i32(vec![10, 11, 12], [3], dev).unwrap();
    assert_eq!(
        it.index_select(&idx(dev, &[2, 2, 0]))
            .unwrap()
            .to_host_i32()
            .unwrap(),
        vec![12, 12, 10]
    );
}

fn index_add_rows_sums_weighted_sources_in_source_order(dev: Device) {
    let (m, r, h) = (4, 6, 5);
    let dst = rand_vec(71, m * h);
    let src = rand_vec(72, r * h);
    let w = rand_vec(73, r);
    let ids = [2, 0, 2, 3, 2, 0];
    let dt = Tensor::from_slice(&dst, [m, h], dev).unwrap();
    let st = Tensor::from_slice(&src, [r, h], dev).unwrap();
    let wt = Tensor::from_slice(&w, [r], dev).unwrap();
    // reference: sequential f32 loop in source order (the documented order), bit-exact
    let mut want = dst.clone();
    for (s, &d) in ids.iter().enumerate() {
        for j in 0..h {
            want[d as usize * h + j] += w[s] * src[s * h + j];
        }
    }
    let got = host(&dt.index_add_rows(&idx(dev, &ids), &st, Some(&wt)).unwrap());
    assert!(same_bits(&got, &want));
    let unweighted = host(&dt.index_add_rows(&idx(dev, &ids), &st, None).unwrap());
    let mut want2 = dst.clone();
    for (s, &d) in ids.iter().enumerate() {
        for j in 0..h {
            want2[d as usize * h + j] += src[s * h + j];
        }
    }
    assert!(same_bits(&unweighted, &want2));
}

fn gather_and_scatter_cols_are_adjoint(dev: Device) {
    let (n, e, k) = (3, 5, 2);
    let x = rand_vec(74, n * e);
    let ids = [4, 1, 0, 0, 2, 3];
    let xt = Tensor::from_slice(&x, [n, e], dev).unwrap();
    let it = Tensor::from_vec_i32(ids.to_vec(), [n, k], dev).unwrap();
    let g = host(&xt.gather_cols(&it).unwrap());
    let want: Vec<f32> = (0..n * k)
        .map(|p| x[(p / k) * e + ids[p] as usize])
        .collect();
    assert_eq!(g, want);
    let src = rand_vec(75, n * k);
    let st = Tensor::from_slice(&src, [n, k], dev).unwrap();
    let s = host(&st.scatter_cols(&it, e).unwrap());
    let mut want = vec![0.0f32; n * e];
    for p in 0..n * k {
        want[(p / k) * e + ids[p] as usize] += src[p];
    }
    assert_eq!(s, want); // row 1 has a duplicate index: both add
}

fn narrow_cat_split_round_trip_on_every_dim(dev: Device) {
    let dims = [3, 4, 5];
    let x = rand_vec(76, 60);
    let t = Tensor::from_slice(&x, dims, dev).unwrap();
    for d in 0..3 {
        let n = dims[d];
        let parts = t.split(d, &[1, n - 1]).unwrap();
        let back = Tensor::cat(&[&parts[0], &parts[1]], d).unwrap();
        assert_eq!(back.dims(), &dims);
        assert_eq!(host(&back), x);
    }
    // narrow cols against a loop
    let nc = host(&t.narrow(2, 1, 3).unwrap());
    let want: Vec<f32> = (0..12)
        .flat_map(|r| x[r * 5 + 1..r * 5 + 4].to_vec())
        .collect();
    assert_eq!(nc, want);
    assert!(t.narrow(1, 3, 2).is_err());
    assert!(Tensor::cat(&[&t, &t.narrow(0, 0, 1).unwrap()], 1).is_err());
}

fn permute_matches_index_loop(dev: Device) {
    let (b, t, h, d) = (2, 3, 4, 5);
    let x = rand_vec(77, b * t * h * d);
    let xt = Tensor::from_slice(&x, [b, t, h, d], dev).unwrap();
    let y = xt.permute(&[0, 2, 1, 3]).unwrap();
    assert_eq!(y.dims(), &[b, h, t, d]);
    let y = host(&y);
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                for di in 0..d {
                    assert_eq!(
                        y[((bi * h + hi) * t + ti) * d + di],
                        x[((bi * t + ti) * h + hi) * d + di]
                    );
                }
            }
        }
    }
    // a permutation that moves the last dim
    let z = host(&xt.permute(&[3, 1, 0, 2]).unwrap());
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..h {
                for di in 0..d {
                    assert_eq!(
                        z[((di * t + ti) * b + bi) * h + hi],
                        x[((bi * t + ti) * h + hi) * d + di]
                    );
                }
            }
        }
    }
    let m = Tensor::from_slice(&x[..6], [2, 3], dev).unwrap();
    assert_eq!(
        host(&m.transpose2d().unwrap()),
        vec![x[0], x[3], x[1], x[4], x[2], x[5]]
    );
    assert!(xt.permute(&[0, 0, 1, 2]).is_err());
}

fn constructors_validate_and_cuda_is_typed_error(dev: Device) {
    assert!(matches!(
        Tensor::from_vec_f32(vec![1.0; 5], [2, 3], dev),
        Err(Error::ElementCount {
            expected: 6,
            got: 5,
            ..
        })
    ));
    assert!(matches!(
        Tensor::zeros([2], DType::F32, Device::Cuda(64)),
        Err(Error::DeviceNotAvailable { .. })
    ));
    let t = Tensor::zeros([2, 3], DType::F32, dev).unwrap();
    assert!(t.reshape([3, 2]).unwrap().same_storage(&t));
    assert!(t.reshape([4]).is_err());
    assert!(matches!(t.to_host_i32(), Err(Error::DTypeMismatch { .. })));
    assert_eq!(
        Tensor::full([2], 3.0, DType::I32, dev)
            .unwrap()
            .to_host_i32()
            .unwrap(),
        vec![3, 3]
    );
    assert!(Tensor::full([2], 0.5, DType::I32, dev).is_err());
}

fn contiguous_narrow_is_a_view_and_writes_never_reach_the_parent(dev: Device) {
    let x: Vec<f32> = (0..24).map(|v| v as f32).collect();
    let xt = Tensor::from_slice(&x, [4, 3, 2], dev).unwrap();
    // dim 0: a view (shared buffer, offset 1·6)
    let rows = xt.narrow(0, 1, 2).unwrap();
    assert!(rows.same_storage(&xt));
    assert_eq!(rows.layout().offset(), 6);
    assert_eq!(host(&rows), x[6..18].to_vec());
    // a view of a view, through an outer dim of size 1: still shared, offsets add up
    let inner = rows.narrow(0, 1, 1).unwrap().narrow(1, 2, 1).unwrap();
    assert!(inner.same_storage(&xt));
    assert_eq!(host(&inner), x[16..18].to_vec());
    // an inner narrow with outer > 1 copies
    let cols = xt.narrow(2, 1, 1).unwrap();
    assert!(!cols.same_storage(&xt));
    assert_eq!(
        host(&cols),
        (0..12).map(|i| (2 * i + 1) as f32).collect::<Vec<_>>()
    );
    // ops read only the view's elements
    assert_eq!(
        rows.sum_all().unwrap().to_scalar_f32().unwrap(),
        (6..18).sum::<i32>() as f32
    );
    let idx = Tensor::from_vec_i32(vec![1, 0], [2], dev).unwrap();
    assert_eq!(
        host(&rows.index_select(&idx).unwrap()),
        [&x[12..18], &x[6..12]].concat()
    );
    // an in-place op on a view copies (copy-on-write) and leaves the parent unchanged
    let mut v = rows.clone();
    v.add_assign(&rows).unwrap();
    assert_eq!(
        host(&v),
        x[6..18].iter().map(|a| 2.0 * a).collect::<Vec<_>>()
    );
    assert_eq!(host(&xt), x);
    // view bounds are checked
    assert!(matches!(
        rows.view(10, [3]),
        Err(Error::InvalidArgument { op: "view", .. })
    ));
    assert_eq!(host(&rows.view(10, [2]).unwrap()), x[16..18].to_vec());
}

fn index_add_rows_acc_accumulates_in_place_and_touches_only_indexed_rows(dev: Device) {
    let mut dst = Tensor::from_vec_f32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [3, 2], dev).unwrap();
    let src = Tensor::from_vec_f32(vec![10.0, 20.0, 30.0, 40.0], [2, 2], dev).unwrap();
    let ids = Tensor::from_vec_i32(vec![2, 2], [2], dev).unwrap();
    let w = Tensor::from_vec_f32(vec![1.0, 0.5], [2], dev).unwrap();
    dst.index_add_rows_acc(&ids, &src, Some(&w)).unwrap();
    assert_eq!(
        host(&dst),
        vec![1.0, 2.0, 3.0, 4.0, 5.0 + 10.0 + 15.0, 6.0 + 20.0 + 20.0]
    );
}

/// CPU: the CPU backend checks every gather/scatter id against its bound before it touches
/// memory and names the first bad one at the call. The CUDA backend checks the same ids on
/// the device and names them at the next read instead (a kernel cannot return an error
/// synchronously): tests/cuda_routing.rs `out_of_range_index_op_ids_are_named_errors_at_the_next_read`.
#[test]
fn bad_gather_and_scatter_ids_are_named_errors_on_the_cpu() {
    let dev = Device::Cpu;
    let t = Tensor::from_slice(&rand_vec(70, 4 * 3), [4, 3], dev).unwrap();
    let e = t.index_select(&idx(dev, &[1, 4])).unwrap_err();
    assert!(matches!(
        e,
        Error::IndexOutOfRange {
            index: 4,
            position: 1,
            bound: 4,
            ..
        }
    ));
    let src = rand_t(72, &[6, 3]);
    assert!(matches!(
        t.index_add_rows(&idx(dev, &[0, 9, 0, 0, 0, 0]), &src, None),
        Err(Error::IndexOutOfRange { index: 9, .. })
    ));
    let it = Tensor::from_vec_i32(vec![4, 1, 0, 0, 2, 3], [3, 2], dev).unwrap();
    assert!(matches!(
        rand_t(75, &[3, 2]).scatter_cols(&it, 4),
        Err(Error::IndexOutOfRange { index: 4, .. })
    ));
    let mut dst = Tensor::zeros([3, 2], DType::F32, dev).unwrap();
    let bad = Tensor::from_vec_i32(vec![0, 3], [2], dev).unwrap();
    assert!(matches!(
        dst.index_add_rows_acc(&bad, &rand_t(2, &[2, 2]), None),
        Err(Error::IndexOutOfRange { index: 3, .. })
    ));
    assert!(matches!(
        dst.index_add_rows_acc(&idx(dev, &[-1, 0]), &rand_t(2, &[2, 2]), None),
        Err(Error::IndexOutOfRange { index: -1, .. })
    ));
}

backend_tests!(
    index_select_gathers_rows_and_rejects_bad_index,
    index_add_rows_sums_weighted_sources_in_source_order,
    gather_and_scatter_cols_are_adjoint,
    narrow_cat_split_round_trip_on_every_dim,
    permute_matches_index_loop,
    constructors_validate_and_cuda_is_typed_error,
    contiguous_narrow_is_a_view_and_writes_never_reach_the_parent,
    index_add_rows_acc_accumulates_in_place_and_touches_only_indexed_rows,
);
