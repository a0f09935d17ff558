//! GEMM benchmarks: the dense f32 rate of the chosen GEMM crate (`gemm` 0.19 through
//! `Tensor::matmul`), optionally against `faer` 0.24 (`--features bench-faer`), and the
//! grouped GEMM the MoE expert bank uses. Throughput is reported as items/s where one item
//! is one floating-point operation: a GEMM of `[M, K] · [K, N]` counts `2·M·N·K` (one
//! multiply and one add per term), so "item/s" reads as FLOP/s.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench -p megamoe-tensor --bench gemm [--features bench-faer]`
//! (numbers in docs/perf.md). Every timed closure returns its output so nothing is elided;
//! the CPU backend is synchronous, so no device sync is needed.

use divan::counter::ItemsCount;
use divan::Bencher;
use megamoe_tensor::{Device, Tensor};

fn main() {
    divan::main();
}

/// Square sizes from small attention/router GEMMs to a large FFN GEMM.
const SIZES: &[usize] = &[256, 512, 1024, 2048];

/// FLOPs of one `[m, k] · [k, n]` product.
fn gemm_flops(m: usize, n: usize, k: usize) -> ItemsCount {
    ItemsCount::new(2 * m * n * k)
}

fn input(seed: u64, shape: &[usize]) -> Tensor {
    Tensor::randn_named(seed, "bench", shape, 1.0, Device::Cpu).expect("cpu tensor")
}

/// `a · b`, both row-major (NN).
#[divan::bench(args = SIZES, sample_count = 20)]
fn gemm_nn(bencher: Bencher, n: usize) {
    let (a, b) = (input(1, &[n, n]), input(2, &[n, n]));
    bencher
        .counter(gemm_flops(n, n, n))
        .bench(|| a.matmul(&b, false, false).expect("matmul"));
}

/// `x · Wᵀ`, the Linear-layer layout (NT).
#[divan::bench(args = SIZES, sample_count = 20)]
fn gemm_nt(bencher: Bencher, n: usize) {
    let (a, b) = (input(1, &[n, n]), input(2, &[n, n]));
    bencher
        .counter(gemm_flops(n, n, n))
        .bench(|| a.matmul(&b, false, true).expect("matmul"));
}

/// Grouped GEMM of an expert bank: `R = 4096` routed rows over `G` experts of equal size,
/// `y_g = x_g W_gᵀ` with `W [G, 1024, 512]`. Equal FLOPs to a dense `[4096,512]·[512,1024]`.
#[divan::bench(args = [8, 64], sample_count = 20)]
fn grouped_gemm_4096x512x1024(bencher: Bencher, groups: usize) {
    let (r, k, n) = (4096, 512, 1024);
    let x = input(3, &[r, k]);
    let w = input(4, &[groups, n, k]);
    let sizes = megamoe_tensor::RowGroups::from_sizes(&vec![r / groups; groups], x.device())
        .expect("groups");
    bencher
        .counter(gemm_flops(r, n, k))
        .bench(|| x.grouped_matmul(&sizes, &w, true).expect("grouped"));
}

/// The dense GEMM with the same FLOPs as `grouped_gemm_4096x512x1024`.
#[divan::bench(sample_count = 20)]
fn dense_gemm_4096x512x1024(bencher: Bencher) {
    let (x, w) = (input(3, &[4096, 512]), input(4, &[1024, 512]));
    bencher
        .counter(gemm_flops(4096, 1024, 512))
        .bench(|| x.matmul(&w, false, true).expect("matmul"));
}

/// `faer` 0.24 NN product on the same data, all rayon threads.
#[cfg(feature = "bench-faer")]
#[divan::bench(args = SIZES, sample_count = 20)]
fn faer_nn(bencher: Bencher, n: usize) {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, MatRef, Par};
    let a = input(1, &[n, n]).to_host_f32().expect("host");
    let b = input(2, &[n, n]).to_host_f32().expect("host");
    let mut c = vec![0.0f32; n * n];
    bencher.counter(gemm_flops(n, n, n)).bench_local(|| {
        matmul(
            MatMut::from_row_major_slice_mut(&mut c, n, n),
            Accum::Replace,
            MatRef::from_row_major_slice(&a, n, n),
            MatRef::from_row_major_slice(&b, n, n),
            1.0f32,
            Par::rayon(0),
        );
        c[0]
    });
}
