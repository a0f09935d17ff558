//! Layout-invariant parameter initialisation: every tensor is drawn by
//! `Tensor::randn_named(seed, full_name, shape, std)` (counter-based RNG keyed by the seed,
//! the parameter's HF-style name and the global element index), so any sharding of the
//! model materialises exactly its slice of the same global weights.

use megamoe_optim::ParamRole;
use megamoe_tensor::{DType, Device, Tensor};

use crate::error::Result;

/// The init seed and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    /// Run seed.
    pub seed: u64,
    /// Device the parameters live on.
    pub device: Device,
}

impl Init {
    /// CPU init with `seed`.
    pub fn new(seed: u64) -> Init {
        Init {
            seed,
            device: Device::Cpu,
        }
    }

    /// `N(0, std²)` tensor named `name`.
    pub fn randn(&self, name: &str, dims: &[usize], std: f32) -> Result<Tensor> {
        Ok(Tensor::randn_named(
            self.seed,
            name,
            dims.to_vec(),
            std,
            self.device,
        )?)
    }

    /// A constant tensor (norm weights = 1, gate biases).
    pub fn full(&self, dims: &[usize], value: f32) -> Result<Tensor> {
        Ok(Tensor::full(dims.to_vec(), value, DType::F32, self.device)?)
    }
}

/// The callback type of `visit_mut`.
pub type ParamVisitorMut<'a> = dyn FnMut(&str, &mut Tensor, ParamRole) + 'a;

/// Replaces every parameter a `visit_mut` reaches by zeros of its shape (gradient buffers).
pub fn zeros_like_params(visit_mut: &mut dyn FnMut(&mut ParamVisitorMut)) -> Result<()> {
    let mut err = None;
    visit_mut(
        &mut |_, t, _| match Tensor::zeros(t.dims().to_vec(), DType::F32, t.device()) {
            Ok(z) => *t = z,
            Err(e) => err = Some(e),
        },
    );
    match err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
