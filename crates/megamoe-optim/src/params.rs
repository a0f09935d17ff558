//! How the optimizer sees parameters: through `visit` callbacks over
//! `(name, tensor, ParamRole)` (LAYER_API.md), never through a concrete model type.
//!
//! The step API takes two closures, one visiting the parameters mutably and one visiting
//! the gradients (the same params type holds gradients), e.g. for a model:
//!
//! ```text
//! optimizer.step(&mut |f| params.visit_mut("", f), &mut |f| grads.visit("", f), lr)?;
//! ```
//!
//! [`NamedParams`] is a minimal params container with the same `visit`/`visit_mut`
//! methods, for tests, examples and callers with loose tensors.

use crate::ParamRole;
use megamoe_tensor::Tensor;

/// Callback receiving one parameter (or gradient) by shared reference.
pub type VisitFn<'a> = dyn FnMut(&str, &Tensor, ParamRole) + 'a;
/// Callback receiving one parameter by mutable reference.
pub type VisitMutFn<'a> = dyn FnMut(&str, &mut Tensor, ParamRole) + 'a;
/// A visitor: calls the callback once per tensor, in a fixed order.
pub type Visitor<'a> = dyn FnMut(&mut VisitFn<'_>) + 'a;
/// A mutable visitor: calls the callback once per parameter, in a fixed order.
pub type VisitorMut<'a> = dyn FnMut(&mut VisitMutFn<'_>) + 'a;

/// A flat, ordered list of named parameters (or gradients) with roles.
#[derive(Debug, Clone, Default)]
pub struct NamedParams {
    /// `(name, tensor, role)` in visit order.
    pub entries: Vec<(String, Tensor, ParamRole)>,
}

impl NamedParams {
    /// An empty list.
    pub fn new() -> NamedParams {
        NamedParams::default()
    }

    /// Appends one parameter.
    pub fn push(&mut self, name: impl Into<String>, tensor: Tensor, role: ParamRole) {
        self.entries.push((name.into(), tensor, role));
    }

    /// The tensor named `name` (names are compared without prefix).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, t, _)| t)
    }

    /// Visits every entry as `(prefix + name, tensor, role)`.
    pub fn visit(&self, prefix: &str, f: &mut VisitFn<'_>) {
        for (name, t, role) in &self.entries {
            f(&format!("{prefix}{name}"), t, *role);
        }
    }

    /// Visits every entry mutably as `(prefix + name, tensor, role)`.
    pub fn visit_mut(&mut self, prefix: &str, f: &mut VisitMutFn<'_>) {
        for (name, t, role) in &mut self.entries {
            f(&format!("{prefix}{name}"), t, *role);
        }
    }

    /// Same names and roles, every tensor replaced by `f(tensor)` (e.g. zeros for grads).
    pub fn map(
        &self,
        mut f: impl FnMut(&Tensor) -> megamoe_tensor::Result<Tensor>,
    ) -> megamoe_tensor::Result<NamedParams> {
        let mut entries = Vec::with_capacity(self.entries.len());
        for (n, t, r) in &self.entries {
            entries.push((n.clone(), f(t)?, *r));
        }
        Ok(NamedParams { entries })
    }
}
