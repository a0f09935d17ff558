//! `Tensor::route` on the CPU (its definition, the composed ops) against hand-computed
//! values for one token with logits `[1, 1, 0, 2]`: every score function, ties (experts 0
//! and 1 tie: the lower index wins), a null slot, expert bias, the group-limited mask,
//! renormalisation and scale. `softmax([1, 1, 0, 2]) = [0.196612, 0.196612, 0.072329,
//! 0.534447]`, logsumexp 2.626523, σ(2) = 0.880797, σ(1) = 0.731059.
#![allow(clippy::unwrap_used)]

use megamoe_tensor::ops::router::{RouteScore, RouteSpec, Routed};
use megamoe_tensor::{Device, Tensor};

fn z() -> Tensor {
    Tensor::from_vec_f32(vec![1.0, 1.0, 0.0, 2.0], [1, 4], Device::Cpu).unwrap()
}

fn spec(n_real: usize, score: RouteScore) -> RouteSpec {
    RouteSpec {
        n_real,
        k: 2,
        score,
        groups: None,
        normalize: true,
        eps: 1e-20,
        scale: 1.0,
    }
}

fn check(r: &Routed, slots: [i32; 2], gates: [f64; 2]) {
    assert_eq!(r.slots.to_host_i32().unwrap(), slots);
    for (g, w) in r.gates.to_host_f32().unwrap().iter().zip(gates) {
        assert!((*g as f64 - w).abs() < 1e-6, "gates {g} vs {w}");
    }
}

#[test]
fn route_matches_hand_values_in_every_mode() {
    let z = z();
    // softmax over the pool: 3 (p 0.534), then the 0/1 tie → 0; e/(e+1), 1/(e+1).
    let r = z.route(None, &spec(4, RouteScore::Softmax)).unwrap();
    check(&r, [3, 0], [0.731_058_6, 0.268_941_4]);
    let want_p = [0.196_611_9, 0.196_611_9, 0.072_329_5, 0.534_446_6];
    for (p, w) in r.probs.to_host_f32().unwrap().iter().zip(want_p) {
        assert!((p - w).abs() < 1e-6, "probs {p} vs {w}");
    }
    assert!((r.lse.to_host_f32().unwrap()[0] - 2.626_523_4).abs() < 1e-6);
    assert!(r.real_mask.is_none() && r.g_masked.is_some());
    // sigmoid, renormalised; then unnormalised with scale 2.
    let r = z.route(None, &spec(4, RouteScore::Sigmoid)).unwrap();
    check(&r, [3, 0], [0.546_449_1, 0.453_550_9]);
    let s2 = RouteSpec {
        normalize: false,
        scale: 2.0,
        ..spec(4, RouteScore::Sigmoid)
    };
    let r = z.route(None, &s2).unwrap();
    check(&r, [3, 0], [1.761_594_2, 1.462_117_2]);
    assert!(r.g_masked.is_none());
    // softmax of the two chosen logits (2 and 1).
    let r = z
        .route(None, &spec(4, RouteScore::SoftmaxAfterTopk))
        .unwrap();
    check(&r, [3, 0], [0.731_058_6, 0.268_941_4]);
    // slot 3 is a null copy: gate 0, the real pick takes the whole renormalised gate.
    let r = z.route(None, &spec(3, RouteScore::Softmax)).unwrap();
    check(&r, [3, 0], [0.0, 1.0]);
    assert_eq!(r.real_mask.unwrap().to_host_f32().unwrap(), [0.0, 1.0]);
    // bias +0.5 on expert 1 chooses it first (0.697 > 0.534) but leaves its gate p_1.
    let b = Tensor::from_vec_f32(vec![0.0, 0.5, 0.0], [3], Device::Cpu).unwrap();
    let r = z.route(Some(&b), &spec(3, RouteScore::Softmax)).unwrap();
    check(&r, [1, 3], [1.0, 0.0]);
    assert!((r.g_raw.to_host_f32().unwrap()[0] - 0.196_611_9).abs() < 1e-6);
    // groups {0, 1} (score 0.393) and {2, 3} (0.607): only the second is kept.
    let g = RouteSpec {
        groups: Some((2, 1)),
        ..spec(4, RouteScore::Softmax)
    };
    let r = z.route(None, &g).unwrap();
    check(&r, [3, 2], [0.880_797_1, 0.119_202_9]);
}

#[test]
fn route_rejects_bad_arguments_by_name() {
    let z = z();
    let bad_k = RouteSpec {
        k: 5,
        ..spec(4, RouteScore::Softmax)
    };
    assert!(z.route(None, &bad_k).unwrap_err().to_string().contains("k"));
    let b = Tensor::from_vec_f32(vec![0.0; 2], [2], Device::Cpu).unwrap();
    assert!(z.route(Some(&b), &spec(3, RouteScore::Softmax)).is_err());
    assert!(z.route(None, &spec(5, RouteScore::Softmax)).is_err());
}

#[test]
fn kept_slots_are_the_slot_where_kept_and_minus_one_elsewhere() {
    let idx = Tensor::from_vec_i32(vec![3, 0, 2, 5, 1, 4], [3, 2], Device::Cpu).unwrap();
    let keep =
        Tensor::from_vec_f32(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], [3, 2], Device::Cpu).unwrap();
    let got = idx.kept_slots(&keep).unwrap();
    assert_eq!(got.to_host_i32().unwrap(), [3, -1, -1, 5, 1, 4]);
    let wrong = Tensor::from_vec_f32(vec![1.0; 4], [2, 2], Device::Cpu).unwrap();
    assert!(idx.kept_slots(&wrong).is_err());
}
