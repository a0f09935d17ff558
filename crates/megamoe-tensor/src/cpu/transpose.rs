//! Out-of-place matrix transpose for the GEMM operand layouts (a pure copy: no arithmetic,
//! so the result never depends on the path taken).
//!
//! `gemm` packs its "lhs" operand (after its internal transpose: the weight of `x · Wᵀ`)
//! into column panels. From a row-major `W [n, k]` that packing is a strided gather of one
//! element at a time; from `Wᵀ [k, n]` it is a run of contiguous copies. For the small
//! per-expert GEMMs of an MoE bank (a few hundred rows per weight) the gather costs about
//! half of the multiply itself, so the grouped GEMM first writes `Wᵀ` with this blocked
//! transpose (8×8 tiles in AVX registers where available), which is several times cheaper.

/// Tile edge of the blocked transpose.
const TILE: usize = 8;

/// `dst [cols, rows] = srcᵀ` for row-major `src [rows, cols]` (`dst.len() >= rows·cols`).
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    assert!(src.len() >= rows * cols && dst.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX is available (checked above); the bounds were asserted.
        unsafe { x86::transpose_avx(src, rows, cols, dst) };
        return;
    }
    transpose_scalar(src, rows, cols, dst);
}

/// The plain blocked transpose (where AVX is not available).
fn transpose_scalar(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for rb in (0..rows).step_by(TILE) {
        for cb in (0..cols).step_by(TILE) {
            for r in rb..(rb + TILE).min(rows) {
                for c in cb..(cb + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::TILE;

    /// Edge of the cache blocks the tiles are walked in.
    const BLOCK: usize = 64;

    /// 8×8 tiles in registers (unpack / shuffle / 128-bit permute), scalar edges.
    ///
    /// # Safety
    /// AVX must be available; `src` and `dst` hold at least `rows·cols` elements.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn transpose_avx(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
        let (rt, ct) = (rows / TILE * TILE, cols / TILE * TILE);
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        // Blocks of BLOCK×BLOCK (16 KiB in and out) so that every cache line read or
        // written is used whole while it is in L1; 8×8 tiles inside.
        for rb in (0..rt).step_by(BLOCK) {
            for cb in (0..ct).step_by(BLOCK) {
                for c in (cb..(cb + BLOCK).min(ct)).step_by(TILE) {
                    for r in (rb..(rb + BLOCK).min(rt)).step_by(TILE) {
                        // SAFETY: rows r..r+8 and columns c..c+8 are inside both matrices.
                        unsafe { tile(s.add(r * cols + c), cols, d.add(c * rows + r), rows) };
                    }
                }
            }
        }
        // Right edge (columns ct..) for all rows, bottom edge (rows rt..) for tiled columns.
        for r in 0..rows {
            for c in ct..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
        for r in rt..rows {
            for c in 0..ct {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }

    /// One 8×8 tile: `d[j·ds + i] = s[i·ss + j]`.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn tile(s: *const f32, ss: usize, d: *mut f32, ds: usize) {
        // SAFETY (whole body): the caller guarantees 8 rows of 8 readable / writable floats.
        unsafe {
            let r0 = _mm256_loadu_ps(s);
            let r1 = _mm256_loadu_ps(s.add(ss));
            let r2 = _mm256_loadu_ps(s.add(2 * ss));
            let r3 = _mm256_loadu_ps(s.add(3 * ss));
            let r4 = _mm256_loadu_ps(s.add(4 * ss));
            let r5 = _mm256_loadu_ps(s.add(5 * ss));
            let r6 = _mm256_loadu_ps(s.add(6 * ss));
            let r7 = _mm256_loadu_ps(s.add(7 * ss));
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let t4 = _mm256_unpacklo_ps(r4, r5);
            let t5 = _mm256_unpackhi_ps(r4, r5);
            let t6 = _mm256_unpacklo_ps(r6, r7);
            let t7 = _mm256_unpackhi_ps(r6, r7);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            _mm256_storeu_ps(d, _mm256_permute2f128_ps::<0x20>(u0, u4));
            _mm256_storeu_ps(d.add(ds), _mm256_permute2f128_ps::<0x20>(u1, u5));
            _mm256_storeu_ps(d.add(2 * ds), _mm256_permute2f128_ps::<0x20>(u2, u6));
            _mm256_storeu_ps(d.add(3 * ds), _mm256_permute2f128_ps::<0x20>(u3, u7));
            _mm256_storeu_ps(d.add(4 * ds), _mm256_permute2f128_ps::<0x31>(u0, u4));
            _mm256_storeu_ps(d.add(5 * ds), _mm256_permute2f128_ps::<0x31>(u1, u5));
            _mm256_storeu_ps(d.add(6 * ds), _mm256_permute2f128_ps::<0x31>(u2, u6));
            _mm256_storeu_ps(d.add(7 * ds), _mm256_permute2f128_ps::<0x31>(u3, u7));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_definition_for_tiled_and_ragged_shapes() {
        for &(rows, cols) in &[
            (1, 1),
            (3, 5),
            (8, 8),
            (9, 17),
            (16, 24),
            (33, 7),
            (64, 130),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(dst[c * rows + r].to_bits(), src[r * cols + c].to_bits());
                }
            }
            let mut plain = vec![f32::NAN; rows * cols];
            transpose_scalar(&src, rows, cols, &mut plain);
            assert_eq!(plain, dst, "{rows}x{cols}");
        }
    }
}
