//! Shared helpers for the integration tests: a tiny deterministic generator (independent of
//! the crate's RNG) and comparison helpers.
#![allow(dead_code)]

use megamoe_tensor::{AdamWStep, Device, Error, Tensor};

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

/// The f32 bit patterns of `t`'s elements (for bitwise comparisons).
pub fn bits(t: &Tensor) -> Vec<u32> {
    host(t).iter().map(|v| v.to_bits()).collect()
}

/// Relative L2 error `‖got − want‖ / ‖want‖` (f64 sums; lengths must match).
pub fn rel(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (host(got), host(want));
    assert_eq!(g.len(), w.len(), "length");
    let (mut num, mut den) = (0f64, 0f64);
    for (&a, &b) in g.iter().zip(&w) {
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// Bitwise equality of f32 slices.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// [`rand_t`] on `device`.
pub fn rand_on(device: Device, seed: u64, shape: &[usize]) -> Tensor {
    rand_t(seed, shape).to_device(device).unwrap()
}

/// The named error a bad input raises: the call's own error (the CPU backend checks element
/// values on the host before writing), or — where a device backend checks them on the device
/// (the CUDA routing, capacity and strided-group kernels) — the error of the next host read,
/// `read(result)`: a kernel launch cannot fail synchronously, so the device records the bad
/// value and the next synchronising read reports it. Panics if neither reports it.
pub fn error_of<T>(
    r: megamoe_tensor::Result<T>,
    read: impl FnOnce(&T) -> megamoe_tensor::Result<()>,
) -> Error {
    match r {
        Err(e) => e,
        Ok(v) => match read(&v) {
            Err(e) => e,
            Ok(()) => panic!("a bad input passed: neither the call nor the next read failed"),
        },
    }
}

/// [`error_of`] for an op returning a tensor: the read is of that tensor.
pub fn tensor_error(r: megamoe_tensor::Result<Tensor>) -> Error {
    error_of(r, |t| t.to_host_f32().map(drop))
}

/// On `dev`, `e` is the error of a bad input: `on_cpu(e)` for the CPU backend (the host
/// check's own error), on a GPU the device check's report naming `device_op` (its check's
/// name, `Error::InvalidArgument` with `arg` "ids (checked on the device)").
pub fn expect_bad_input(dev: Device, e: &Error, on_cpu: impl Fn(&Error) -> bool, device_op: &str) {
    let ok = match dev {
        Device::Cpu => on_cpu(e),
        Device::Cuda(_) => {
            on_cpu(e)
                || matches!(e, Error::InvalidArgument { op, arg: "ids (checked on the device)", .. }
                    if *op == device_op)
        }
    };
    assert!(ok, "unexpected error on {dev}: {e}");
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

/// The GPU of the CUDA tests.
pub const GPU: Device = Device::Cuda(0);

/// Normal values (mean 0, deviation `std`) of the stream named "x", on the CPU.
pub fn randn(seed: u64, shape: &[usize], std: f32) -> Tensor {
    Tensor::randn_named(seed, "x", shape.to_vec(), std, Device::Cpu).unwrap()
}

/// A copy of `t` on [`GPU`].
pub fn gpu(t: &Tensor) -> Tensor {
    t.to_device(GPU).unwrap()
}

/// The optimizer tests' AdamW step `t`: lr 3e-3, betas 0.9 / 0.95, eps 1e-8, weight decay
/// 0.1 if `decay`, else none.
pub fn adamw_hyper(t: u64, decay: bool) -> AdamWStep {
    AdamWStep {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: if decay { 0.1 } else { 0.0 },
        t,
    }
}
