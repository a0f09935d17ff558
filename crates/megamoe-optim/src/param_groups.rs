//! Parameter groups: which update rule each parameter gets, from its [`ParamRole`] and
//! `optim.name`.
//!
//! | role | `adamw` | `muon` | weight decay |
//! |---|---|---|---|
//! | Matrix | AdamW | Muon | yes |
//! | ExpertBank | AdamW | Muon, each expert matrix separately | yes |
//! | Embedding, Head, Gate | AdamW | AdamW | yes |
//! | Norm, Bias, Scalar | AdamW | AdamW | no |

use crate::ParamRole;
use megamoe_plan::OptimizerKind;

/// The update rule of one parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateRule {
    /// AdamW.
    AdamW {
        /// Whether decoupled weight decay applies.
        decay: bool,
    },
    /// Muon (2-D matrix or per-expert matrices of a bank).
    Muon {
        /// Whether decoupled weight decay applies.
        decay: bool,
    },
}

impl UpdateRule {
    /// Whether this rule is Muon.
    pub fn is_muon(self) -> bool {
        matches!(self, UpdateRule::Muon { .. })
    }
}

/// The rule for a parameter of `role` under optimizer `kind` (table in the module docs).
pub fn update_rule(kind: OptimizerKind, role: ParamRole) -> UpdateRule {
    let decay = role.has_weight_decay();
    if kind == OptimizerKind::Muon && role.is_muon_eligible() {
        UpdateRule::Muon { decay }
    } else {
        UpdateRule::AdamW { decay }
    }
}
