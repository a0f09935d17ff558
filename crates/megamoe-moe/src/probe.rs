//! The probe: one MoE layer forward and backward on named tensors, for checking megamoe
//! against a PyTorch/Megatron layer (spec "Probe interface"; `megamoe probe moe`).
//!
//! Inputs (PyTorch Linear layout, experts stacked on dim 0): `x [T, H]`, `dy [T, H]`,
//! `router.weight [E, H]`, `router.null_weight [1, H]` (null slots), `router.expert_bias [E]`
//! (when `moe.expert_bias`), `experts.gate_proj [E, F, H]` (swiglu), `experts.up_proj
//! [E, F, H]`, `experts.down_proj [E, H, F]`, `shared_experts.{gate,up,down}_proj`,
//! `shared_expert_gate.weight [1, H]`. All f32. This is the PyTorch/HF interchange layout:
//! the layer itself holds a swiglu bank's gate and up projections fused as
//! `experts.gate_up_proj [E, 2F, H]`; the probe fuses the two inputs and splits the fused
//! gradient back into `grad.experts.gate_proj` and `grad.experts.up_proj`.
//!
//! Outputs: `y`, `aux_loss [1]`, `z_loss [1]` (unweighted), `tokens_per_expert [E]` (kept,
//! f32), `dropped [1]`, `dx`, and `grad.<name>` for every parameter, of the objective
//! `L = Σ(y ⊙ dy) + aux_loss_weight · aux + z_loss_weight · z`.

use megamoe_tensor::{DType, Device, Tensor};

use crate::config::MoeConfig;
use crate::error::{shape_str, Error, Result};
use crate::layer::MoeLayer;
use crate::losses::RouterLossScale;
use crate::params::{split_gate_up, MoeParams};

/// Every input the probe reads for `tokens` tokens, with its shape, in a fixed order.
pub fn probe_input_shapes(cfg: &MoeConfig, tokens: usize) -> Vec<(String, Vec<usize>)> {
    let h = cfg.d_model;
    let mut v = vec![
        ("x".to_string(), vec![tokens, h]),
        ("dy".to_string(), vec![tokens, h]),
    ];
    if cfg.router.expert_bias {
        v.push((
            "router.expert_bias".to_string(),
            vec![cfg.router.num_routed_experts],
        ));
    }
    for (name, shape, _) in MoeParams::shapes(cfg) {
        if name == GATE_UP {
            let half = vec![shape[0], shape[1] / 2, shape[2]];
            v.push((SPLIT_GATE.to_string(), half.clone()));
            v.push((SPLIT_UP.to_string(), half));
        } else {
            v.push((name.to_string(), shape));
        }
    }
    v
}

/// The fused swiglu projection and its split interchange names.
const GATE_UP: &str = "experts.gate_up_proj";
const SPLIT_GATE: &str = "experts.gate_proj";
const SPLIT_UP: &str = "experts.up_proj";

fn find<'a>(inputs: &'a [(String, Tensor)], name: &str) -> Option<&'a Tensor> {
    inputs.iter().find(|(n, _)| n == name).map(|(_, t)| t)
}

fn check_f32(name: &str, t: &Tensor) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::TensorDType {
            name: name.into(),
            expected: "f32",
            got: t.dtype().to_string(),
        });
    }
    Ok(())
}

/// Checks every input (names, shapes, dtypes) and returns T. Unused extra tensors are
/// returned as names (the CLI warns about them).
pub fn check_probe_inputs(
    cfg: &MoeConfig,
    inputs: &[(String, Tensor)],
) -> Result<(usize, Vec<String>)> {
    let h = cfg.d_model;
    let x = find(inputs, "x").ok_or_else(|| Error::MissingTensor {
        name: "x".into(),
        expected: format!("[T, {h}] f32"),
    })?;
    check_f32("x", x)?;
    if x.rank() != 2 || x.dims()[1] != h {
        return Err(Error::TensorShape {
            name: "x".into(),
            expected: vec![x.dims().first().copied().unwrap_or(0), h],
            got: x.dims().to_vec(),
        });
    }
    let t = x.dims()[0];
    if t == 0 || !t.is_multiple_of(cfg.seq_len) {
        return Err(Error::Tokens {
            tokens: t,
            rule: format!(
                "tensor `x` must have a positive multiple of model.seq_len={} rows",
                cfg.seq_len
            ),
        });
    }
    let expected = probe_input_shapes(cfg, t);
    for (name, shape) in &expected {
        let got = find(inputs, name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            expected: shape_str(shape),
        })?;
        check_f32(name, got)?;
        if got.dims() != shape.as_slice() {
            return Err(Error::TensorShape {
                name: name.clone(),
                expected: shape.clone(),
                got: got.dims().to_vec(),
            });
        }
    }
    let unused = inputs
        .iter()
        .filter(|(n, _)| !expected.iter().any(|(e, _)| e == n))
        .map(|(n, _)| n.clone())
        .collect();
    Ok((t, unused))
}

/// Runs forward + backward on the named inputs; returns the named outputs.
pub fn run_probe(cfg: &MoeConfig, inputs: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    check_probe_inputs(cfg, inputs)?;
    let get = |n: &str| find(inputs, n).cloned();
    let params = MoeParams::from_lookup(cfg, get)?;
    let x = find(inputs, "x")
        .cloned()
        .ok_or_else(|| Error::MissingTensor {
            name: "x".into(),
            expected: "[T, H] f32".into(),
        })?;
    let dy = find(inputs, "dy")
        .cloned()
        .ok_or_else(|| Error::MissingTensor {
            name: "dy".into(),
            expected: shape_str(x.dims()),
        })?;
    let layer = MoeLayer::new(cfg.clone())?;
    let (out, saved) = layer.forward(&params, &x)?;
    let scale = RouterLossScale {
        aux: cfg.aux_loss_weight as f32,
        z: cfg.z_loss_weight as f32,
    };
    let mut grads = params.zeros_like()?;
    let dx = layer.backward(&params, &dy, saved, scale, &mut grads)?;
    let stats = out.stats.to_host()?;
    let e = cfg.router.num_routed_experts;
    let tpe: Vec<f32> = stats.tokens_per_expert.iter().map(|&c| c as f32).collect();
    let mut v = vec![
        ("y".to_string(), out.y),
        ("aux_loss".to_string(), out.aux_loss.reshape([1])?),
        ("z_loss".to_string(), out.z_loss.reshape([1])?),
        (
            "tokens_per_expert".to_string(),
            Tensor::from_vec_f32(tpe, [e], Device::Cpu)?,
        ),
        (
            "dropped".to_string(),
            Tensor::from_vec_f32(vec![stats.dropped as f32], [1], Device::Cpu)?,
        ),
        ("dx".to_string(), dx),
    ];
    let mut named = Vec::new();
    grads.visit("", &mut |name, t, _| {
        named.push((name.to_string(), t.clone()))
    });
    for (name, t) in named {
        if name == GATE_UP {
            let (gate, up) = split_gate_up(&t)?;
            v.push((format!("grad.{SPLIT_GATE}"), gate));
            v.push((format!("grad.{SPLIT_UP}"), up));
        } else {
            v.push((format!("grad.{name}"), t));
        }
    }
    Ok(v)
}
