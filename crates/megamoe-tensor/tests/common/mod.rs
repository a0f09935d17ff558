//! Shared helpers for the integration tests: a tiny deterministic generator (independent of
//! the crate's RNG) and comparison helpers.
#![allow(dead_code)]

use megamoe_tensor::{Device, Tensor};

/// xorshift64* uniform values in [-1, 1).
pub fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let v = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
            (v as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

pub fn rand_t(seed: u64, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec_f32(rand_vec(seed, n), shape, Device::Cpu).unwrap()
}

pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_host_f32().unwrap()
}

/// max |a-b| / (|b| + atol) must be ≤ rtol.
pub fn assert_close(got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= rtol * w.abs() + atol,
            "element {i}: got {g}, want {w}, err {err}"
        );
    }
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Runs `f` in a rayon pool of `threads` threads.
pub fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// Bitwise equality of f32 slices.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// [`rand_t`] on `device`.
pub fn rand_on(device: Device, seed: u64, shape: &[usize]) -> Tensor {
    rand_t(seed, shape).to_device(device).unwrap()
}

/// Instantiates the op test suite once per backend of this build: each named
/// `fn(Device)` becomes a `#[test]` in module `cpu` on `Device::Cpu` and, with feature
/// `cuda`, in module `cuda` on `Device::Cuda(0)` (`#[ignore]`d: it needs an NVIDIA GPU, so
/// run the test binary with `--ignored` there). Every suite builds its inputs on the device
/// it is given and expects the same results and errors on both backends; a case that only
/// one backend can check (see the CPU-only tests next to the suites) says why.
#[allow(unused_macros)] // not every test file runs the per-backend suite
macro_rules! backend_tests {
    ($($name:ident),+ $(,)?) => {
        mod cpu {
            $(
                #[test]
                fn $name() {
                    super::$name(megamoe_tensor::Device::Cpu)
                }
            )+
        }
        #[cfg(feature = "cuda")]
        mod cuda {
            $(
                #[test]
                #[ignore = "needs an NVIDIA GPU: run the test binary with --ignored there"]
                fn $name() {
                    super::$name(megamoe_tensor::Device::Cuda(0))
                }
            )+
        }
    };
}
