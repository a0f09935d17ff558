//! Typed errors of the MoE layer: bad configs, bad tensors handed to a layer or the probe,
//! and errors of the tensor engine underneath.

/// Result alias of the MoE crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Every failure of the MoE layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- config ----
    /// A config value breaks a rule of the MoE layer.
    #[error("{field}={value} invalid: {rule}")]
    Config {
        /// Config key, e.g. `moe.top_k`.
        field: &'static str,
        /// The value given, formatted.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// The run config has no `[moe]` section (or `moe.routed_experts = 0`).
    #[error("config has no MoE layer: [moe] is missing or moe.routed_experts = 0")]
    NoMoeSection,
    /// The plan crate rejected the config.
    #[error(transparent)]
    Plan(#[from] megamoe_plan::PlanError),

    // ---- tensors ----
    /// A named tensor (parameter or probe input) is absent.
    #[error("tensor `{name}`: missing (expected {expected})")]
    MissingTensor {
        /// Tensor name, e.g. `experts.gate_proj`.
        name: String,
        /// Expected shape and dtype, e.g. `[8, 12, 16] f32`.
        expected: String,
    },
    /// A named tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, got {got:?}")]
    TensorShape {
        /// Tensor name.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },
    /// A named tensor has the wrong dtype.
    #[error("tensor `{name}`: expected dtype {expected}, got {got}")]
    TensorDType {
        /// Tensor name.
        name: String,
        /// Expected dtype, in words.
        expected: &'static str,
        /// Actual dtype.
        got: String,
    },
    /// The token count does not fit the layer (e.g. not a multiple of the sequence length).
    #[error("tokens T={tokens} invalid: {rule}")]
    Tokens {
        /// T.
        tokens: usize,
        /// The rule it breaks.
        rule: String,
    },
    /// A layer was given parameters that do not match its config.
    #[error("{what}: expected shape {expected:?}, got {got:?}")]
    ParamShape {
        /// Which parameter or operand.
        what: &'static str,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
    },

    // ---- engine ----
    /// An expert-parallel exchange (the communicator under a
    /// [`RowExchange`](crate::RowExchange)) failed.
    #[error("expert-parallel exchange failed: {0}")]
    Exchange(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A tensor-parallel all-reduce (the communicator under a
    /// [`TensorParallel`](crate::TensorParallel)) failed.
    #[error("tensor-parallel all-reduce failed: {0}")]
    TensorParallel(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An op of the tensor engine failed.
    #[error(transparent)]
    Tensor(#[from] megamoe_tensor::Error),
}

/// Checks that `t` has shape `expected`, naming `what` on failure.
pub(crate) fn check_shape(
    what: &'static str,
    t: &megamoe_tensor::Tensor,
    expected: &[usize],
) -> Result<()> {
    if t.dims() != expected {
        return Err(Error::ParamShape {
            what,
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// `[a, b] f32`: how an expected tensor is named in errors.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?} f32")
}
