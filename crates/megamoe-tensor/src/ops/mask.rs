//! Comparison masks (model crate's family): threshold and equality tests that return f32
//! `0/1` tensors of the input's shape, for elementwise mixing (FlexiDepth `g > τ`) and
//! padding masks (`targets == ignore_index`). Masks carry no gradient.

use crate::{Result, Tensor};

impl Tensor {
    /// `1.0` where `self > thr`, else `0.0` (NaN → 0). Any float or i32 input; f32 result.
    pub fn gt_scalar(&self, thr: f32) -> Result<Tensor> {
        self.backend().gt_scalar(self, thr)
    }

    /// `1.0` where `self == value`, else `0.0`. Any float or i32 input (i32 compared exactly
    /// for |value| < 2^24); f32 result.
    pub fn eq_scalar(&self, value: f32) -> Result<Tensor> {
        self.backend().eq_scalar(self, value)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Device, Tensor};

    #[test]
    fn gt_and_eq_masks_are_zero_one() {
        let x = Tensor::from_vec_f32(vec![0.2, 0.5, 0.7, f32::NAN], [4], Device::Cpu).unwrap();
        // strict: 0.5 > 0.5 is false; NaN compares false.
        assert_eq!(
            x.gt_scalar(0.5).unwrap().to_host_f32().unwrap(),
            vec![0., 0., 1., 0.]
        );
        let t = Tensor::from_vec_i32(vec![3, -100, 7, -100], [2, 2], Device::Cpu).unwrap();
        let m = t.eq_scalar(-100.0).unwrap();
        assert_eq!(m.dims(), [2, 2]);
        assert_eq!(m.to_host_f32().unwrap(), vec![0., 1., 0., 1.]);
    }
}
