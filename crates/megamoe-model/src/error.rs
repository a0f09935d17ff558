//! Typed errors of the model crate.

/// Result alias of the model crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Every failure the model's constructors, forward and backward can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- lower crates ----
    /// A tensor op failed (shape, dtype, index out of range, ...).
    #[error(transparent)]
    Tensor(#[from] megamoe_tensor::Error),
    /// The MoE layer failed (config, routing, shapes).
    #[error(transparent)]
    Moe(#[from] megamoe_moe::Error),

    /// The per-layer parameter hook ([`crate::BlockGather`]) failed.
    #[error("gathering the parameters of layer {layer} failed: {source}")]
    Gather {
        /// The layer.
        layer: usize,
        /// What the hook reported.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The per-layer gradient hook ([`crate::GradReady`]) failed.
    #[error("starting the gradient reduce of layer {layer} failed: {source}")]
    GradReady {
        /// The layer.
        layer: usize,
        /// What the hook reported.
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    // ---- config ----
    /// A config value breaks a rule of the model.
    #[error("model config: {field}={value} {rule}")]
    Config {
        /// Config field.
        field: &'static str,
        /// Offending value.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },

    // ---- inputs ----
    /// An input tensor has the wrong shape or dtype.
    #[error("model input `{arg}`: got shape {got:?}, {rule}")]
    Input {
        /// Argument name.
        arg: &'static str,
        /// Actual shape.
        got: Vec<usize>,
        /// What should have held.
        rule: &'static str,
    },

    /// A model chunk (pipeline stage) was called out of its contract: a micro-batch's
    /// backward before its forward, a chunk missing a parameter it reads, chunks that do
    /// not tile the model.
    #[error("model chunk{}: {rule}", micro_batch.map(|m| format!(" (micro-batch {m})")).unwrap_or_default())]
    Stage {
        /// The micro-batch concerned, if any.
        micro_batch: Option<usize>,
        /// What went wrong.
        rule: &'static str,
    },

    /// A gradient in [`crate::GradBuffers`] was replaced by a fresh tensor instead of being
    /// accumulated in place, so it no longer views its slot of the flat gradient buffer.
    #[error("gradient {name} no longer views its slot of the flat gradient buffer (it was replaced instead of accumulated in place)")]
    GradDetached {
        /// Parameter name.
        name: String,
    },

    /// A saved-activation record does not belong to the layer or parameters it is given to.
    #[error("{layer}: saved activations do not match: {rule}")]
    SavedMismatch {
        /// Layer name.
        layer: &'static str,
        /// What did not match.
        rule: &'static str,
    },
}
