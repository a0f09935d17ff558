//! Shared helpers of the MoE integration tests: tiny configs and host-side tensor access.
#![allow(clippy::unwrap_used, dead_code)] // test helpers: a failed unwrap is a failed test

pub mod exchange;

use megamoe_moe::{MoeConfig, MoeLayer, MoeParams, RouterLossScale};
use megamoe_tensor::{Device, Tensor};

/// A config from a `[moe]` body on a tiny model (d_model 6, seq_len 4).
pub fn config(moe: &str) -> MoeConfig {
    let text = format!(
        "[model]\nvocab_size = 16\nd_model = 6\nn_layers = 1\nn_heads = 1\nffn_hidden = 8\n\
         seq_len = 4\n[moe]\n{moe}\n"
    );
    MoeConfig::from_toml_str(&text).unwrap()
}

/// The FD test configs: together they cover every router mode, capacity (packed and
/// static-capacity buffers), null slots, shared experts with the gate, all activations and
/// all loss kinds.
pub fn fd_configs() -> Vec<(&'static str, MoeConfig)> {
    vec![
        (
            "softmax_capacity_shared_gate_swiglu",
            config(
                "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\ncapacity_factor = 0.75\n\
                 shared_experts = 1\nshared_expert_hidden = 3\nshared_expert_gate = true\n\
                 aux_loss_weight = 0.5\nz_loss_weight = 0.3",
            ),
        ),
        (
            "sigmoid_groups_bias_seq_aux_relu2",
            config(
                "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\nscore_fn = \"sigmoid\"\n\
                 n_groups = 2\ntopk_groups = 1\nexpert_bias = true\nroute_scale = 2.5\n\
                 activation = \"relu2\"\naux_loss = \"seq_aux\"\naux_loss_weight = 0.5\n\
                 z_loss_weight = 0.3",
            ),
        ),
        (
            "null_slots_pre_softmax_gelu",
            config(
                "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\nnull_rho = 0.5\n\
                 pre_softmax = true\nnormalize = true\nactivation = \"gelu\"\n\
                 aux_loss_weight = 0.5\nz_loss_weight = 0.3\nshared_experts = 1\n\
                 shared_expert_hidden = 3",
            ),
        ),
        (
            "null_slots_sigmoid_position_drop",
            config(
                "routed_experts = 4\ntop_k = 1\nexpert_hidden = 5\nnull_rho = 0.5\n\
                 score_fn = \"sigmoid\"\ncapacity_factor = 1.0\ndrop_policy = \"position\"\n\
                 aux_loss_weight = 0.5\nz_loss_weight = 0.3",
            ),
        ),
        (
            "static_capacity_probs_shared_swiglu",
            config(
                "routed_experts = 4\ntop_k = 2\nexpert_hidden = 5\ncapacity_factor = 0.75\n\
                 pad_to_capacity = true\nshared_experts = 1\nshared_expert_hidden = 3\n\
                 aux_loss_weight = 0.5\nz_loss_weight = 0.3",
            ),
        ),
    ]
}

/// Host values of a float tensor.
pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_host_f32().unwrap()
}

/// `t` with element `i` replaced by `v`.
pub fn with_elem(t: &Tensor, i: usize, v: f32) -> Tensor {
    let mut h = host(t);
    h[i] = v;
    Tensor::from_vec_f32(h, t.dims().to_vec(), Device::Cpu).unwrap()
}

/// Params with a non-zero expert bias (when the config has one), so selection differs
/// from plain top-k.
pub fn params(cfg: &MoeConfig, seed: u64) -> MoeParams {
    let mut p = MoeParams::init(cfg, seed, "").unwrap();
    if p.router.expert_bias.is_some() {
        let e = cfg.router.num_routed_experts;
        p.router.expert_bias =
            Some(Tensor::randn_named(seed, "bias", [e], 0.1, Device::Cpu).unwrap());
    }
    p
}

/// Objective `L = Σ(y ⊙ dy) + w_aux · aux + w_z · z` in f64 on the host, and the routing
/// fingerprint (slots and kept permutation) so an FD step that flips a decision is seen.
pub fn objective(layer: &MoeLayer, p: &MoeParams, x: &Tensor, dy: &Tensor) -> (f64, Vec<i32>) {
    let cfg = layer.config();
    let (out, saved) = layer.forward(p, x).unwrap();
    let y = host(&out.y);
    let d = host(dy);
    let mut l: f64 = y.iter().zip(&d).map(|(a, b)| *a as f64 * *b as f64).sum();
    l += cfg.aux_loss_weight * out.aux_loss.to_scalar_f32().unwrap() as f64;
    l += cfg.z_loss_weight * out.z_loss.to_scalar_f32().unwrap() as f64;
    let mut fp = saved.routing().slots.to_host_i32().unwrap();
    fp.extend(host(saved.keep()).iter().map(|&v| v as i32));
    (l, fp)
}

/// Analytic gradients of [`objective`]: (d_x, grads).
pub fn analytic(layer: &MoeLayer, p: &MoeParams, x: &Tensor, dy: &Tensor) -> (Tensor, MoeParams) {
    let cfg = layer.config();
    let (_, saved) = layer.forward(p, x).unwrap();
    let mut g = p.zeros_like().unwrap();
    let scale = RouterLossScale {
        aux: cfg.aux_loss_weight as f32,
        z: cfg.z_loss_weight as f32,
    };
    let dx = layer.backward(p, dy, saved, scale, &mut g).unwrap();
    (dx, g)
}

/// Inputs x, dy for `n` tokens of width `h`.
pub fn inputs(n: usize, h: usize, seed: u64) -> (Tensor, Tensor) {
    (
        Tensor::randn_named(seed, "x", [n, h], 1.0, Device::Cpu).unwrap(),
        Tensor::randn_named(seed, "dy", [n, h], 1.0, Device::Cpu).unwrap(),
    )
}
