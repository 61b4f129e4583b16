//! The output head's two products against a chunk of the vocabulary table, read in place.
//!
//! The head (`head.rs`) dequantizes 256 vocabulary rows at a time into a row-major f32 chunk
//! and needs both x · chunkᵀ (logits) and p · chunk (the gradient's sum). With the `gemm`
//! crate each product packed the chunk again, so every table value was written three times
//! before a multiply: on Gemma 3 (262,144 × 640) the head took 106–128 ms of a 370 ms
//! 100-token salience pass. With only n ≈ 20 scored rows against 256 table rows, both products
//! run well on the chunk as it lies:
//!
//! - `dots`: a register tile of 4 table rows × up to 6 scored rows (AVX2: 3) runs along the
//!   hidden axis, then folds the 4 rows' accumulators into 4 sums at once.
//! - `add_weighted_rows`: a tile of up to 6 scored rows × 4 registers of columns (AVX2: 2)
//!   runs over the table rows, broadcasting each weight.
//!
//! Each table row is read from L2 once per tile of scored rows, so the tiles are as tall as the
//! registers allow: AVX2's first 2-row tiles left the head 40 % slower (Gemma 3 with
//! `PROMPT_SALIENCE_KERNEL=avx2`: 140–149 ms, now 101–108).
//!
//! Each kernel sums in a fixed order: the same bits on every run.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::decode_dot::Kernel;

/// The register kernel for this CPU, if any: AVX-512F, else AVX2 with FMA.
#[cfg(target_arch = "x86_64")]
fn pick<F>(kernel: Kernel, avx512: F, avx2: F) -> Option<F> {
    match kernel {
        Kernel::Avx512 => Some(avx512),
        k if k.has_avx2() => Some(avx2),
        _ => None,
    }
}

/// A register kernel: the output, a row stride (`dots`: the output's, `add_weighted_rows`:
/// p's), the scored rows, the table, then n, rows and h.
#[cfg(target_arch = "x86_64")]
type Tiles = unsafe fn(*mut f32, usize, *const f32, *const f32, usize, usize, usize);

/// z[r · z_stride + v] = Σ_k x[r · h + k] · table[v · h + k] for the `n` rows of x (n × h) and
/// the `rows` rows of `table` (rows × h).
pub fn dots(
    z: &mut [f32],
    z_stride: usize,
    x: &[f32],
    table: &[f32],
    (n, rows, h): (usize, usize, usize),
    kernel: Kernel,
) {
    assert!(x.len() >= n * h && table.len() >= rows * h && rows <= z_stride);
    assert!(n == 0 || z.len() >= (n - 1) * z_stride + rows);
    #[cfg(target_arch = "x86_64")]
    if let Some(tiles) = pick::<Tiles>(kernel, avx512::dots, avx2::dots) {
        // SAFETY: `pick` chose a kernel the CPU has; the asserts keep every access inside
        // the slices.
        let (z, x, t) = (z.as_mut_ptr(), x.as_ptr(), table.as_ptr());
        unsafe { tiles(z, z_stride, x, t, n, rows, h) };
        return;
    }
    let _ = kernel;
    for r in 0..n {
        let xr = &x[r * h..(r + 1) * h];
        for v in 0..rows {
            let tv = &table[v * h..(v + 1) * h];
            z[r * z_stride + v] = xr.iter().zip(tv).map(|(a, b)| a * b).sum();
        }
    }
}

/// acc[r · h + k] += Σ_v p[r · p_stride + v] · table[v · h + k] for the `n` rows of acc
/// (n × h) and the `rows` rows of `table` (rows × h).
pub fn add_weighted_rows(
    acc: &mut [f32],
    p: &[f32],
    p_stride: usize,
    table: &[f32],
    (n, rows, h): (usize, usize, usize),
    kernel: Kernel,
) {
    assert!(acc.len() >= n * h && table.len() >= rows * h && rows <= p_stride);
    assert!(n == 0 || p.len() >= (n - 1) * p_stride + rows);
    #[cfg(target_arch = "x86_64")]
    if let Some(tiles) = pick::<Tiles>(kernel, avx512::add_weighted_rows, avx2::add_weighted_rows) {
        // SAFETY: `pick` chose a kernel the CPU has; the asserts keep every access inside
        // the slices.
        let (acc, p, t) = (acc.as_mut_ptr(), p.as_ptr(), table.as_ptr());
        unsafe { tiles(acc, p_stride, p, t, n, rows, h) };
        return;
    }
    let _ = kernel;
    for r in 0..n {
        let row = &mut acc[r * h..(r + 1) * h];
        for v in 0..rows {
            let weight = p[r * p_stride + v];
            for (a, t) in row.iter_mut().zip(&table[v * h..(v + 1) * h]) {
                *a += weight * t;
            }
        }
    }
}

/// Calls `f::<R>(args)` with R the given count of scored rows (1 to 5, else `$most`): the
/// tile functions take their row count as a constant, so that their accumulators stay in
/// registers.
#[cfg(target_arch = "x86_64")]
macro_rules! with_rows {
    ($count:expr, $most:ident, $f:ident($($arg:expr),*)) => {
        match $count {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            _ => $f::<$most>($($arg),*),
        }
    };
}

/// Writes one tile's loops for both register widths: `$lanes` lanes per register, loads and
/// fused multiply-adds named by the width.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    (
        $feature:literal, $reg:ty, $lanes:expr, $zero:ident, $load:ident, $store:ident,
        $fmadd:ident, $add:ident, $set1:ident, $fold4:ident, $fold1:ident,
        table_rows: $tv:expr, scored_rows: $tr:expr, weighted_rows: $tw:expr, columns: $tc:expr
    ) => {
        /// Table rows per `dots` tile.
        const TV: usize = $tv;
        /// Scored rows per `dots` tile.
        const TR: usize = $tr;
        /// Scored rows per `add_weighted_rows` tile.
        const TW: usize = $tw;
        /// Registers of columns per `add_weighted_rows` tile.
        const TC: usize = $tc;
        const L: usize = $lanes;

        /// The hidden axis's last values beyond whole registers, as a register with zeros
        /// past the end (`h - k < L`).
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn partial(src: *const f32, count: usize) -> $reg {
            let mut buf = [0.0f32; L];
            std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), count);
            $load(buf.as_ptr())
        }

        /// Loads a register of values from `p` at hidden position `k`: whole below `whole`,
        /// else the last `count`.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn load_at(p: *const f32, k: usize, whole: usize, count: usize) -> $reg {
            if k < whole {
                $load(p)
            } else {
                partial(p, count)
            }
        }

        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn dots_tile<const V: usize, const R: usize>(
            z: *mut f32,
            zs: usize,
            x: *const f32,
            t: *const f32,
            h: usize,
        ) {
            let mut acc = [[$zero(); R]; V];
            let whole = h / L * L;
            let mut k = 0;
            while k < h {
                let count = (h - k).min(L);
                // The scored rows' registers first, then one table row at a time: R + 1 + V·R
                // registers (31 of AVX-512's 32 at 6 × 4, all 16 of AVX2's at 3 × 4).
                let mut xv = [$zero(); R];
                for (j, xv) in xv.iter_mut().enumerate() {
                    *xv = load_at(x.add(j * h + k), k, whole, count);
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let tv = load_at(t.add(i * h + k), k, whole, count);
                    for (acc, &xv) in acc.iter_mut().zip(&xv) {
                        *acc = $fmadd(tv, xv, *acc);
                    }
                }
                k += L;
            }
            for j in 0..R {
                let out = z.add(j * zs);
                if V == 4 {
                    let sums = $fold4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
                    _mm_storeu_ps(out, sums);
                } else {
                    for i in 0..V {
                        *out.add(i) = $fold1(acc[i][j]);
                    }
                }
            }
        }

        /// Runs `dots_tile` for `R` scored rows over every table row.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn dots_rows<const R: usize>(
            z: *mut f32,
            zs: usize,
            x: *const f32,
            t: *const f32,
            rows: usize,
            h: usize,
        ) {
            let mut v = 0;
            while v + TV <= rows {
                dots_tile::<TV, R>(z.add(v), zs, x, t.add(v * h), h);
                v += TV;
            }
            while v < rows {
                dots_tile::<1, R>(z.add(v), zs, x, t.add(v * h), h);
                v += 1;
            }
        }

        #[target_feature(enable = $feature)]
        pub unsafe fn dots(
            z: *mut f32,
            zs: usize,
            x: *const f32,
            t: *const f32,
            n: usize,
            rows: usize,
            h: usize,
        ) {
            let mut r = 0;
            while r < n {
                let (z, x) = (z.add(r * zs), x.add(r * h));
                with_rows!((n - r).min(TR), TR, dots_rows(z, zs, x, t, rows, h));
                r += TR;
            }
        }

        /// acc rows += p rows · table for `C` registers of columns from `k` (`count` values in
        /// the last register when it is partial).
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn weighted_tile<const R: usize, const C: usize>(
            acc: *mut f32,
            p: *const f32,
            ps: usize,
            t: *const f32,
            rows: usize,
            h: usize,
            count: usize,
        ) {
            let mut sum = [[$zero(); C]; R];
            // Only the last register of a tile may be partial.
            let whole = if count == L { C * L } else { (C - 1) * L };
            for v in 0..rows {
                let row = t.add(v * h);
                let mut tv = [$zero(); C];
                for (c, tv) in tv.iter_mut().enumerate() {
                    *tv = load_at(row.add(c * L), c * L, whole, count);
                }
                for j in 0..R {
                    let w = $set1(*p.add(j * ps + v));
                    for c in 0..C {
                        sum[j][c] = $fmadd(w, tv[c], sum[j][c]);
                    }
                }
            }
            for j in 0..R {
                for c in 0..C {
                    let out = acc.add(j * h + c * L);
                    if c * L < whole {
                        $store(out, $add($load(out), sum[j][c]));
                    } else {
                        let mut buf = [0.0f32; L];
                        $store(buf.as_mut_ptr(), sum[j][c]);
                        for (i, s) in buf.iter().enumerate().take(count) {
                            *out.add(i) += s;
                        }
                    }
                }
            }
        }

        /// Runs `weighted_tile` for `R` scored rows over every column.
        #[target_feature(enable = $feature)]
        #[inline]
        unsafe fn weighted_rows<const R: usize>(
            acc: *mut f32,
            p: *const f32,
            ps: usize,
            t: *const f32,
            rows: usize,
            h: usize,
        ) {
            let mut k = 0;
            while k + TC * L <= h {
                weighted_tile::<R, TC>(acc.add(k), p, ps, t.add(k), rows, h, L);
                k += TC * L;
            }
            while k < h {
                let count = (h - k).min(L);
                weighted_tile::<R, 1>(acc.add(k), p, ps, t.add(k), rows, h, count);
                k += L;
            }
        }

        #[target_feature(enable = $feature)]
        pub unsafe fn add_weighted_rows(
            acc: *mut f32,
            ps: usize,
            p: *const f32,
            t: *const f32,
            n: usize,
            rows: usize,
            h: usize,
        ) {
            let mut r = 0;
            while r < n {
                let (acc, p) = (acc.add(r * h), p.add(r * ps));
                with_rows!((n - r).min(TW), TW, weighted_rows(acc, p, ps, t, rows, h));
                r += TW;
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    /// The four registers' sums, in order: pairs folded within 128-bit lanes, then the four
    /// lanes added.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn fold4(a: __m512, b: __m512, c: __m512, d: __m512) -> __m128 {
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
        // Each 128-bit lane: [a, b, c, d] partial sums.
        let abcd = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
            _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
        );
        let halves = _mm256_add_ps(
            _mm512_castps512_ps256(abcd),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd))),
        );
        _mm_add_ps(
            _mm256_castps256_ps128(halves),
            _mm256_extractf128_ps::<1>(halves),
        )
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn fold1(a: __m512) -> f32 {
        _mm512_reduce_add_ps(a)
    }

    tiles!(
        "avx512f", __m512, 16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_storeu_ps,
        _mm512_fmadd_ps, _mm512_add_ps, _mm512_set1_ps, fold4, fold1,
        table_rows: 4, scored_rows: 6, weighted_rows: 6, columns: 4
    );
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// The four registers' sums, in order.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fold4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        )
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fold1(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    tiles!(
        "avx2,fma", __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps,
        _mm256_fmadd_ps, _mm256_add_ps, _mm256_set1_ps, fold4, fold1,
        table_rows: 4, scored_rows: 3, weighted_rows: 6, columns: 2
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::matmul::tests::random;

    /// Shapes with every tail: every count of scored rows in a tile (1 to 6), table rows past
    /// groups of four, hidden sizes past whole registers and below one register.
    const SHAPES: [(usize, usize, usize); 8] = [
        (20, 256, 576),
        (7, 13, 640),
        (4, 7, 33),
        (5, 6, 17),
        (1, 5, 70),
        (13, 4, 7),
        (6, 9, 129),
        (3, 1, 1),
    ];

    #[test]
    fn dots_match_f64_dots_on_every_kernel() {
        for kernel in Kernel::available() {
            for (seed, &(n, rows, h)) in SHAPES.iter().enumerate() {
                let (x, t) = (
                    random(n * h, seed as u64),
                    random(rows * h, 100 + seed as u64),
                );
                let stride = rows + 3;
                let mut z = vec![f32::NAN; n * stride];
                dots(&mut z, stride, &x, &t, (n, rows, h), kernel);
                for r in 0..n {
                    for v in 0..rows {
                        let (xr, tv) = (&x[r * h..(r + 1) * h], &t[v * h..(v + 1) * h]);
                        let exact: f64 =
                            xr.iter().zip(tv).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let size: f64 =
                            xr.iter().zip(tv).map(|(&a, &b)| (a * b).abs() as f64).sum();
                        let got = z[r * stride + v] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-6 * size.max(1e-30),
                            "{kernel:?} {n}×{rows}×{h} at ({r}, {v}): {got} vs {exact}"
                        );
                    }
                    // Nothing written past the table's rows.
                    assert!(z[r * stride + rows..(r + 1) * stride]
                        .iter()
                        .all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn weighted_rows_add_to_what_is_there_on_every_kernel() {
        for kernel in Kernel::available() {
            for (seed, &(n, rows, h)) in SHAPES.iter().enumerate() {
                let stride = rows + 2;
                let (p, t) = (
                    random(n * stride, seed as u64),
                    random(rows * h, 50 + seed as u64),
                );
                let start = random(n * h + 5, 7);
                let mut acc = start.clone();
                add_weighted_rows(&mut acc, &p, stride, &t, (n, rows, h), kernel);
                for r in 0..n {
                    for k in 0..h {
                        let terms =
                            (0..rows).map(|v| p[r * stride + v] as f64 * t[v * h + k] as f64);
                        let size: f64 = terms.clone().map(f64::abs).sum::<f64>()
                            + start[r * h + k].abs() as f64;
                        let exact = start[r * h + k] as f64 + terms.sum::<f64>();
                        let got = acc[r * h + k] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-6 * size.max(1e-30),
                            "{kernel:?} {n}×{rows}×{h} at ({r}, {k}): {got} vs {exact}"
                        );
                    }
                }
                // Past the n rows, nothing changed.
                assert_eq!(acc[n * h..], start[n * h..], "{kernel:?}");
            }
        }
    }

    #[test]
    fn the_same_bits_every_run() {
        let (n, rows, h) = (20, 256, 640);
        let (x, t) = (random(n * h, 1), random(rows * h, 2));
        for kernel in Kernel::available() {
            let run = || {
                let mut z = vec![0.0; n * rows];
                dots(&mut z, rows, &x, &t, (n, rows, h), kernel);
                let mut acc = vec![0.0; n * h];
                add_weighted_rows(&mut acc, &z, rows, &t, (n, rows, h), kernel);
                (z, acc)
            };
            let first = run();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for _ in 0..3 {
                let again = run();
                assert_eq!(bits(&again.0), bits(&first.0));
                assert_eq!(bits(&again.1), bits(&first.1));
            }
        }
    }
}
