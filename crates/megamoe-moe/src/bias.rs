//! Expert-bias update for aux-loss-free balancing (Loss-Free Balancing, arXiv 2408.15664;
//! DeepSeek-V3).
//!
//! Once per optimizer step, with `c_i` the global-batch token count of expert i
//! (all-reduced over DP/EP/TP/CP by the caller, padding tokens excluded):
//! `b_i ← b_i + γ · sign(mean(c) − c_i)` (sign(0) = 0; under-loaded experts rise).
//! Option `centre` subtracts the mean update so `b` stays centred (torchtitan/Moonlight).
//! The bias is a buffer: it changes selection only, never gates or losses, and has no
//! gradient.

use megamoe_tensor::{DType, Tensor};

use crate::error::{check_shape, Result};

/// The update rule's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertBiasUpdate {
    /// γ (`moe.bias_update_rate`, default 1e-3).
    pub rate: f32,
    /// Subtract the mean update.
    pub centre: bool,
}

impl ExpertBiasUpdate {
    /// Returns the updated bias `b + Δb` for counts `c [E]` (f32 or i32 counts).
    pub fn apply(&self, bias: &Tensor, counts: &Tensor) -> Result<Tensor> {
        let e = bias.numel();
        check_shape("expert bias counts", counts, &[e])?;
        check_shape("router.expert_bias", bias, &[e])?;
        let c = counts.to_dtype(DType::F32)?;
        Ok(bias.add(&c.expert_bias_step(self.rate, self.centre)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use megamoe_tensor::Device;

    #[test]
    fn bias_update_raises_underloaded_lowers_overloaded() {
        // counts [1, 3, 2, 2]: mean 2 → signs [+1, −1, 0, 0]; γ = 0.5.
        let b = Tensor::from_vec_f32(vec![0.0, 0.0, 1.0, 0.0], [4], Device::Cpu).unwrap();
        let c = Tensor::from_vec_f32(vec![1.0, 3.0, 2.0, 2.0], [4], Device::Cpu).unwrap();
        let upd = ExpertBiasUpdate {
            rate: 0.5,
            centre: false,
        };
        assert_eq!(
            upd.apply(&b, &c).unwrap().to_host_f32().unwrap(),
            vec![0.5, -0.5, 1.0, 0.0]
        );
        // counts [0, 0, 0, 4]: mean 1 → [+, +, +, −] = [.5, .5, .5, −.5], mean Δ = 0.25;
        // centred Δ = [.25, .25, .25, −.75].
        let c = Tensor::from_vec_f32(vec![0.0, 0.0, 0.0, 4.0], [4], Device::Cpu).unwrap();
        let z = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
        let upd = ExpertBiasUpdate {
            rate: 0.5,
            centre: true,
        };
        assert_eq!(
            upd.apply(&z, &c).unwrap().to_host_f32().unwrap(),
            vec![0.25, 0.25, 0.25, -0.75]
        );
    }

    #[test]
    fn bias_update_rejects_wrong_count_shape() {
        let b = Tensor::zeros([4], DType::F32, Device::Cpu).unwrap();
        let c = Tensor::zeros([3], DType::F32, Device::Cpu).unwrap();
        let upd = ExpertBiasUpdate {
            rate: 1e-3,
            centre: false,
        };
        assert!(upd.apply(&b, &c).is_err());
    }
}
