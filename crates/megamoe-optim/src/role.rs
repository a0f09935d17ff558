//! What a trained parameter is for: the optimizer's grouping key (here, not in the tensor
//! crate: a tensor does not know what it is trained for).
//!
//! Layers enumerate their parameters as `(name, &Tensor, ParamRole)`; the
//! optimizer routes hidden matrices (and each expert matrix of a stacked
//! expert bank) to Muon and everything else to AdamW, following the Muon
//! recipe (KellerJordan/Muon, Moonlight).

/// The role of one parameter tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// A hidden 2-D weight `[out, in]` (attention projections, dense FFN,
    /// router, adapters): Muon-eligible.
    Matrix,
    /// A stack of expert matrices `[E, out, in]`: Muon runs on each `[out, in]`
    /// slice separately.
    ExpertBank,
    /// Token embedding `[V, H]` (AdamW).
    Embedding,
    /// LM head `[V, H]` (AdamW).
    Head,
    /// Normalisation weight `[H]` (AdamW, no weight decay).
    Norm,
    /// Bias vector (AdamW, no weight decay).
    Bias,
    /// A gate's weight (GateSkip, shared-expert gate, FlexiDepth head): AdamW.
    Gate,
    /// Any other scalar or vector parameter (AdamW).
    Scalar,
}

impl ParamRole {
    /// Whether Muon (rather than AdamW) updates a parameter of this role.
    pub fn is_muon_eligible(self) -> bool {
        matches!(self, ParamRole::Matrix | ParamRole::ExpertBank)
    }

    /// Whether decoupled weight decay applies (not to norms, biases, scalars).
    pub fn has_weight_decay(self) -> bool {
        !matches!(self, ParamRole::Norm | ParamRole::Bias | ParamRole::Scalar)
    }
}
