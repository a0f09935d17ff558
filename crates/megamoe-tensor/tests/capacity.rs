//! Static-capacity buffer ops against the packed path (`sort_by_expert` + `pad_groups` +
//! `index_add_rows`) and against plain loops.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::ops::routing::KeepOrder;
use megamoe_tensor::{DType, Device, Error, Tensor};

fn i32s(dev: Device, v: &[i32], shape: &[usize]) -> Tensor {
    Tensor::from_vec_i32(v.to_vec(), shape, dev).unwrap()
}

/// 6 tokens, k = 2, E = 3 real experts + null slot 3; expert 1 is over capacity 2.
fn case(dev: Device) -> (Tensor, Tensor, Tensor) {
    let idx = i32s(dev, &[1, 0, 1, 3, 2, 1, 1, 0, 3, 2, 1, 2], &[6, 2]);
    let gates = Tensor::from_vec_f32(
        rand_vec(5, 12).iter().map(|v| v.abs()).collect(),
        [6, 2],
        dev,
    )
    .unwrap();
    let keep = idx
        .capacity_keep(&gates, 3, Some(2), KeepOrder::HighestGate)
        .unwrap();
    (idx, gates, keep)
}

fn capacity_permutation_places_kept_rows_in_expert_slabs(dev: Device) {
    let idx = i32s(dev, &[1, 0, 1, 3, 2, 1, 0, 3], &[4, 2]);
    let keep = Tensor::from_vec_f32(vec![1., 1., 1., 0., 1., 0., 1., 0.], [4, 2], dev).unwrap();
    let p = idx.capacity_permutation(&keep, 3, 2).unwrap();
    // expert 0: tokens 0, 3; expert 1: tokens 0, 1 (token 2's pick dropped); expert 2: token 2.
    assert_eq!(
        p.slot_row.to_host_i32().unwrap(),
        vec![2, 0, 3, -1, 4, -1, 1, -1]
    );
    assert_eq!(p.row_token.to_host_i32().unwrap(), vec![0, 3, 0, 1, 2, -1]);
    assert_eq!(p.counts.to_host_i32().unwrap(), vec![2, 2, 1]);
    // keep over capacity is a named error, not a silent drop
    let all = Tensor::from_vec_f32(vec![1.0; 8], [4, 2], dev).unwrap();
    let e = error_of(idx.capacity_permutation(&all, 3, 1), |p| {
        p.counts.to_host_i32().map(drop)
    });
    expect_bad_input(
        dev,
        &e,
        |e| matches!(e, Error::InvalidArgument { arg: "keep", .. }),
        "capacity_permutation",
    );
}

fn permute_to_capacity_equals_sorted_rows_padded(dev: Device) {
    let (idx, _, keep) = case(dev);
    let x = rand_on(dev, 9, &[6, 5]);
    let (buffers, p) = x.permute_to_capacity(&idx, &keep, 3, 2).unwrap();
    let perm = idx.sort_by_expert(&keep, 3).unwrap();
    // slot_row is the inverse of assignment: the packed row of each kept assignment, -1 else
    let (sr, asg) = (
        perm.slot_row.to_host_i32().unwrap(),
        perm.assignment.to_host_i32().unwrap(),
    );
    assert_eq!(perm.slot_row.dims(), idx.dims());
    let mut want = vec![-1; sr.len()];
    for (r, &a) in asg.iter().enumerate() {
        want[a as usize] = r as i32;
    }
    assert_eq!(sr, want, "sort_by_expert slot_row");
    let packed = x.index_select(&perm.token).unwrap();
    let padded = packed.pad_groups(&perm.counts, 2).unwrap();
    assert_eq!(host(&buffers), host(&padded));
    assert_eq!(
        p.counts.to_host_i32().unwrap(),
        perm.counts.to_host_i32().unwrap()
    );
    assert_eq!(
        host(&x.gather_rows_or_zero(&p.row_token).unwrap()),
        host(&buffers)
    );
    let bad = i32s(dev, &[0, 6], &[2]);
    expect_bad_input(
        dev,
        &tensor_error(x.gather_rows_or_zero(&bad)),
        |e| matches!(e, Error::IndexOutOfRange { index: 6, .. }),
        "static expert buffers",
    );
}

fn combine_slots_and_backward_equal_the_packed_scatter_bit_for_bit(dev: Device) {
    let (idx, gates, keep) = case(dev);
    let (t, k, d, c) = (6, 2, 5, 2);
    let x = rand_on(dev, 9, &[t, d]);
    let (buffers, p) = x.permute_to_capacity(&idx, &keep, 3, c).unwrap();
    // expert outputs: any rows; pad rows hold garbage that must be ignored
    let out = rand_on(dev, 11, &[3 * c, d]);
    let perm = idx.sort_by_expert(&keep, 3).unwrap();
    let out_packed = out
        .unpad_groups(&perm.counts, c, perm.token.numel())
        .unwrap();
    let row_gates = gates
        .reshape([t * k, 1])
        .unwrap()
        .index_select(&perm.assignment)
        .unwrap()
        .reshape([perm.assignment.numel()])
        .unwrap();
    let zeros = Tensor::zeros([t, d], DType::F32, dev).unwrap();
    let want_y = zeros
        .index_add_rows(&perm.token, &out_packed, Some(&row_gates))
        .unwrap();
    let y = out.combine_slots(&p.slot_row, Some(&gates)).unwrap();
    assert_eq!(host(&y), host(&want_y));

    // backward: d_out = g · d_y[token] per kept row, d_g = <d_y[token], out_row>
    let d_y = rand_on(dev, 12, &[t, d]);
    let (d_rows, d_g) = out
        .combine_slots_backward(&d_y, &p.slot_row, &gates)
        .unwrap();
    let d_y_rows = d_y.index_select(&perm.token).unwrap();
    let want_d_out = d_y_rows.mul_col(&row_gates).unwrap();
    assert_eq!(
        host(&d_rows),
        host(&want_d_out.pad_groups(&perm.counts, c).unwrap())
    );
    let r = perm.token.numel();
    let want_d_g = Tensor::zeros([t * k, 1], DType::F32, dev)
        .unwrap()
        .index_add_rows(
            &perm.assignment,
            &d_y_rows
                .mul(&out_packed)
                .unwrap()
                .sum_last_dim()
                .unwrap()
                .reshape([r, 1])
                .unwrap(),
            None,
        )
        .unwrap();
    assert_eq!(host(&d_g), host(&want_d_g));

    // permute backward: unweighted combine = scatter-add of the kept rows
    let d_x = buffers.combine_slots(&p.slot_row, None).unwrap();
    let want_d_x = zeros
        .index_add_rows(&perm.token, &packed_of(&buffers, &perm.counts, c), None)
        .unwrap();
    assert_eq!(host(&d_x), host(&want_d_x));
}

fn packed_of(buffers: &Tensor, counts: &Tensor, c: usize) -> Tensor {
    let rows: i32 = counts.to_host_i32().unwrap().iter().sum();
    buffers.unpad_groups(counts, c, rows as usize).unwrap()
}

fn combine_slots_rejects_bad_rows_and_shapes(dev: Device) {
    let rows = rand_on(dev, 1, &[4, 3]);
    let slot_row = i32s(dev, &[0, 4], &[1, 2]);
    expect_bad_input(
        dev,
        &tensor_error(rows.combine_slots(&slot_row, None)),
        |e| matches!(e, Error::IndexOutOfRange { index: 4, .. }),
        "static expert buffers",
    );
    let slot_row = i32s(dev, &[0, -2], &[1, 2]);
    expect_bad_input(
        dev,
        &tensor_error(rows.combine_slots(&slot_row, None)),
        |e| matches!(e, Error::IndexOutOfRange { index: -2, .. }),
        "static expert buffers",
    );
    let slot_row = i32s(dev, &[0, -1], &[1, 2]);
    let w = rand_on(dev, 2, &[2, 2]);
    assert!(matches!(
        rows.combine_slots(&slot_row, Some(&w)).unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
    let d_y = rand_on(dev, 3, &[2, 3]);
    assert!(matches!(
        rows.combine_slots_backward(&d_y, &slot_row, &rand_on(dev, 4, &[1, 2]))
            .unwrap_err(),
        Error::ShapeMismatch { .. }
    ));
}

backend_tests!(
    capacity_permutation_places_kept_rows_in_expert_slabs,
    permute_to_capacity_equals_sorted_rows_padded,
    combine_slots_and_backward_equal_the_packed_scatter_bit_for_bit,
    combine_slots_rejects_bad_rows_and_shapes,
);
