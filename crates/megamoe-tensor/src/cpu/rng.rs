//! Counter-based random numbers: element `i` of a named tensor is a pure function of
//! `(seed, name, i)`, so any shard of a tensor can be materialised on its own and matches the
//! same slice of the whole tensor bit for bit (layout invariance, ARCHITECTURE.md §4).
//!
//! Construction: `key = mix(seed ⊕ mix(fnv1a64(name)))`; the `j`-th 64-bit word of element `i`
//! is `mix(key + (2i + j + 1)·γ)` with SplitMix64's finaliser `mix` and increment
//! `γ = 0x9E3779B97F4A7C15` — i.e. position `2i + j + 1` of the SplitMix64 stream seeded
//! with `key` (Steele, Lea & Flood 2014), which is computable at any position. Normals use
//! Box–Muller on the element's two words, in f64, rounded once to f32.

use rayon::prelude::*;

use super::ELEMS_PER_TASK;

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64 finaliser (Stafford variant 13).
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a 64-bit hash of the tensor name.
fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// The stream key of tensor `name` under `seed`.
pub(crate) fn key(seed: u64, name: &str) -> u64 {
    mix(seed ^ mix(fnv1a64(name)))
}

#[inline]
fn word(key: u64, i: u64, j: u64) -> u64 {
    mix(key.wrapping_add((2 * i + j + 1).wrapping_mul(GAMMA)))
}

/// Uniform in [0, 1) with 53 random bits.
#[inline]
fn unit(w: u64) -> f64 {
    (w >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal of element `i` (Box–Muller; u1 in (0, 1] so ln is finite).
#[inline]
pub(crate) fn normal(key: u64, i: u64) -> f64 {
    let u1 = 1.0 - unit(word(key, i, 0));
    let u2 = unit(word(key, i, 1));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Uniform in [0, 1) of element `i`.
#[inline]
pub(crate) fn uniform(key: u64, i: u64) -> f64 {
    unit(word(key, i, 0))
}

/// Values for the output elements, where `global(o)` maps output position `o` to the
/// element's index in the global tensor.
pub(crate) fn fill(
    n: usize,
    global: impl Fn(usize) -> u64 + Sync,
    value: impl Fn(u64) -> f32 + Sync,
) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .with_min_len(ELEMS_PER_TASK)
        .map(|o| value(global(o)))
        .collect()
}
