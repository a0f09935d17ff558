//! Write-through buffers (`Tensor::write_through_zeros`): in-place ops on views write into
//! the one shared buffer, every handle sees the writes, disjoint views stay untouched, and an
//! input overlapping the written range is read as it was before the op.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::{AdamWStep, DType, Device, Error, Tensor};

/// A write-through `[n]` buffer holding `values` (loaded through a view, not replaced).
fn flat(dev: Device, values: &[f32]) -> Tensor {
    // SAFETY: used by this test's thread only.
    let mut t = unsafe { Tensor::write_through_zeros([values.len()], dev) }.unwrap();
    let src = Tensor::from_slice(values, [values.len()], dev).unwrap();
    t.copy_from(&src).unwrap();
    t
}

fn in_place_writes_through_views_into_the_shared_buffer(dev: Device) {
    let base = rand_vec(1, 12);
    let buf = flat(dev, &base);
    assert!(buf.is_write_through());
    assert_eq!(host(&buf), base, "copy_from loads the values");
    // Two disjoint views, shaped like parameters: [2, 3] at 0 and [3, 2] at 6.
    let mut a = buf.view(0, [2, 3]).unwrap();
    let mut b = buf.view(6, [3, 2]).unwrap();
    let seen_by_a_clone = a.clone();
    let x = rand_t(2, &[2, 3]).to_device(dev).unwrap();
    a.add_assign(&x).unwrap();
    assert!(
        a.same_storage(&buf),
        "the view was written in place, not copied"
    );
    let xs = host(&x);
    let mut want = base.clone();
    for i in 0..6 {
        want[i] += xs[i];
    }
    assert_eq!(host(&buf), want, "the write is visible in the flat buffer");
    assert_eq!(
        host(&seen_by_a_clone),
        want[..6],
        "and through every handle"
    );
    b.fill_in_place(0.0).unwrap();
    for v in &mut want[6..] {
        *v = 0.0;
    }
    assert_eq!(host(&buf), want, "fill touches only the view's range");
    // Views of views (reshape, dim-0 narrow) write through as well.
    let mut row = buf.reshape([4, 3]).unwrap().narrow(0, 1, 1).unwrap();
    row.axpy(2.0, &Tensor::ones([1, 3], DType::F32, dev).unwrap())
        .unwrap();
    for v in &mut want[3..6] {
        *v += 2.0;
    }
    assert_eq!(host(&buf), want);
    // matmul_acc and scale_by_assign into a view.
    let mut m = buf.view(6, [2, 3]).unwrap();
    let (p, q) = (rand_on(dev, 3, &[2, 4]), rand_on(dev, 4, &[4, 3]));
    m.matmul_acc(&p, &q, false, false, 0.0).unwrap();
    let prod = host(&p.matmul(&q, false, false).unwrap());
    want[6..].copy_from_slice(&prod);
    assert_eq!(host(&buf), want);
    let mut all = buf.clone();
    all.scale_by_assign(&Tensor::scalar(0.5, dev).unwrap())
        .unwrap();
    let want: Vec<f32> = want.iter().map(|v| v * 0.5).collect();
    assert_eq!(host(&buf), want);
}

fn an_overlapping_input_is_read_before_the_write(dev: Device) {
    let base: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let buf = flat(dev, &base);
    // dst = elements 2..8, src = elements 0..6: an in-order loop would read elements 2..6
    // after writing them; the op must add the old values.
    let mut dst = buf.view(2, [6]).unwrap();
    let src = buf.view(0, [6]).unwrap();
    dst.add_assign(&src).unwrap();
    let want: Vec<f32> = [0.0, 1.0]
        .into_iter()
        .chain((0..6).map(|i| base[i + 2] + base[i]))
        .collect();
    assert_eq!(host(&buf), want);
    // The same range on both sides: x ← x + x.
    let mut x = buf.view(0, [8]).unwrap();
    let same = x.clone();
    x.add_assign(&same).unwrap();
    assert_eq!(host(&buf), want.iter().map(|v| v + v).collect::<Vec<_>>());
}

fn copy_from_is_bit_exact_and_adamw_refuses_overlapping_moments(dev: Device) {
    let odd = [-0.0f32, 0.0, 1.5, -2.25, f32::MIN_POSITIVE, -1e-40];
    let buf = flat(dev, &odd);
    let got = host(&buf);
    assert!(same_bits(&got, &odd), "{got:?}");
    // AdamW on views: the moments may be views of one buffer, never overlapping ones.
    let both = flat(dev, &[0.0; 8]);
    let mut p = rand_on(dev, 5, &[4]);
    let g = rand_on(dev, 6, &[4]);
    let h = AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        t: 1,
    };
    let (mut m, mut v) = (both.view(0, [4]).unwrap(), both.view(4, [4]).unwrap());
    let (mut p2, mut m2, mut v2) = (
        p.deep_copy().unwrap(),
        Tensor::zeros([4], DType::F32, dev).unwrap(),
        Tensor::zeros([4], DType::F32, dev).unwrap(),
    );
    p.adamw_step(&mut m, &mut v, &g, &h).unwrap();
    p2.adamw_step(&mut m2, &mut v2, &g, &h).unwrap();
    assert!(same_bits(&host(&p), &host(&p2)));
    assert!(same_bits(&host(&both), &[host(&m2), host(&v2)].concat()));
    let (mut m, mut v) = (both.view(0, [4]).unwrap(), both.view(2, [4]).unwrap());
    assert!(matches!(
        p.adamw_step(&mut m, &mut v, &g, &h),
        Err(Error::InvalidArgument {
            op: "adamw_step",
            ..
        })
    ));
}

fn ordinary_buffers_stay_copy_on_write(dev: Device) {
    let t = Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0], [4], dev).unwrap();
    assert!(!t.is_write_through());
    let mut v = t.view(2, [2]).unwrap();
    v.add_assign(&Tensor::ones([2], DType::F32, dev).unwrap())
        .unwrap();
    assert_eq!(
        host(&t),
        vec![1.0, 2.0, 3.0, 4.0],
        "the parent is unchanged"
    );
    assert_eq!(host(&v), vec![4.0, 5.0]);
    assert!(!v.same_storage(&t));
}

backend_tests!(
    in_place_writes_through_views_into_the_shared_buffer,
    an_overlapping_input_is_read_before_the_write,
    copy_from_is_bit_exact_and_adamw_refuses_overlapping_moments,
    ordinary_buffers_stay_copy_on_write,
);
