//! The CPU's reference FLOP/s for the MFU column when `--peak-flops` is not
//! given: the best rate of a dense f32 matrix multiply through megamoe's own
//! GEMM, measured once at the start of a run (about 0.2 s).
//!
//! This is an *achievable* peak on this machine, not the vendor's theoretical
//! number, so MFU here reads "share of the dense-GEMM rate the training step
//! reaches". Both the value and how it was obtained are printed in the run
//! header.

use std::time::{Duration, Instant};

use megamoe_tensor::{DType, Device, Tensor};

use crate::error::Result;

/// Side of the square matrices multiplied (512³ · 2 = 268 MFLOP per product).
const SIDE: usize = 512;

/// Measures the best f32 GEMM rate over repeated `[SIDE, SIDE] × [SIDE, SIDE]`
/// products for at least `budget` (and at least 3 products), in FLOP/s.
pub fn measure_cpu_gemm_flops(budget: Duration) -> Result<f64> {
    let a = Tensor::full([SIDE, SIDE], 0.5, DType::F32, Device::Cpu)?;
    let b = Tensor::full([SIDE, SIDE], 0.25, DType::F32, Device::Cpu)?;
    let flops = 2.0 * (SIDE * SIDE * SIDE) as f64;
    let started = Instant::now();
    let mut best = 0.0f64;
    let mut runs = 0;
    while runs < 3 || started.elapsed() < budget {
        let t = Instant::now();
        let c = a.matmul(&b, false, false)?;
        let s = t.elapsed().as_secs_f64();
        drop(c);
        if s > 0.0 {
            best = best.max(flops / s);
        }
        runs += 1;
    }
    Ok(best)
}
