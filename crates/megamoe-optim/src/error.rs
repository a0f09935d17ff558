//! The crate's typed error: every variant names the parameter (or state key), the value and
//! the rule that was broken.

use crate::ParamRole;

/// Result alias of this crate.
pub type Result<T, E = OptimError> = std::result::Result<T, E>;

/// Everything that can go wrong building or stepping an optimizer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptimError {
    /// A tensor op failed (shapes are checked before ops, so this is a bug or a device error).
    #[error(transparent)]
    Tensor(#[from] megamoe_tensor::Error),

    /// A shard-rule check from `megamoe_plan` failed.
    #[error(transparent)]
    Plan(#[from] megamoe_plan::PlanError),

    /// Two parameters share one name.
    #[error("parameter `{name}` is visited twice; parameter names must be unique")]
    DuplicateParam {
        /// The repeated name.
        name: String,
    },

    /// A parameter seen by `step` was not registered by `Optimizer::new`.
    #[error("parameter `{name}` is not known to the optimizer (not visited at construction)")]
    UnknownParam {
        /// The parameter name.
        name: String,
    },

    /// A registered parameter was not visited by `step`.
    #[error("parameter `{name}` was registered but not visited in this step")]
    ParamNotVisited {
        /// The parameter name.
        name: String,
    },

    /// A parameter has no gradient.
    #[error("no gradient for parameter `{name}`")]
    MissingGrad {
        /// The parameter name.
        name: String,
    },

    /// A gradient has no parameter.
    #[error("gradient `{name}` has no parameter of that name")]
    OrphanGrad {
        /// The gradient name.
        name: String,
    },

    /// Parameter and gradient (or registered shape) disagree.
    #[error("`{name}`: {what} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The parameter name.
        name: String,
        /// Which tensor is wrong ("gradient", "parameter").
        what: &'static str,
        /// The registered parameter shape.
        expected: Vec<usize>,
        /// The shape seen.
        got: Vec<usize>,
    },

    /// A parameter's rank does not fit its role (Matrix must be 2-D, ExpertBank 3-D).
    #[error("parameter `{name}` with role {role:?} has shape {dims:?}; {rule}")]
    RoleShape {
        /// The parameter name.
        name: String,
        /// Its declared role.
        role: ParamRole,
        /// Its shape.
        dims: Vec<usize>,
        /// The rule.
        rule: &'static str,
    },

    /// A fused-projection split does not fit the parameter.
    #[error("fused split {splits:?} of `{name}` is invalid: {rule} (rows={rows})")]
    FusedSplit {
        /// The parameter name.
        name: String,
        /// The declared block rows.
        splits: Vec<usize>,
        /// Rows of the parameter (per matrix).
        rows: usize,
        /// The rule.
        rule: &'static str,
    },

    /// `optim.name = "muon"` but the plan carries no Muon settings.
    #[error("optim.name=muon but the plan has no [optim] Muon settings (OptimPlan.muon is None)")]
    MissingMuonPlan,

    /// A checkpointed state tensor is missing.
    #[error("optimizer state `{key}` is missing from the checkpoint")]
    StateMissing {
        /// The state key, e.g. `exp_avg.model.norm.weight`.
        key: String,
    },

    /// A checkpointed state tensor has no matching parameter.
    #[error("optimizer state `{key}` in the checkpoint matches no parameter of this model")]
    StateUnexpected {
        /// The state key.
        key: String,
    },

    /// A checkpointed AdamW moment is f32 but `optim.moment_dtype = "bf16"` (loading it
    /// would round it).
    #[error(
        "optimizer state `{key}` is {got} in the checkpoint but optim.moment_dtype = \"{expected}\": \
         resume with optim.moment_dtype = \"{got}\" (moments are not rounded on load)"
    )]
    StateDType {
        /// The state key.
        key: String,
        /// The configured moment dtype (`f32` or `bf16`).
        expected: &'static str,
        /// The dtype found (`f32` or `bf16`).
        got: &'static str,
    },

    /// A checkpointed state tensor has the wrong shape.
    #[error("optimizer state `{key}` has shape {got:?} in the checkpoint, expected {expected:?}")]
    StateShape {
        /// The state key.
        key: String,
        /// The shape this model needs.
        expected: Vec<usize>,
        /// The shape found.
        got: Vec<usize>,
    },

    /// The collective of a sharded step (gathering a Muon matrix's rows) failed.
    #[error("gathering the rows of `{name}` for distributed Muon failed: {source}")]
    Gather {
        /// The parameter name.
        name: String,
        /// What the communicator reported.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A numeric argument is out of range.
    #[error("{field}={value} is invalid: {rule}")]
    InvalidArgument {
        /// The argument or config field.
        field: &'static str,
        /// Its value.
        value: String,
        /// The rule.
        rule: &'static str,
    },
}
