//! [`MoeParams`]: every weight of one MoE layer by PyTorch/HF name — shapes, lookup,
//! layout-invariant init (whole bank or a rank's expert range), visiting.

use std::ops::Range;

use megamoe_optim::ParamRole;
use megamoe_plan::Activation;
use megamoe_tensor::{DType, Device, InitDist, Tensor};

use crate::config::MoeConfig;
use crate::error::{shape_str, Error, Result};
use crate::experts::{in_proj_name, in_proj_rows, zeros_like, RoutedExpertsParams};
use crate::router::RouterParams;
use crate::shared::SharedExpertsParams;

/// Every weight of one MoE layer; the same type holds gradients and optimizer moments.
#[derive(Debug, Clone)]
pub struct MoeParams {
    /// Router weights (`router.weight [E, H]`, `router.null_weight [1, H]`) and the
    /// `router.expert_bias [E]` buffer.
    pub router: RouterParams,
    /// `experts.gate_up_proj [E, 2F, H]` (swiglu: per expert the gate rows, then the up
    /// rows) or `experts.up_proj [E, F, H]` (relu2/gelu), and `experts.down_proj [E, H, F]`.
    pub experts: RoutedExpertsParams,
    /// `shared_experts.{gate,up,down}_proj [Fs, H] / [Fs, H] / [H, Fs]` and
    /// `shared_expert_gate.weight [1, H]`.
    pub shared_experts: Option<SharedExpertsParams>,
}

/// Parameter names (PyTorch/HF style, relative to the layer prefix) in visiting order.
pub const PARAM_NAMES: [&str; 9] = [
    "router.weight",
    "router.null_weight",
    "experts.gate_up_proj",
    "experts.up_proj",
    "experts.down_proj",
    "shared_experts.gate_proj",
    "shared_experts.up_proj",
    "shared_experts.down_proj",
    "shared_expert_gate.weight",
];

impl MoeParams {
    /// Shapes of every trained parameter of `cfg`, by name (no buffers).
    pub fn shapes(cfg: &MoeConfig) -> Vec<(&'static str, Vec<usize>, ParamRole)> {
        MoeParams::local_shapes(cfg, 0..cfg.router.num_routed_experts)
    }

    /// Shapes of the parameters a rank holds for local experts `experts` (the expert banks
    /// have `experts.len()` rows; everything else is replicated).
    pub fn local_shapes(
        cfg: &MoeConfig,
        experts: Range<usize>,
    ) -> Vec<(&'static str, Vec<usize>, ParamRole)> {
        let (e, h, f) = (
            cfg.router.num_routed_experts,
            cfg.d_model,
            cfg.routed_experts.hidden,
        );
        let el = experts.len();
        let swiglu = cfg.routed_experts.activation == Activation::SwiGlu;
        let mut v = vec![("router.weight", vec![e, h], ParamRole::Matrix)];
        if cfg.router.null_slots.is_some() {
            v.push(("router.null_weight", vec![1, h], ParamRole::Gate));
        }
        let act = cfg.routed_experts.activation;
        v.push((
            in_proj_name(act),
            vec![el, in_proj_rows(act, f), h],
            ParamRole::ExpertBank,
        ));
        v.push(("experts.down_proj", vec![el, h, f], ParamRole::ExpertBank));
        if let Some(s) = &cfg.shared_experts {
            if swiglu {
                v.push((
                    "shared_experts.gate_proj",
                    vec![s.hidden, h],
                    ParamRole::Matrix,
                ));
            }
            v.push((
                "shared_experts.up_proj",
                vec![s.hidden, h],
                ParamRole::Matrix,
            ));
            v.push((
                "shared_experts.down_proj",
                vec![h, s.hidden],
                ParamRole::Matrix,
            ));
            if s.gate {
                v.push(("shared_expert_gate.weight", vec![1, h], ParamRole::Gate));
            }
        }
        v
    }

    /// Builds params from a lookup by name (relative names of [`PARAM_NAMES`]); the expert
    /// bias buffer is looked up as `router.expert_bias` when `cfg.router.expert_bias`
    /// (absent → zeros). Missing or mis-shaped tensors are named errors. A swiglu bank may
    /// also come as the split PyTorch/HF pair `experts.gate_proj`, `experts.up_proj`
    /// (`[E, F, H]` each; the layout before the fused weight): they are fused
    /// ([`fuse_gate_up`]) when `experts.gate_up_proj` is absent.
    pub fn from_lookup(
        cfg: &MoeConfig,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<MoeParams> {
        let mut take = |name: &'static str, shape: Vec<usize>| -> Result<Tensor> {
            if name == GATE_UP {
                if let (None, Some(gate)) = (get(GATE_UP), get(SPLIT_GATE)) {
                    let half = [shape[0], shape[1] / 2, shape[2]];
                    check_named(SPLIT_GATE, &gate, &half)?;
                    let up = get(SPLIT_UP).ok_or_else(|| Error::MissingTensor {
                        name: SPLIT_UP.into(),
                        expected: shape_str(&half),
                    })?;
                    check_named(SPLIT_UP, &up, &half)?;
                    return fuse_gate_up(&gate, &up);
                }
            }
            let t = get(name).ok_or_else(|| Error::MissingTensor {
                name: name.into(),
                expected: shape_str(&shape),
            })?;
            check_named(name, &t, &shape)?;
            Ok(t)
        };
        let mut map = std::collections::BTreeMap::new();
        for (name, shape, _) in MoeParams::shapes(cfg) {
            map.insert(name, take(name, shape)?);
        }
        let e = cfg.router.num_routed_experts;
        // A missing bias starts at zero on the parameters' device.
        let device = map
            .get("router.weight")
            .map_or(Device::Cpu, |t: &Tensor| t.device());
        let expert_bias = if cfg.router.expert_bias {
            match get("router.expert_bias") {
                Some(b) => {
                    check_named("router.expert_bias", &b, &[e])?;
                    Some(b)
                }
                None => Some(Tensor::zeros([e], DType::F32, device)?),
            }
        } else {
            None
        };
        Ok(MoeParams::from_map(cfg, map, expert_bias))
    }

    fn from_map(
        cfg: &MoeConfig,
        mut m: std::collections::BTreeMap<&'static str, Tensor>,
        expert_bias: Option<Tensor>,
    ) -> MoeParams {
        let mut t = |n| m.remove(n);
        let router = RouterParams {
            weight: t("router.weight").expect("shapes() always lists router.weight"),
            null_weight: t("router.null_weight"),
            expert_bias,
        };
        let experts = RoutedExpertsParams {
            in_proj: t(in_proj_name(cfg.routed_experts.activation))
                .expect("shapes() always lists the experts' input projection"),
            down_proj: t("experts.down_proj").expect("shapes() always lists experts.down_proj"),
        };
        let shared_experts = if cfg.shared_experts.is_some() {
            Some(SharedExpertsParams {
                gate_proj: t("shared_experts.gate_proj"),
                up_proj: t("shared_experts.up_proj")
                    .expect("shapes() lists shared_experts.up_proj when shared experts are on"),
                down_proj: t("shared_experts.down_proj")
                    .expect("shapes() lists shared_experts.down_proj when shared experts are on"),
                gate: t("shared_expert_gate.weight"),
            })
        } else {
            None
        };
        MoeParams {
            router,
            experts,
            shared_experts,
        }
    }

    /// Layout-invariant init: every parameter `N(0, 1/fan_in)` drawn by
    /// `Tensor::randn_named(seed, prefix + name, ..)`; the expert bias starts at zero. The
    /// fused `experts.gate_up_proj` is drawn as its two halves under the names
    /// `experts.gate_proj` and `experts.up_proj` and fused: the same values as the split
    /// weights of the layout before the fusion.
    pub fn init(cfg: &MoeConfig, seed: u64, prefix: &str) -> Result<MoeParams> {
        MoeParams::init_local(cfg, seed, prefix, 0..cfg.router.num_routed_experts)
    }

    /// [`MoeParams::init`] for a rank owning experts `experts = [e0, e1)`: the expert banks
    /// are exactly rows `e0..e1` of the global banks (`Tensor::randn_named_rows`), the
    /// router and shared experts the same replicated tensors as on every rank.
    pub fn init_local(
        cfg: &MoeConfig,
        seed: u64,
        prefix: &str,
        experts: Range<usize>,
    ) -> Result<MoeParams> {
        MoeParams::init_shard(cfg, seed, prefix, experts, None)
    }

    /// [`MoeParams::init_local`] for a rank that also holds TP slice `tp = (rank, size)`
    /// of the shared experts ([`crate::SharedExperts::with_tensor_parallel`]): hidden
    /// units `tp_slice(Fs)` — those rows of `gate_proj` / `up_proj` and columns of
    /// `down_proj` of the one-rank tensors, drawn with the one-rank std.
    pub fn init_shard(
        cfg: &MoeConfig,
        seed: u64,
        prefix: &str,
        experts: Range<usize>,
        tp: Option<(usize, usize)>,
    ) -> Result<MoeParams> {
        let e = cfg.router.num_routed_experts;
        if experts.start >= experts.end || experts.end > e {
            return Err(Error::Config {
                field: "moe.routed_experts",
                value: format!("local experts {experts:?} of {e}"),
                rule: "a rank's expert range must be non-empty and within 0..routed_experts",
            });
        }
        let mut map = std::collections::BTreeMap::new();
        for (name, shape, role) in MoeParams::local_shapes(cfg, experts.clone()) {
            let fan_in = *shape.last().expect("parameter shapes have rank >= 2") as f32;
            let name_full = format!("{prefix}{name}");
            let t = if role == ParamRole::ExpertBank {
                let mut global = shape.clone();
                global[0] = e;
                let bank = |name: &str, global: Vec<usize>| {
                    Tensor::randn_named_rows(
                        seed,
                        &format!("{prefix}{name}"),
                        global,
                        experts.clone(),
                        fan_in.powf(-0.5),
                        Device::Cpu,
                    )
                };
                if name == GATE_UP {
                    global[1] /= 2;
                    fuse_gate_up(&bank(SPLIT_GATE, global.clone())?, &bank(SPLIT_UP, global)?)?
                } else {
                    bank(name, global)?
                }
            } else if let (Some((rank, size)), Some(dim)) = (tp, shared_split_dim(name)) {
                let hidden = shape[dim];
                let range = crate::tp::tp_slice(
                    "moe.shared_expert_hidden × moe.shared_experts",
                    hidden,
                    rank,
                    size,
                )?;
                Tensor::rand_named_slice(
                    seed,
                    &name_full,
                    &shape.clone().into(),
                    dim,
                    range,
                    InitDist::Normal {
                        std: fan_in.powf(-0.5),
                    },
                    Device::Cpu,
                )?
            } else {
                Tensor::randn_named(seed, &name_full, shape, fan_in.powf(-0.5), Device::Cpu)?
            };
            map.insert(name, t);
        }
        let bias = if cfg.router.expert_bias {
            Some(Tensor::zeros(
                [cfg.router.num_routed_experts],
                DType::F32,
                Device::Cpu,
            )?)
        } else {
            None
        };
        Ok(MoeParams::from_map(cfg, map, bias))
    }

    /// Zeros shaped like every parameter (a gradient accumulator); no expert-bias buffer.
    pub fn zeros_like(&self) -> Result<MoeParams> {
        let z = |t: &Option<Tensor>| -> Result<Option<Tensor>> {
            t.as_ref().map(zeros_like).transpose()
        };
        Ok(MoeParams {
            router: RouterParams {
                weight: zeros_like(&self.router.weight)?,
                null_weight: z(&self.router.null_weight)?,
                expert_bias: None,
            },
            experts: RoutedExpertsParams {
                in_proj: zeros_like(&self.experts.in_proj)?,
                down_proj: zeros_like(&self.experts.down_proj)?,
            },
            shared_experts: match &self.shared_experts {
                Some(s) => Some(SharedExpertsParams {
                    gate_proj: z(&s.gate_proj)?,
                    up_proj: zeros_like(&s.up_proj)?,
                    down_proj: zeros_like(&s.down_proj)?,
                    gate: z(&s.gate)?,
                }),
                None => None,
            },
        })
    }

    /// Visits every trained parameter as (`prefix + name`, tensor, role). The expert bias
    /// is a buffer and is not visited (see [`MoeParams::visit_buffers`]).
    pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor, ParamRole)) {
        let mut each = |name: &str, t: Option<&Tensor>, role| {
            if let Some(t) = t {
                f(&format!("{prefix}{name}"), t, role);
            }
        };
        each(
            "router.weight",
            Some(&self.router.weight),
            ParamRole::Matrix,
        );
        each(
            "router.null_weight",
            self.router.null_weight.as_ref(),
            ParamRole::Gate,
        );
        each(
            in_proj_name_of(&self.experts.in_proj, &self.experts.down_proj),
            Some(&self.experts.in_proj),
            ParamRole::ExpertBank,
        );
        each(
            "experts.down_proj",
            Some(&self.experts.down_proj),
            ParamRole::ExpertBank,
        );
        if let Some(s) = &self.shared_experts {
            each(
                "shared_experts.gate_proj",
                s.gate_proj.as_ref(),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.up_proj",
                Some(&s.up_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.down_proj",
                Some(&s.down_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_expert_gate.weight",
                s.gate.as_ref(),
                ParamRole::Gate,
            );
        }
    }

    /// Mutable twin of [`MoeParams::visit`] (same names, same order).
    pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &mut Tensor, ParamRole)) {
        let mut each = |name: &str, t: Option<&mut Tensor>, role| {
            if let Some(t) = t {
                f(&format!("{prefix}{name}"), t, role);
            }
        };
        each(
            "router.weight",
            Some(&mut self.router.weight),
            ParamRole::Matrix,
        );
        each(
            "router.null_weight",
            self.router.null_weight.as_mut(),
            ParamRole::Gate,
        );
        each(
            in_proj_name_of(&self.experts.in_proj, &self.experts.down_proj),
            Some(&mut self.experts.in_proj),
            ParamRole::ExpertBank,
        );
        each(
            "experts.down_proj",
            Some(&mut self.experts.down_proj),
            ParamRole::ExpertBank,
        );
        if let Some(s) = &mut self.shared_experts {
            each(
                "shared_experts.gate_proj",
                s.gate_proj.as_mut(),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.up_proj",
                Some(&mut s.up_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_experts.down_proj",
                Some(&mut s.down_proj),
                ParamRole::Matrix,
            );
            each(
                "shared_expert_gate.weight",
                s.gate.as_mut(),
                ParamRole::Gate,
            );
        }
    }

    /// Visits the non-trained buffers: `router.expert_bias` when present.
    pub fn visit_buffers(&self, prefix: &str, f: &mut dyn FnMut(&str, &Tensor)) {
        if let Some(b) = &self.router.expert_bias {
            f(&format!("{prefix}router.expert_bias"), b);
        }
    }
}

fn check_named(name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dtype() != DType::F32 {
        return Err(Error::TensorDType {
            name: name.into(),
            expected: "f32",
            got: t.dtype().to_string(),
        });
    }
    if t.dims() != shape {
        return Err(Error::TensorShape {
            name: name.into(),
            expected: shape.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// The dimension a tensor-parallel rank slices of a shared-expert weight (relative name):
/// the hidden units, rows of `gate_proj` / `up_proj` and columns of `down_proj`; `None` for
/// the replicated weights.
pub fn shared_split_dim(name: &str) -> Option<usize> {
    match name {
        "shared_experts.gate_proj" | "shared_experts.up_proj" => Some(0),
        "shared_experts.down_proj" => Some(1),
        _ => None,
    }
}

/// The fused swiglu input projection and the split names its halves had (and still have in
/// PyTorch/HF checkpoints and the probe's interchange format).
const GATE_UP: &str = "experts.gate_up_proj";
const SPLIT_GATE: &str = "experts.gate_proj";
const SPLIT_UP: &str = "experts.up_proj";

/// The name of a bank's input projection, read from the shapes (a visit has no config):
/// `[E, 2F, H]` against `W_down [E, H, F]` is the fused gate‖up, `[E, F, H]` a plain up.
fn in_proj_name_of(in_proj: &Tensor, down_proj: &Tensor) -> &'static str {
    match (in_proj.dims(), down_proj.dims()) {
        ([_, rows, _], [_, _, f]) if *rows == 2 * f && *f > 0 => GATE_UP,
        _ => SPLIT_UP,
    }
}

/// `W_gate_up [E, 2F, H]` from `W_gate`, `W_up [E, F, H]`: expert `e`'s gate rows, then its
/// up rows (one copy).
pub fn fuse_gate_up(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&[gate, up], 1)?)
}

/// The halves `(W_gate, W_up)`, `[E, F, H]` each, of `W_gate_up [E, 2F, H]` (copies).
pub fn split_gate_up(gate_up: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, rows, _) = gate_up.dims3()?;
    let f = rows / 2;
    Ok((gate_up.narrow(1, 0, f)?, gate_up.narrow(1, f, f)?))
}
