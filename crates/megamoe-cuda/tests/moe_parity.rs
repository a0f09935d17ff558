//! GPU tests: the CUDA MoE layer against megamoe-moe's CPU layer, cuBLAS GEMMs against a
//! host reference, graph replay against eager runs. They need an NVIDIA GPU and are
//! `#[ignore]`d; on the GPU machine run the test binary with `--ignored`. Every check uses
//! fresh random inputs (never zeros), poisons outputs (NaN) before the run, and fails on NaN.
#![allow(clippy::unwrap_used)]

use megamoe_cuda::{
    CudaMoe, Elem, Error, Gpu, MoeHostWeights, MoeShape, Operand, RouterSpec, Score,
};
use megamoe_moe::params::{fuse_gate_up, split_gate_up};
use megamoe_moe::{MoeConfig, MoeLayer, MoeParams, RouterLossScale};
use megamoe_plan::ScoreFn;
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
    eprintln!("  {name:<12} rel {r:.3e} (tol {tol:.0e})");
    assert!(
        r.is_finite() && r <= tol,
        "{name}: rel error {r:e} > {tol:e}"
    );
    assert!(
        want.iter().any(|&v| v != 0.0),
        "{name}: reference is all zeros"
    );
}

fn randn(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    Tensor::randn_named(seed, name, [n], std, Device::Cpu)
        .unwrap()
        .to_host_f32()
        .unwrap()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect()
}

#[test]
fn without_a_driver_the_error_is_one_line() {
    match Gpu::new(0) {
        Ok(gpu) => eprintln!("GPU present: {}", gpu.info().name),
        Err(e) => {
            assert!(matches!(e, Error::NoDriver { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.starts_with("CUDA driver not found"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn gemm_f32_matches_host_reference_all_transposes_and_batches() {
    let gpu = Gpu::new(0).expect(NEEDS_GPU);
    let (m, n, k, batch) = (37, 29, 53, 3);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = randn(11, "a", batch * m * k, 1.0);
        let b = randn(12, "b", batch * k * n, 1.0);
        let c0 = randn(13, "c", batch * m * n, 1.0);
        let (alpha, beta) = (0.75f32, 0.5f32);
        let mut want = vec![0f32; batch * m * n];
        for p in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0f64;
                    for l in 0..k {
                        let av = if ta {
                            a[p * m * k + l * m + i]
                        } else {
                            a[p * m * k + i * k + l]
                        };
                        let bv = if tb {
                            b[p * k * n + j * k + l]
                        } else {
                            b[p * k * n + l * n + j]
                        };
                        s += av as f64 * bv as f64;
                    }
                    let q = p * m * n + i * n + j;
                    want[q] = (alpha as f64 * s + beta as f64 * c0[q] as f64) as f32;
                }
            }
        }
        let (da, db, dc) = (
            gpu.alloc(a.len() * 4).unwrap(),
            gpu.alloc(b.len() * 4).unwrap(),
            gpu.alloc(c0.len() * 4).unwrap(),
        );
        gpu.upload(&da, &a).unwrap();
        gpu.upload(&db, &b).unwrap();
        gpu.upload(&dc, &c0).unwrap();
        let mut oa = Operand::dense(da.ptr(), Elem::F32, if ta { m } else { k }, m * k);
        oa.trans = ta;
        let mut ob = Operand::dense(db.ptr(), Elem::F32, if tb { k } else { n }, k * n);
        ob.trans = tb;
        let oc = Operand::dense(dc.ptr(), Elem::F32, n, m * n);
        gpu.gemm(m, n, k, oa, ob, oc, batch, alpha, beta).unwrap();
        let mut got = vec![0f32; c0.len()];
        gpu.download(&dc, &mut got).unwrap();
        check(
            &format!("gemm t{}{}", ta as u8, tb as u8),
            &got,
            &want,
            1e-6,
        );
    }
}

/// One parity case: a CPU layer from TOML, the same weights on the GPU.
struct Case {
    name: &'static str,
    moe_toml: &'static str,
    tokens: usize,
    seed: u64,
}

const MODEL: &str = "[model]\nvocab_size = 256\nd_model = 64\nn_layers = 1\nn_heads = 2\n\
                     ffn_hidden = 64\nseq_len = 32\n";

fn run_case(case: &Case, elem: Elem, tol: f64) {
    eprintln!("case {} ({elem:?})", case.name);
    let cfg = MoeConfig::from_toml_str(&format!("{MODEL}[moe]\n{}", case.moe_toml)).unwrap();
    let (n, h) = (case.tokens, cfg.d_model);
    let (e, f, k) = (
        cfg.router.num_routed_experts,
        cfg.routed_experts.hidden,
        cfg.router.top_k,
    );
    let cap = cfg
        .capacity_for(n)
        .expect("parity cases use a capacity factor");
    let r = &cfg.router;
    let spec = RouterSpec {
        score: match r.score_fn {
            ScoreFn::Softmax => Score::Softmax,
            ScoreFn::Sigmoid => Score::Sigmoid,
        },
        pre_softmax: r.pre_softmax,
        n_groups: r.group_routing.map_or(1, |g| g.n_groups),
        topk_groups: r.group_routing.map_or(1, |g| g.topk_groups),
        normalize: r.normalize,
        route_scale: r.route_scale,
        expert_bias: r.expert_bias,
    };
    // bf16 mode: the reference gets the same bf16-rounded inputs and weights, so routing
    // decisions are the same and only the storage rounding of activations differs.
    let prep = |v: Vec<f32>| {
        if elem == Elem::Bf16 {
            round_bf16(&v)
        } else {
            v
        }
    };
    let x = prep(randn(case.seed, "x", n * h, 1.0));
    let dy = prep(randn(case.seed, "dy", n * h, 1.0));
    let wr = prep(randn(case.seed, "wr", e * h, 0.5));
    let bias = randn(case.seed, "bias", e, 0.05);
    let wg = prep(randn(case.seed, "wg", e * f * h, (h as f32).powf(-0.5)));
    let wu = prep(randn(case.seed, "wu", e * f * h, (h as f32).powf(-0.5)));
    let wd = prep(randn(case.seed, "wd", e * h * f, (f as f32).powf(-0.5)));

    // CPU reference
    let t = |v: &[f32], s: Vec<usize>| Tensor::from_vec_f32(v.to_vec(), s, Device::Cpu).unwrap();
    let mut params = MoeParams::init(&cfg, 1, "").unwrap();
    params.router.weight = t(&wr, vec![e, h]);
    if cfg.router.expert_bias {
        params.router.expert_bias = Some(t(&bias, vec![e]));
    }
    // The CPU layer holds gate and up fused as one [E, 2F, H] bank.
    params.experts.in_proj = fuse_gate_up(&t(&wg, vec![e, f, h]), &t(&wu, vec![e, f, h])).unwrap();
    params.experts.down_proj = t(&wd, vec![e, h, f]);
    let layer = MoeLayer::new(cfg.clone()).unwrap();
    let (out, saved) = layer.forward(&params, &t(&x, vec![n, h])).unwrap();
    let kept: usize = out.stats.to_host().unwrap().tokens_per_expert.iter().sum();
    let mut grads = params.zeros_like().unwrap();
    let dx = layer
        .backward(
            &params,
            &t(&dy, vec![n, h]),
            saved,
            RouterLossScale::zero(),
            &mut grads,
        )
        .unwrap();

    // GPU
    let mut gpu = Gpu::new(0).expect(NEEDS_GPU);
    let shape = MoeShape {
        tokens: n,
        d_model: h,
        hidden: f,
        experts: e,
        top_k: k,
        capacity: cap,
    };
    let w = MoeHostWeights {
        router: &wr,
        expert_bias: spec.expert_bias.then_some(&bias[..]),
        gate_proj: &wg,
        up_proj: &wu,
        down_proj: &wd,
    };
    let moe = CudaMoe::new(&mut gpu, shape, spec, elem, &w).unwrap();
    moe.poison(&gpu).unwrap();
    moe.set_input(&gpu, &x).unwrap();
    moe.set_grad_output(&gpu, &dy).unwrap();
    moe.forward(&gpu).unwrap();
    moe.backward(&gpu, false).unwrap();
    let counts: i32 = moe.read_counts(&gpu).unwrap().iter().sum();
    assert_eq!(counts as usize, kept, "kept assignments (capacity {cap})");
    eprintln!("  kept {kept} of {} assignments, capacity {cap}", n * k);
    let g = moe.read_grads(&gpu).unwrap();
    check(
        "y",
        &moe.read_output(&gpu).unwrap(),
        &out.y.to_host_f32().unwrap(),
        tol,
    );
    check(
        "d_x",
        &moe.read_grad_input(&gpu).unwrap(),
        &dx.to_host_f32().unwrap(),
        tol,
    );
    check(
        "d_router",
        &g.router,
        &grads.router.weight.to_host_f32().unwrap(),
        tol,
    );
    let (cpu_gate, cpu_up) = split_gate_up(&grads.experts.in_proj).unwrap();
    check(
        "d_gate_proj",
        &g.gate_proj,
        &cpu_gate.to_host_f32().unwrap(),
        tol,
    );
    check("d_up_proj", &g.up_proj, &cpu_up.to_host_f32().unwrap(), tol);
    check(
        "d_down_proj",
        &g.down_proj,
        &grads.experts.down_proj.to_host_f32().unwrap(),
        tol,
    );
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "softmax top-2 of 8, capacity 1.0 (drops)",
            moe_toml: "routed_experts = 8\ntop_k = 2\nexpert_hidden = 32\ncapacity_factor = 1.0\n\
                       drop_policy = \"position\"\npad_to_capacity = true\npre_softmax = true\n\
                       aux_loss = \"none\"\n",
            tokens: 128,
            seed: 21,
        },
        Case {
            name: "sigmoid + bias + groups 4/2, top-4 of 16, scale 2.5",
            moe_toml:
                "routed_experts = 16\ntop_k = 4\nexpert_hidden = 48\ncapacity_factor = 1.25\n\
                       drop_policy = \"position\"\nscore_fn = \"sigmoid\"\nexpert_bias = true\n\
                       n_groups = 4\ntopk_groups = 2\nroute_scale = 2.5\nnormalize = true\n\
                       aux_loss = \"none\"\n",
            tokens: 96,
            seed: 22,
        },
        Case {
            name: "softmax after top-3 of 12, no renorm, capacity 0.75",
            moe_toml:
                "routed_experts = 12\ntop_k = 3\nexpert_hidden = 40\ncapacity_factor = 0.75\n\
                       drop_policy = \"position\"\npre_softmax = false\nnormalize = false\n\
                       aux_loss = \"none\"\n",
            tokens: 160,
            seed: 23,
        },
    ]
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn moe_layer_f32_matches_cpu_layer() {
    for c in cases() {
        run_case(&c, Elem::F32, 1e-5);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn moe_layer_bf16_matches_cpu_layer_on_rounded_inputs() {
    for c in cases() {
        run_case(&c, Elem::Bf16, 1e-2);
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
fn moe_layer_is_deterministic_and_graph_replay_matches_eager() {
    let mut gpu = Gpu::new(0).expect(NEEDS_GPU);
    let (n, h, f, e, k, cap) = (256, 128, 64, 8, 2, 80);
    let x = randn(31, "x", n * h, 1.0);
    let dy = randn(31, "dy", n * h, 1.0);
    let wr = randn(31, "wr", e * h, 0.3);
    let wg = randn(31, "wg", e * f * h, 0.1);
    let wu = randn(31, "wu", e * f * h, 0.1);
    let wd = randn(31, "wd", e * h * f, 0.1);
    let shape = MoeShape {
        tokens: n,
        d_model: h,
        hidden: f,
        experts: e,
        top_k: k,
        capacity: cap,
    };
    let w = MoeHostWeights {
        router: &wr,
        expert_bias: None,
        gate_proj: &wg,
        up_proj: &wu,
        down_proj: &wd,
    };
    let moe = CudaMoe::new(&mut gpu, shape, RouterSpec::default(), Elem::Bf16, &w).unwrap();
    moe.set_input(&gpu, &x).unwrap();
    moe.set_grad_output(&gpu, &dy).unwrap();
    let run_eager = || {
        moe.poison(&gpu).unwrap();
        moe.forward(&gpu).unwrap();
        moe.backward(&gpu, false).unwrap();
        (
            moe.read_output(&gpu).unwrap(),
            moe.read_grad_input(&gpu).unwrap(),
            moe.read_grads(&gpu).unwrap(),
        )
    };
    let (y1, dx1, g1) = run_eager();
    let (y2, dx2, _) = run_eager();
    assert!(y1.iter().all(|v| v.is_finite()) && dx1.iter().all(|v| v.is_finite()));
    assert_eq!(y1, y2, "forward is bitwise deterministic");
    assert_eq!(dx1, dx2, "backward is bitwise deterministic");
    let graph = gpu
        .capture(|g| {
            moe.forward(g)?;
            moe.backward(g, false)
        })
        .unwrap();
    moe.poison(&gpu).unwrap();
    gpu.replay(&graph).unwrap();
    gpu.synchronize().unwrap();
    assert_eq!(moe.read_output(&gpu).unwrap(), y1, "graph replay y");
    assert_eq!(moe.read_grad_input(&gpu).unwrap(), dx1, "graph replay d_x");
    assert_eq!(
        moe.read_grads(&gpu).unwrap().down_proj,
        g1.down_proj,
        "graph replay d_down"
    );
}
