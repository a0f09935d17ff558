//! [`Optimizer`]: per-parameter state keyed by parameter name, routed by [`ParamRole`]
//! (Muon for hidden matrices when `optim.name = "muon"`, AdamW for the rest), enumerable
//! for checkpoints and loadable back with shape checks.
//!
//! State keys (PyTorch `state_dict` vocabulary, flattened):
//! - `exp_avg.<param>`, `exp_avg_sq.<param>`: AdamW moments (f32, or bf16 with
//!   `optim.moment_dtype = "bf16"`, which loads only bf16 moments: no rounding on load);
//! - `momentum_buffer.<param>`: Muon momentum (f32);
//! - `master.<param>`: f32 master copy of a parameter stored in bf16.
//!
//! The step count (bias correction) is a host integer: [`Optimizer::steps_taken`] goes into
//! the checkpoint JSON and back through [`Optimizer::load_state`].
//!
//! # Flat moments
//! [`Optimizer::flatten_state`] lays the moments out in two flat write-through buffers, like
//! the model's flat gradient buffer: `first` holds every parameter's first moment (AdamW's
//! `exp_avg` or Muon's `momentum_buffer`: each parameter has exactly one) at the offsets of
//! registration order — the gradient buffer's layout when the optimizer was registered from
//! the same parameter visit — and `second` the AdamW parameters' `exp_avg_sq`, packed in the
//! same order. Per-parameter state tensors are then views of them, updated in place by the
//! fused AdamW op and the Muon momentum step; the bits are those of separate buffers. A clone
//! of a flat optimizer shares the buffers (the write-through rule); [`Optimizer::load_state`]
//! lays the loaded state out in fresh buffers, so loading into a clone leaves the original
//! untouched. Write-through buffers are f32: bf16 AdamW moments stay one whole buffer per
//! parameter (each written in place by the fused AdamW op and the flat AdamW launch), and
//! `first` then holds only Muon's momentum (`second` is empty).

use std::collections::{HashMap, HashSet};

use crate::ParamRole;
use megamoe_plan::{qkv_local_split_sizes, OptimPlan, OptimizerKind};
use megamoe_tensor::{AdamWStep, DType, Tensor};

use crate::adamw::{adamw_update, adamw_update_in_place, AdamWConfig, AdamWState};
use crate::error::{OptimError, Result};
use crate::muon::{
    apply_update, momentum_step, muon_update, orthogonalize, MuonConfig, NsPrecision,
};
use crate::param_groups::{update_rule, UpdateRule};
use crate::params::{Visitor, VisitorMut};
use crate::shard::RowGather;

/// State key prefixes, in the order [`Optimizer::visit_state`] yields them per parameter.
pub const STATE_KINDS: [&str; 4] = ["exp_avg", "exp_avg_sq", "momentum_buffer", "master"];

/// Everything the optimizer keeps for one parameter.
#[derive(Debug, Clone)]
pub struct ParamState {
    /// Parameter name.
    pub name: String,
    /// Role it was registered with.
    pub role: ParamRole,
    /// Shape it was registered with.
    pub dims: Vec<usize>,
    /// Update rule.
    pub rule: UpdateRule,
    /// Fused row blocks (declared full rows; empty = not fused).
    pub fused_blocks: Vec<usize>,
    /// AdamW moments (AdamW rule).
    pub adamw: Option<AdamWState>,
    /// Muon momentum (Muon rule).
    pub momentum: Option<Tensor>,
    /// f32 master weights when the parameter is stored in bf16.
    pub master: Option<Tensor>,
}

impl ParamState {
    fn tensors(&self) -> [(&'static str, Option<&Tensor>); 4] {
        [
            ("exp_avg", self.adamw.as_ref().map(|s| &s.exp_avg)),
            ("exp_avg_sq", self.adamw.as_ref().map(|s| &s.exp_avg_sq)),
            ("momentum_buffer", self.momentum.as_ref()),
            ("master", self.master.as_ref()),
        ]
    }

    fn tensor_mut(&mut self, kind: &str) -> Option<&mut Tensor> {
        match kind {
            "exp_avg" => self.adamw.as_mut().map(|s| &mut s.exp_avg),
            "exp_avg_sq" => self.adamw.as_mut().map(|s| &mut s.exp_avg_sq),
            "momentum_buffer" => self.momentum.as_mut(),
            "master" => self.master.as_mut(),
            _ => None,
        }
    }

    /// Row blocks for NS given the per-matrix row count (seed `qkv_local_split_sizes` when
    /// the parameter is a local shard of the declared fused rows).
    fn blocks(&self) -> Vec<usize> {
        if self.fused_blocks.is_empty() {
            return Vec::new();
        }
        let rows = match self.dims.as_slice() {
            [r, _] | [_, r, _] => *r,
            _ => 0,
        };
        qkv_local_split_sizes(&self.fused_blocks, rows)
    }
}

/// AdamW + Muon over named parameters (see the module docs for state keys).
#[derive(Debug, Clone)]
pub struct Optimizer {
    plan: OptimPlan,
    adamw: AdamWConfig,
    muon: Option<MuonConfig>,
    params: Vec<ParamState>,
    index: HashMap<String, usize>,
    steps: u64,
    /// The flat moment buffers `(first, second)` once [`Optimizer::flatten_state`] ran.
    flat: Option<(Tensor, Tensor)>,
}

/// Names ending in this are an expert bank's SwiGLU gate and up projections fused by rows,
/// `[E, 2F, H]` with each expert's gate rows first (`experts.gate_up_proj`): Muon
/// orthogonalises every expert's gate and up `[F, H]` matrices separately, exactly as it does
/// two separate gate and up banks (same bits).
pub const GATE_UP_SUFFIX: &str = "gate_up_proj";

/// The row blocks `[F, F]` of a fused gate‖up bank `[E, 2F, H]` named `*gate_up_proj`, else
/// none.
fn gate_up_blocks(name: &str, dims: &[usize]) -> Vec<usize> {
    match dims {
        [_, rows, _] if name.ends_with(GATE_UP_SUFFIX) && *rows >= 2 && rows % 2 == 0 => {
            vec![rows / 2, rows / 2]
        }
        _ => Vec::new(),
    }
}

fn check_role_shape(name: &str, role: ParamRole, dims: &[usize], muon: bool) -> Result<()> {
    let (ok, rule) = match role {
        ParamRole::Matrix => (dims.len() == 2, "a Matrix parameter must be 2-D [out, in]"),
        ParamRole::ExpertBank => (
            dims.len() == 3,
            "an ExpertBank parameter must be 3-D [E, out, in]",
        ),
        _ => (true, ""),
    };
    if muon && !ok {
        return Err(OptimError::RoleShape {
            name: name.to_string(),
            role,
            dims: dims.to_vec(),
            rule,
        });
    }
    Ok(())
}

impl Optimizer {
    /// Registers every parameter `visit_params` yields and allocates zero state for it.
    ///
    /// Errors: duplicate names, Muon-routed parameters of the wrong rank, `optim.name =
    /// muon` without Muon settings, invalid AdamW numbers.
    pub fn new(plan: &OptimPlan, visit_params: &mut Visitor<'_>) -> Result<Optimizer> {
        let adamw = AdamWConfig::from_plan(plan);
        adamw.validate()?;
        let muon = match (plan.kind, plan.muon) {
            (OptimizerKind::Muon, Some(m)) => Some(MuonConfig::from_plan(plan, &m)),
            (OptimizerKind::Muon, None) => return Err(OptimError::MissingMuonPlan),
            _ => None,
        };
        let mut opt = Optimizer {
            plan: *plan,
            adamw,
            muon,
            params: Vec::new(),
            index: HashMap::new(),
            steps: 0,
            flat: None,
        };
        let mut err: Option<OptimError> = None;
        visit_params(&mut |name, t, role| {
            if err.is_none() {
                if let Err(e) = opt.register(name, t, role) {
                    err = Some(e);
                }
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(opt),
        }
    }

    fn register(&mut self, name: &str, t: &Tensor, role: ParamRole) -> Result<()> {
        if self.index.contains_key(name) {
            return Err(OptimError::DuplicateParam {
                name: name.to_string(),
            });
        }
        let rule = update_rule(self.plan.kind, role);
        check_role_shape(name, role, t.dims(), rule.is_muon())?;
        let zeros = || Tensor::zeros(t.dims(), DType::F32, t.device());
        let (adamw, momentum) = match rule {
            UpdateRule::AdamW { .. } => (
                Some(AdamWState::zeros_as(t, self.adamw.moment_dtype())?),
                None,
            ),
            UpdateRule::Muon { .. } => (None, Some(zeros()?)),
        };
        let master = match t.dtype() {
            DType::BF16 => Some(t.to_dtype(DType::F32)?),
            _ => None,
        };
        self.index.insert(name.to_string(), self.params.len());
        self.params.push(ParamState {
            name: name.to_string(),
            role,
            dims: t.dims().to_vec(),
            rule,
            fused_blocks: gate_up_blocks(name, t.dims()),
            adamw,
            momentum,
            master,
        });
        Ok(())
    }

    /// Declares `name` a fused projection whose rows are the blocks `splits` (e.g. q, k, v
    /// rows of a fused QKV weight): Muon orthogonalises each block on its own. When the
    /// parameter holds fewer rows than `Σ splits` (a local shard), the blocks are scaled with
    /// the seed's `qkv_local_split_sizes`. No effect on AdamW-routed parameters.
    pub fn with_fused_split(mut self, name: &str, splits: &[usize]) -> Result<Optimizer> {
        let idx = *self
            .index
            .get(name)
            .ok_or_else(|| OptimError::UnknownParam {
                name: name.to_string(),
            })?;
        let p = &mut self.params[idx];
        let rows = match p.dims.as_slice() {
            [r, _] | [_, r, _] => *r,
            _ => 0,
        };
        let full: usize = splits.iter().sum();
        let rule = if splits.len() < 2 {
            Some("needs at least two blocks")
        } else if splits.contains(&0) {
            Some("every block needs at least one row")
        } else if rows > full {
            Some("the blocks must cover at least the parameter's rows")
        } else {
            None
        };
        if let Some(rule) = rule {
            return Err(OptimError::FusedSplit {
                name: name.to_string(),
                splits: splits.to_vec(),
                rows,
                rule,
            });
        }
        p.fused_blocks = splits.to_vec();
        Ok(self)
    }

    /// Moves the moments into two flat write-through buffers (see the module doc), keeping
    /// their values. Every state tensor must live on one device.
    pub fn flatten_state(&mut self) -> Result<()> {
        let mut device = None;
        let (mut first_len, mut second_len) = (0, 0);
        for p in &self.params {
            for (kind, t) in p.tensors() {
                let Some(t) = t else { continue };
                if kind == "master" || t.dtype() != DType::F32 {
                    continue; // not a moment, or a bf16 moment (a buffer of its own)
                }
                if *device.get_or_insert(t.device()) != t.device() {
                    return Err(OptimError::InvalidArgument {
                        field: "optimizer state",
                        value: format!("{kind}.{} on {}", p.name, t.device()),
                        rule: "flat moments need every state tensor on one device",
                    });
                }
                if kind == "exp_avg_sq" {
                    second_len += t.numel();
                } else {
                    first_len += t.numel();
                }
            }
        }
        let device = device.unwrap_or(megamoe_tensor::Device::Cpu);
        // SAFETY: the buffers belong to this optimizer, stepped by one thread (its rank's)
        // at a time; checkpoints read them between steps.
        let (first, second) = unsafe {
            (
                Tensor::write_through_zeros([first_len], device)?,
                Tensor::write_through_zeros([second_len], device)?,
            )
        };
        let (mut at_first, mut at_second) = (0, 0);
        for p in &mut self.params {
            for kind in ["exp_avg", "exp_avg_sq", "momentum_buffer"] {
                let Some(slot) = p.tensor_mut(kind).filter(|t| t.dtype() == DType::F32) else {
                    continue;
                };
                let (buf, at) = if kind == "exp_avg_sq" {
                    (&second, &mut at_second)
                } else {
                    (&first, &mut at_first)
                };
                let mut view = buf.view(*at, slot.dims().to_vec())?;
                view.copy_from(slot)?;
                *at += slot.numel();
                *slot = view;
            }
        }
        self.flat = Some((first, second));
        Ok(())
    }

    /// The flat moment buffers `(first, second)` (see the module doc), if flattened.
    pub fn flat_state(&self) -> Option<(&Tensor, &Tensor)> {
        self.flat.as_ref().map(|(a, b)| (a, b))
    }

    /// Sets the Newton–Schulz element type (default f32).
    pub fn set_ns_precision(&mut self, precision: NsPrecision) {
        if let Some(m) = &mut self.muon {
            m.ns_precision = precision;
        }
    }

    /// Optimizer steps taken so far (bias-correction count; store it in the checkpoint).
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// The settings this optimizer was built from.
    pub fn plan(&self) -> &OptimPlan {
        &self.plan
    }

    /// The state of every parameter, in registration order.
    pub fn param_states(&self) -> &[ParamState] {
        &self.params
    }

    /// The update rule of parameter `name`.
    pub fn rule_of(&self, name: &str) -> Option<UpdateRule> {
        self.index.get(name).map(|&i| self.params[i].rule)
    }

    /// Muon's learning rate when AdamW's is `lr`: `muon.lr · lr / optim.lr` (same schedule).
    pub fn muon_lr(&self, lr: f64) -> Option<f64> {
        self.plan.muon.map(|m| m.lr * lr / self.plan.lr)
    }

    /// One optimizer step over every registered parameter.
    ///
    /// `lr` is the AdamW learning rate of this step (`Schedule::lr`); Muon parameters use
    /// [`Optimizer::muon_lr`]`(lr)`. Every parameter must have exactly one gradient of its
    /// shape (same name); every registered parameter must be visited. All names and shapes
    /// are checked before anything is updated, so on such an error nothing changes.
    pub fn step(
        &mut self,
        visit_params: &mut VisitorMut<'_>,
        visit_grads: &mut Visitor<'_>,
        lr: f64,
    ) -> Result<()> {
        self.step_with(visit_params, visit_grads, lr, None)
    }

    /// [`Optimizer::step`] on this rank's dim-0 row shards of the parameters (FSDP /
    /// ZeRO): `visit_params` and `visit_grads` yield the rank's rows (the shapes the
    /// optimizer was built with), AdamW runs on them as they are (elementwise), and every
    /// Muon parameter's momentum-updated input `U` goes to `gather`
    /// ([`RowGather::gather_rows`]): when it returns the full matrix, NS5 runs on the full
    /// matrix (fused row blocks as declared) and the rank keeps its rows of the result
    /// (distributed Muon, Moonlight Algorithm 1); when it returns `None` the rows are
    /// whole matrices (an expert bank sharded over experts, or an unsharded parameter) and
    /// NS5 runs on them directly. Every rank must call this with the same parameters in
    /// the same order (the gathers are collectives).
    pub fn step_sharded(
        &mut self,
        visit_params: &mut VisitorMut<'_>,
        visit_grads: &mut Visitor<'_>,
        lr: f64,
        gather: &mut dyn RowGather,
    ) -> Result<()> {
        self.step_with(visit_params, visit_grads, lr, Some(gather))
    }

    fn step_with(
        &mut self,
        visit_params: &mut VisitorMut<'_>,
        visit_grads: &mut Visitor<'_>,
        lr: f64,
        mut gather: Option<&mut dyn RowGather>,
    ) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(OptimError::InvalidArgument {
                field: "lr",
                value: lr.to_string(),
                rule: "must be finite and >= 0",
            });
        }
        let grads = self.collect_grads(visit_grads)?;
        self.check_params(visit_params, &grads)?;
        let t = self.steps + 1;
        let muon_lr = self.muon_lr(lr).unwrap_or(lr);
        let mut err: Option<OptimError> = None;
        let (adamw, muon) = (self.adamw, self.muon);
        let (params, index) = (&mut self.params, &self.index);
        visit_params(&mut |name, p, _| {
            if err.is_some() {
                return;
            }
            let (Some(&i), Some(g)) = (index.get(name), grads.get(name)) else {
                return; // checked above
            };
            let st = &mut params[i];
            let rates = Rates { lr, muon_lr, t };
            let gather = gather.as_deref_mut();
            let result = update_one(st, p, g, &adamw, muon.as_ref(), rates, gather);
            if let Err(e) = result {
                err = Some(e);
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        self.steps = t;
        Ok(())
    }

    /// An AdamW step whose per-parameter update runs elsewhere (a captured CUDA graph's
    /// kernel reading its constants from device memory): checks names and shapes like
    /// [`Optimizer::step`], then calls `update(param, moments, grad, decay)` for every
    /// parameter in registration-visit order. The step count does not advance: call
    /// [`Optimizer::count_step`] once the update is known to have been applied, and take
    /// the scalars from [`Optimizer::next_adamw_step`]. Only for AdamW on f32 parameters
    /// with moments (made with the optimizer); anything else is refused by name before
    /// any update.
    pub fn step_adamw_with(
        &mut self,
        visit_params: &mut VisitorMut<'_>,
        visit_grads: &mut Visitor<'_>,
        update: &mut dyn FnMut(&mut Tensor, &mut AdamWState, &Tensor, bool) -> Result<()>,
    ) -> Result<()> {
        let grads = self.collect_grads(visit_grads)?;
        self.check_params(visit_params, &grads)?;
        for st in &self.params {
            let why = match st.rule {
                UpdateRule::Muon { .. } if self.muon.is_some() => {
                    Some("runs AdamW only (not Muon)")
                }
                _ if st.master.is_some() => {
                    Some("runs on f32 parameters (not bf16 with master weights)")
                }
                _ if st.adamw.is_none() => Some("needs AdamW moments"),
                _ => None,
            };
            if let Some(rule) = why {
                return Err(OptimError::InvalidArgument {
                    field: "step_adamw_with",
                    value: st.name.clone(),
                    rule,
                });
            }
        }
        let mut err: Option<OptimError> = None;
        let (params, index) = (&mut self.params, &self.index);
        visit_params(&mut |name, p, _| {
            if err.is_some() {
                return;
            }
            let (Some(&i), Some(g)) = (index.get(name), grads.get(name)) else {
                return; // checked above
            };
            let st = &mut params[i];
            let decay = match st.rule {
                UpdateRule::AdamW { decay } | UpdateRule::Muon { decay } => decay,
            };
            if let Some(moments) = st.adamw.as_mut() {
                if let Err(e) = update(p, moments, g, decay) {
                    err = Some(e);
                }
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// The scalars of the next AdamW step at learning rate `lr` (`t` = steps taken + 1),
    /// with or without weight decay: what [`Optimizer::step`] would pass to the update.
    pub fn next_adamw_step(&self, lr: f64, decay: bool) -> AdamWStep {
        let c = &self.adamw;
        AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: if decay { c.weight_decay } else { 0.0 },
            t: self.steps + 1,
        }
    }

    /// Counts one applied step of [`Optimizer::step_adamw_with`].
    pub fn count_step(&mut self) {
        self.steps += 1;
    }

    fn collect_grads(&self, visit_grads: &mut Visitor<'_>) -> Result<HashMap<String, Tensor>> {
        let mut grads = HashMap::with_capacity(self.params.len());
        let mut err: Option<OptimError> = None;
        visit_grads(&mut |name, g, _| {
            if err.is_some() {
                return;
            }
            let Some(&i) = self.index.get(name) else {
                err = Some(OptimError::OrphanGrad {
                    name: name.to_string(),
                });
                return;
            };
            if g.dims() != self.params[i].dims.as_slice() {
                err = Some(OptimError::ShapeMismatch {
                    name: name.to_string(),
                    what: "gradient",
                    expected: self.params[i].dims.clone(),
                    got: g.dims().to_vec(),
                });
                return;
            }
            if grads.insert(name.to_string(), g.clone()).is_some() {
                err = Some(OptimError::DuplicateParam {
                    name: name.to_string(),
                });
            }
        });
        match err {
            Some(e) => Err(e),
            None => Ok(grads),
        }
    }

    fn check_params(
        &self,
        visit_params: &mut VisitorMut<'_>,
        grads: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let mut seen = HashSet::with_capacity(self.params.len());
        let mut err: Option<OptimError> = None;
        visit_params(&mut |name, p, _| {
            if err.is_some() {
                return;
            }
            let Some(&i) = self.index.get(name) else {
                err = Some(OptimError::UnknownParam {
                    name: name.to_string(),
                });
                return;
            };
            if p.dims() != self.params[i].dims.as_slice() {
                err = Some(OptimError::ShapeMismatch {
                    name: name.to_string(),
                    what: "parameter",
                    expected: self.params[i].dims.clone(),
                    got: p.dims().to_vec(),
                });
            } else if !grads.contains_key(name) {
                err = Some(OptimError::MissingGrad {
                    name: name.to_string(),
                });
            } else if !seen.insert(name.to_string()) {
                err = Some(OptimError::DuplicateParam {
                    name: name.to_string(),
                });
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if let Some(p) = self.params.iter().find(|p| !seen.contains(&p.name)) {
            return Err(OptimError::ParamNotVisited {
                name: p.name.clone(),
            });
        }
        Ok(())
    }

    /// Visits every state tensor as `("<kind>.<param>", tensor)`, parameters in registration
    /// order, kinds in [`STATE_KINDS`] order (only those the parameter has).
    pub fn visit_state(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        for p in &self.params {
            for (kind, t) in p.tensors() {
                if let Some(t) = t {
                    f(&format!("{kind}.{}", p.name), t);
                }
            }
        }
    }

    /// Every state key this optimizer expects, in [`Optimizer::visit_state`] order.
    pub fn state_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        self.visit_state(&mut |k, _| keys.push(k.to_string()));
        keys
    }

    /// Replaces the whole state with checkpointed tensors and the step count. With
    /// `optim.moment_dtype = "bf16"` the AdamW moments must be bf16 (f32 ones would be
    /// rounded: [`OptimError::StateDType`]); otherwise every tensor may be f32 or bf16 and
    /// is stored as f32 (bf16 widens exactly). Every
    /// expected key must be present with this model's shape and no other key may appear; on
    /// any error nothing is changed.
    pub fn load_state(
        &mut self,
        steps_taken: u64,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
    ) -> Result<()> {
        let mut given: HashMap<String, Tensor> = tensors.into_iter().collect();
        let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
        self.visit_state(&mut |k, t| expected.push((k.to_string(), t.dims().to_vec())));
        let mut loaded = Vec::with_capacity(expected.len());
        for (key, dims) in expected {
            let t = given
                .remove(&key)
                .ok_or_else(|| OptimError::StateMissing { key: key.clone() })?;
            if t.dims() != dims.as_slice() {
                return Err(OptimError::StateShape {
                    key,
                    expected: dims,
                    got: t.dims().to_vec(),
                });
            }
            let moment = key.starts_with("exp_avg.") || key.starts_with("exp_avg_sq.");
            // bf16 → f32 widens exactly (the old state is kept bit for bit); f32 → bf16
            // would round it, so it is refused.
            if moment && t.dtype() != DType::BF16 && self.adamw.moment_dtype() == DType::BF16 {
                return Err(OptimError::StateDType {
                    key,
                    expected: self.adamw.moment_dtype.name(),
                    got: dtype_name(t.dtype()),
                });
            }
            let t = if moment && self.adamw.moment_dtype() == DType::BF16 {
                // A whole buffer of its own: the AdamW update writes it in place.
                t.deep_copy()?
            } else {
                t.to_dtype(DType::F32)?
            };
            loaded.push((key, t));
        }
        if let Some(key) = given.into_keys().min() {
            return Err(OptimError::StateUnexpected { key });
        }
        for (key, t) in loaded {
            let (kind, name) = key.split_once('.').unwrap_or((key.as_str(), ""));
            if let Some(slot) = self
                .index
                .get(name)
                .and_then(|&i| self.params[i].tensor_mut(kind))
            {
                *slot = t;
            }
        }
        self.steps = steps_taken;
        if self.flat.is_some() {
            self.flatten_state()?;
        }
        Ok(())
    }
}

/// The config name of a state tensor's dtype.
fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::I32 => "i32",
    }
}

/// One step's learning rates and AdamW step count.
#[derive(Debug, Clone, Copy)]
struct Rates {
    lr: f64,
    muon_lr: f64,
    t: u64,
}

/// Updates one parameter in place (through its f32 master copy when it is stored in bf16).
/// With `gather`, a Muon parameter is a row shard (see [`Optimizer::step_sharded`]).
fn update_one<'g>(
    st: &mut ParamState,
    p: &mut Tensor,
    g: &Tensor,
    adamw: &AdamWConfig,
    muon: Option<&MuonConfig>,
    rates: Rates,
    gather: Option<&mut (dyn RowGather + 'g)>,
) -> Result<()> {
    let Rates { lr, muon_lr, t } = rates;
    let current = st.master.clone().unwrap_or_else(|| p.clone());
    let new = match (st.rule, muon) {
        (UpdateRule::Muon { decay }, Some(cfg)) => {
            let blocks = st.blocks();
            let buf = match &mut st.momentum {
                Some(b) => b,
                None => {
                    st.momentum
                        .insert(Tensor::zeros(current.dims(), DType::F32, current.device())?)
                }
            };
            match gather {
                None => muon_update(&current, g, buf, cfg, muon_lr, &blocks, decay)?,
                Some(gather) => {
                    let u = momentum_step(buf, g, cfg.momentum, cfg.nesterov)?;
                    let o = match gather.gather_rows(&st.name, &u)? {
                        Some((full, rows)) => {
                            let o = orthogonalize(
                                &full,
                                &st.fused_blocks,
                                cfg.scale,
                                cfg.ns_precision,
                            )?;
                            gather.keep(&st.name, &o, rows)?
                        }
                        None => orthogonalize(&u, &blocks, cfg.scale, cfg.ns_precision)?,
                    };
                    let wd = if decay { cfg.weight_decay } else { 0.0 };
                    apply_update(&current, &o, muon_lr, wd)?
                }
            }
        }
        (UpdateRule::AdamW { decay }, _) | (UpdateRule::Muon { decay }, None) => {
            let state = match &mut st.adamw {
                Some(s) => s,
                None => st
                    .adamw
                    .insert(AdamWState::zeros_as(&current, adamw.moment_dtype())?),
            };
            if st.master.is_none() {
                // An f32 parameter is updated in place: it keeps its buffer (and address)
                // once `current`'s extra reference is gone.
                drop(current);
                return adamw_update_in_place(p, g, state, adamw, lr, t, decay);
            }
            adamw_update(&current, g, state, adamw, lr, t, decay)?
        }
    };
    if st.master.is_some() {
        *p = new.to_dtype(p.dtype())?;
        st.master = Some(new);
    } else {
        // Muon on an f32 parameter: the result is copied into the parameter's own buffer
        // (bit for bit), so the parameter keeps its address like AdamW's in-place update.
        drop(current);
        p.copy_from(&new)?;
    }
    Ok(())
}
