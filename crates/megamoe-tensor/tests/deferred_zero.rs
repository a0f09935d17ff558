//! Deferred zeroing of write-through buffers (`Tensor::defer_zero`): the first accumulating
//! GEMM into exactly a deferred range overwrites it (stale elements never read), later ones
//! accumulate; other in-place writes zero the deferred ranges they touch first; a read of a
//! deferred range is a named error; `settle_deferred` zeroes what is left. Every result is
//! checked bit for bit against zeroing first and accumulating, on the same backend.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::{DType, Device, Error, RowGroups, Tensor, READ_DEFERRED};
use std::iter::once;

/// A write-through `[n]` buffer whose every element is stale garbage (NaN), as a flat
/// gradient buffer is after a step that went non-finite.
fn stale(dev: Device, n: usize) -> Tensor {
    // SAFETY: used by this test's thread only.
    let mut t = unsafe { Tensor::write_through_zeros([n], dev) }.unwrap();
    t.fill_in_place(f32::NAN).unwrap();
    t
}

/// A write-through `[n]` buffer of zeros: the reference (zero first, then accumulate).
fn zeroed(dev: Device, n: usize) -> Tensor {
    // SAFETY: used by this test's thread only.
    unsafe { Tensor::write_through_zeros([n], dev) }.unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    // -0 and +0 are the same value; the overwrite may keep a -0 where 0 + x gives +0.
    host(t)
        .iter()
        .map(|v| if *v == 0.0 { 0 } else { v.to_bits() })
        .collect()
}

fn is_read_deferred(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument { rule, .. } if *rule == READ_DEFERRED)
}

/// Two GEMM contributions into one deferred range (a parameter used twice, or two
/// micro-batches), one contribution into another, none into a third: the same bits as
/// zeroing first, and the untouched range reads zeros once settled.
fn gemm_contributions_overwrite_then_accumulate(dev: Device) {
    let (a1, b1) = (rand_on(dev, 1, &[5, 4]), rand_on(dev, 2, &[5, 3]));
    let (a2, b2) = (rand_on(dev, 3, &[5, 4]), rand_on(dev, 4, &[5, 3]));
    let (a3, b3) = (rand_on(dev, 5, &[2, 6]), rand_on(dev, 6, &[2, 5]));
    // Slots: [4, 3] at 0, [6, 5] at 12, [7] at 42 (no gradient this step).
    let run = |buf: &Tensor| {
        let mut g1 = buf.view(0, [4, 3]).unwrap();
        let mut g2 = buf.view(12, [6, 5]).unwrap();
        g1.matmul_acc(&a1, &b1, true, false, 1.0).unwrap();
        g2.matmul_acc(&a3, &b3, true, false, 1.0).unwrap();
        g1.matmul_acc(&a2, &b2, true, false, 1.0).unwrap();
    };
    let want = zeroed(dev, 49);
    run(&want);
    let got = stale(dev, 49);
    got.defer_zero([0..12, 12..42, 42..49]).unwrap();
    assert_eq!(got.deferred_elems(), 49);
    run(&got);
    assert_eq!(got.deferred_elems(), 7, "only the slot nothing wrote");
    let e = got.to_host_f32().unwrap_err();
    assert!(is_read_deferred(&e), "read before settling: {e}");
    assert_eq!(
        host(&got.view(0, [42]).unwrap()),
        host(&want.view(0, [42]).unwrap()),
        "written ranges read fine"
    );
    got.settle_deferred().unwrap();
    assert_eq!(got.deferred_elems(), 0);
    assert_eq!(bits(&got), bits(&want));
    assert!(host(&got)[42..].iter().all(|&v| v == 0.0));
}

/// Expert banks: the grouped weight gradient overwrites a deferred bank, an empty group's
/// block included (zeros, not the stale NaNs); a second call accumulates.
fn grouped_wgrad_overwrites_every_group(dev: Device) {
    let (g, n, k) = (3, 4, 5);
    let groups = RowGroups::from_sizes(&[2, 0, 3], dev).unwrap();
    let (dy, x) = (rand_on(dev, 7, &[5, n]), rand_on(dev, 8, &[5, k]));
    let (dy2, x2) = (rand_on(dev, 9, &[5, n]), rand_on(dev, 10, &[5, k]));
    let run = |buf: &Tensor| {
        let mut w = buf.view(0, [g, n, k]).unwrap();
        w.grouped_matmul_wgrad_acc(&dy, &x, &groups, 1.0).unwrap();
        w.grouped_matmul_wgrad_acc(&dy2, &x2, &groups, 1.0).unwrap();
    };
    let want = zeroed(dev, g * n * k);
    run(&want);
    let got = stale(dev, g * n * k);
    got.defer_zero(once(0..g * n * k)).unwrap();
    run(&got);
    assert_eq!(got.deferred_elems(), 0);
    assert_eq!(bits(&got), bits(&want));
    assert!(host(&got)[n * k..2 * n * k].iter().all(|&v| v == 0.0));
}

/// Writes that are not a whole-range GEMM (an add, a narrow view, an accumulating fill)
/// zero the deferred ranges they touch first, and only those.
fn other_writes_settle_what_they_touch(dev: Device) {
    let ones = Tensor::ones([3], DType::F32, dev).unwrap();
    let got = stale(dev, 12);
    got.defer_zero([0..3, 3..6, 6..12]).unwrap();
    got.view(0, [3]).unwrap().add_assign(&ones).unwrap();
    assert_eq!(got.deferred_elems(), 9);
    // A narrow part of the [6] slot at 6: the whole slot is zeroed, then the part written.
    let mut part = got.view(6, [2, 3]).unwrap().narrow(0, 1, 1).unwrap();
    part.axpy(2.0, &ones.reshape([1, 3]).unwrap()).unwrap();
    assert_eq!(got.deferred_elems(), 3, "the slot at 3 is still deferred");
    got.settle_deferred().unwrap();
    let want = [1., 1., 1., 0., 0., 0., 0., 0., 0., 2., 2., 2.];
    assert_eq!(host(&got), want);
    // A GEMM into part of a deferred range accumulates onto zeros, not onto the stale NaNs.
    let got = stale(dev, 8);
    got.defer_zero(once(0..8)).unwrap();
    let (a, b) = (rand_on(dev, 11, &[3, 2]), rand_on(dev, 12, &[3, 2]));
    got.view(0, [2, 2])
        .unwrap()
        .matmul_acc(&a, &b, true, false, 1.0)
        .unwrap();
    let want = zeroed(dev, 8);
    want.view(0, [2, 2])
        .unwrap()
        .matmul_acc(&a, &b, true, false, 1.0)
        .unwrap();
    assert_eq!(got.deferred_elems(), 0);
    assert_eq!(bits(&got), bits(&want));
}

/// A [`Tensor::joined`] view of two adjacent deferred slots (a gate and an up projection
/// gradient written as one fused operand): its first GEMM overwrites both, the next
/// accumulates; a joined view of a deferred and a written slot accumulates onto zeros.
/// Same bits as zeroing first; views that are not adjacent do not join.
fn joined_views_of_deferred_slots(dev: Device) {
    let (dy, x) = (rand_on(dev, 13, &[5, 4]), rand_on(dev, 14, &[5, 3]));
    let (dy2, x2) = (rand_on(dev, 15, &[5, 4]), rand_on(dev, 16, &[5, 3]));
    let groups = RowGroups::from_sizes(&[5], dev).unwrap();
    // Slots: [2, 3] at 0, [2, 3] at 6 (one [1, 4, 3] operand), [5] at 12.
    let run = |buf: &Tensor, first_settled: bool| {
        let (a, b) = (buf.view(0, [2, 3]).unwrap(), buf.view(6, [2, 3]).unwrap());
        if first_settled {
            buf.view(0, [2, 3]).unwrap().settle_deferred().unwrap();
        }
        let mut both = Tensor::joined(&[&a, &b], [1, 4, 3]).unwrap();
        both.grouped_matmul_wgrad_acc(&dy, &x, &groups, 1.0)
            .unwrap();
        both.grouped_matmul_wgrad_acc(&dy2, &x2, &groups, 1.0)
            .unwrap();
    };
    for first_settled in [false, true] {
        let want = zeroed(dev, 17);
        run(&want, first_settled);
        let got = stale(dev, 17);
        got.defer_zero([0..6, 6..12, 12..17]).unwrap();
        run(&got, first_settled);
        assert_eq!(got.deferred_elems(), 5, "only the slot nothing wrote");
        got.settle_deferred().unwrap();
        assert_eq!(bits(&got), bits(&want));
    }
    let buf = zeroed(dev, 17);
    let (a, c) = (buf.view(0, [2, 3]).unwrap(), buf.view(12, [5]).unwrap());
    assert!(Tensor::joined(&[&a, &c], [11]).is_none(), "a gap");
    let b = buf.view(6, [2, 3]).unwrap();
    assert!(Tensor::joined(&[&b, &a], [12]).is_none(), "out of order");
    assert!(
        Tensor::joined(&[&a, &b], [13]).is_none(),
        "wrong element count"
    );
    let other = zeroed(dev, 6);
    assert!(
        Tensor::joined(&[&a, &other], [12]).is_none(),
        "another buffer"
    );
}

/// Bad deferrals are named errors: an ordinary buffer, a range past the end, two
/// overlapping ranges; giving a deferred range again is fine.
fn bad_deferrals_are_named(dev: Device) {
    let plain = Tensor::zeros([4], DType::F32, dev).unwrap();
    assert!(matches!(
        plain.defer_zero(once(0..4)),
        Err(Error::InvalidArgument {
            op: "defer_zero",
            arg: "self",
            ..
        })
    ));
    let buf = stale(dev, 10);
    for bad in [[0..11, 11..12], [0..5, 4..8]] {
        assert!(matches!(
            buf.defer_zero(bad),
            Err(Error::InvalidArgument {
                op: "defer_zero",
                arg: "ranges",
                ..
            })
        ));
    }
    assert_eq!(buf.deferred_elems(), 0, "a refused deferral defers nothing");
    buf.defer_zero(once(0..5)).unwrap();
    buf.defer_zero([0..5, 5..10]).unwrap();
    assert_eq!(buf.deferred_elems(), 10);
    buf.settle_deferred().unwrap();
    assert_eq!(host(&buf), vec![0.0; 10]);
}

backend_tests!(
    gemm_contributions_overwrite_then_accumulate,
    grouped_wgrad_overwrites_every_group,
    other_writes_settle_what_they_touch,
    joined_views_of_deferred_slots,
    bad_deferrals_are_named,
);
