//! Device-scalar ops (`scale_by`, `where_cond`, `add_i32`, `norm_rows`) and the fused
//! AdamW op against the unfused op sequence it replaces.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

#[macro_use]
mod common;
use common::*;
use megamoe_tensor::{AdamWStep, DType, Device, Error, Tensor};

fn scale_by_matches_scale_and_checks_the_scalar(dev: Device) {
    let x = rand_on(dev, 1, &[7, 5]);
    let s = Tensor::scalar(-0.37, dev).unwrap();
    assert!(same_bits(
        &host(&x.scale_by(&s).unwrap()),
        &host(&x.scale(-0.37).unwrap())
    ));
    let mut y = x.clone();
    y.scale_by_assign(&s).unwrap();
    assert!(same_bits(&host(&y), &host(&x.scale(-0.37).unwrap())));
    assert!(matches!(
        x.scale_by(&rand_on(dev, 2, &[2])),
        Err(Error::ShapeMismatch { op: "scale_by", .. })
    ));
}

fn where_cond_selects_and_add_i32_adds(dev: Device) {
    let c = Tensor::from_vec_f32(vec![1.0, 0.0, -2.0, 0.0], [4], dev).unwrap();
    let a = Tensor::from_vec_f32(vec![1.0, 2.0, 3.0, 4.0], [4], dev).unwrap();
    let b = Tensor::from_vec_f32(vec![-1.0, -2.0, -3.0, -4.0], [4], dev).unwrap();
    assert_eq!(
        host(&c.where_cond(&a, &b).unwrap()),
        vec![1.0, -2.0, 3.0, -4.0]
    );
    assert!(c.where_cond(&a, &rand_on(dev, 3, &[3])).is_err());
    let i = Tensor::from_vec_i32(vec![1, -2, 3], [3], dev).unwrap();
    let j = Tensor::from_vec_i32(vec![10, 20, 30], [3], dev).unwrap();
    assert_eq!(
        i.add_i32(&j).unwrap().to_host_i32().unwrap(),
        vec![11, 18, 33]
    );
    assert!(matches!(
        i.add_i32(&Tensor::zeros([3], DType::F32, dev).unwrap()),
        Err(Error::DTypeMismatch { op: "add_i32", .. })
    ));
}

fn norm_rows_matches_norm_of_each_row(dev: Device) {
    let x = rand_on(dev, 4, &[3, 20000]); // more than one f64 summation piece per row
    let n = host(&x.norm_rows().unwrap());
    for (r, v) in n.iter().enumerate() {
        let want = x
            .narrow(0, r, 1)
            .unwrap()
            .norm()
            .unwrap()
            .to_scalar_f32()
            .unwrap();
        assert_eq!(v.to_bits(), want.to_bits(), "row {r}");
    }
}

/// The unfused AdamW sequence the fused op replaces (as `adamw_update` computed it).
fn unfused(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, h: &AdamWStep) -> [Vec<f32>; 3] {
    let (b1, b2) = (h.beta1, h.beta2);
    let mut m2 = m.scale(b1 as f32).unwrap();
    m2.axpy((1.0 - b1) as f32, g).unwrap();
    let mut v2 = v.scale(b2 as f32).unwrap();
    v2.axpy((1.0 - b2) as f32, &g.square().unwrap()).unwrap();
    let t = h.t as i32;
    let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let denom = v2
        .scale((1.0 / bc2) as f32)
        .unwrap()
        .sqrt()
        .unwrap()
        .add_scalar(h.eps as f32)
        .unwrap();
    let step = m2.div(&denom).unwrap();
    let mut p2 = if h.weight_decay != 0.0 {
        p.scale((1.0 - h.lr * h.weight_decay) as f32).unwrap()
    } else {
        p.clone()
    };
    p2.axpy((-h.lr / bc1) as f32, &step).unwrap();
    [host(&p2), host(&m2), host(&v2)]
}

fn fused_adamw_step_is_bit_identical_to_the_unfused_sequence(dev: Device) {
    let shape = [33, 1000];
    for (wd, t) in [(0.1, 1u64), (0.0, 7)] {
        let h = AdamWStep {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: wd,
            t,
        };
        let p = rand_on(dev, 10, &shape);
        let g = rand_on(dev, 11, &shape);
        let m = rand_on(dev, 12, &shape).scale(0.1).unwrap();
        let v = rand_on(dev, 13, &shape)
            .square()
            .unwrap()
            .scale(0.01)
            .unwrap();
        let want = unfused(&p, &g, &m, &v, &h);
        let (mut pf, mut mf, mut vf) = (p.clone(), m.clone(), v.clone());
        pf.adamw_step(&mut mf, &mut vf, &g, &h).unwrap();
        assert!(same_bits(&host(&pf), &want[0]), "param, wd {wd}");
        assert!(same_bits(&host(&mf), &want[1]), "exp_avg");
        assert!(same_bits(&host(&vf), &want[2]), "exp_avg_sq");
        // inputs shared with pf/mf/vf before the op are untouched (copy-on-write)
        assert!(same_bits(&host(&p), &host(&rand_on(dev, 10, &shape))));
    }
    let mut p = rand_on(dev, 1, &[4]);
    let (mut m, mut v) = (rand_on(dev, 2, &[4]), rand_on(dev, 3, &[4]));
    let h = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        t: 1,
    };
    assert!(matches!(
        p.adamw_step(&mut m, &mut v, &rand_on(dev, 4, &[5]), &h),
        Err(Error::ShapeMismatch {
            op: "adamw_step",
            ..
        })
    ));
}

backend_tests!(
    scale_by_matches_scale_and_checks_the_scalar,
    where_cond_selects_and_add_i32_adds,
    norm_rows_matches_norm_of_each_row,
    fused_adamw_step_is_bit_identical_to_the_unfused_sequence,
);
