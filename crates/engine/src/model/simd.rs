//! Vectorized `exp` for the softmax and SiLU kernels.
//!
//! The build targets baseline x86-64 (SSE2), so the compiler never vectorizes a loop of
//! `f32::exp` calls: at 600 tokens the salience pass spent 6 % of its time in glibc's scalar
//! `expf` (160 million calls). Where the CPU has AVX2 and FMA (checked at run time, so the
//! binary still runs everywhere) eight values go through one polynomial instead, sixteen
//! where it has AVX-512 (`Kernel::best`, so `PROMPT_SALIENCE_KERNEL` caps this too).
//!
//! The polynomial is Cephes' `expf` (as in avx_mathfun): the input is split as n ln 2 + r with
//! |r| <= ln 2 / 2, e^r comes from a degree-5 minimax polynomial, and 2^n is built in the
//! exponent bits. Relative error under 3e-7 where the result is a normal float. Inputs are
//! clamped to [-87.3, 88.0] (so below, the result is the smallest normal float, 1.2e-38, where
//! a softmax needs 0 in effect); NaN stays NaN.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::mem::MaybeUninit;

use super::decode_dot::Kernel;

/// x[i] = exp(x[i] * scale - shift); returns the sum of the results.
pub fn exp_affine_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_affine_sum_with(Kernel::best(), x, scale, shift)
}

/// out[i] = 1 / (1 + exp(-z(x[i]))), with z(x) = x (SiLU's gate), or with `gelu`
/// z(x) = 2 c (x + k x³) (GELU-tanh's, since (1 + tanh(y)) / 2 = sigmoid(2 y)). Every value of
/// `out` is written. One pass: reading the gate and writing its sigmoid elsewhere, instead of
/// copying it first and taking the sigmoid in place (the copy was 0.8 % of a salience pass).
pub fn sigmoid_of(x: &[f32], out: &mut [MaybeUninit<f32>], gelu: bool) {
    sigmoid_of_with(Kernel::best(), x, out, gelu)
}

/// sqrt(2 / pi) and the cubic's coefficient of GELU-tanh.
pub const GELU_C: f32 = 0.797_884_6;
pub const GELU_K: f32 = 0.044715;

/// z(x) of `sigmoid_of`, in this order of operations (the vector kernels repeat it, so every
/// kernel gives the same bits).
#[inline]
fn gate_arg(x: f32, gelu: bool) -> f32 {
    if gelu {
        2.0 * GELU_C * (x + GELU_K * x * x * x)
    } else {
        x
    }
}

/// The largest value (NaN ignored; -inf for none). Sixteen running maxima instead of one
/// fold: `f32::max` in a fold waits on the previous compare for every value (four cycles a
/// value); these compile to packed maxima. It was half the time of a softmax row.
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let rest = chunks.remainder().iter();
    lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// Σ x² and Σ x dy w over a row, each in sixteen running sums: a single f32 total waits on
/// every add (four cycles a value), and these two sums were most of an RMS norm's backward
/// pass. Plain adds (no fused multiply-add), so every CPU gets the same bits.
pub fn squares_and_products(x: &[f32], dy: &[f32], w: &[f32]) -> (f32, f32) {
    let (mut sq, mut pr) = ([0f32; 16], [0f32; 16]);
    let (xs, dys, ws) = (x.chunks_exact(16), dy.chunks_exact(16), w.chunks_exact(16));
    let tail = (xs.remainder(), dys.remainder(), ws.remainder());
    for ((x, dy), w) in xs.zip(dys).zip(ws) {
        for l in 0..16 {
            sq[l] += x[l] * x[l];
            pr[l] += x[l] * dy[l] * w[l];
        }
    }
    let (mut s, mut p) = (sq.iter().sum::<f32>(), pr.iter().sum::<f32>());
    for ((x, dy), w) in tail.0.iter().zip(tail.1).zip(tail.2) {
        s += x * x;
        p += x * dy * w;
    }
    (s, p)
}

/// Σ x² over a row in sixteen running sums, as `squares_and_products` (a single f32 total
/// waited four cycles on each add: most of an RMS norm's forward pass).
pub fn sum_of_squares(x: &[f32]) -> f32 {
    let mut sq = [0f32; 16];
    let xs = x.chunks_exact(16);
    let tail = xs.remainder();
    for x in xs {
        for l in 0..16 {
            sq[l] += x[l] * x[l];
        }
    }
    let mut s = sq.iter().sum::<f32>();
    for x in tail {
        s += x * x;
    }
    s
}

/// The sum of f32 values in f64, in eight running sums (one f64 total waited on each add).
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (s, &v) in lanes.iter_mut().zip(c) {
            *s += v as f64;
        }
    }
    let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    lanes.iter().sum::<f64>() + rest
}

/// out = Σ_j p[j] · rows[j], for `rows` holding p.len() rows of out.len() values: one query's
/// attention output from its probabilities and values while decoding, where the gemm crate's
/// general path for a one-row product was 10 % of a decoding step.
pub fn weighted_row_sum(p: &[f32], rows: &[f32], out: &mut [f32]) {
    weighted_row_sum_with(Kernel::best(), p, rows, out)
}

/// out[h * n + j] = queries[h] · rows[j] for the m query rows and n rows of `queries` and
/// `rows` (each of `width` values): one decoding step's attention scores. Eight rows at a
/// time share one horizontal sum, which one dot product per row paid alone (a tenth of the
/// work of a 64-value dot).
pub fn dots_with_rows(queries: &[f32], rows: &[f32], width: usize, out: &mut [f32]) {
    dots_with_rows_with(Kernel::best(), queries, rows, width, out)
}

fn dots_with_rows_with(
    kernel: Kernel,
    queries: &[f32],
    rows: &[f32],
    width: usize,
    out: &mut [f32],
) {
    let (m, n) = (queries.len() / width, rows.len() / width);
    assert!(
        m * width == queries.len() && n * width == rows.len() && out.len() == m * n,
        "dots with rows: sizes differ"
    );
    let mut j0 = 0;
    #[cfg(target_arch = "x86_64")]
    if kernel.has_avx2() && width.is_multiple_of(8) {
        j0 = n / 8 * 8;
        // SAFETY: the CPU has AVX2 and FMA (`Kernel::available`); the sizes were checked.
        unsafe { avx2::dots_with_rows(queries, &rows[..j0 * width], width, n, out) };
    }
    for (h, q) in queries.chunks_exact(width).enumerate() {
        for j in j0..n {
            out[h * n + j] =
                super::decode_dot::dot_with(kernel, q, &rows[j * width..(j + 1) * width]);
        }
    }
}

/// `weighted_row_sum` on the given kernel (the tests run each).
fn weighted_row_sum_with(kernel: Kernel, p: &[f32], rows: &[f32], out: &mut [f32]) {
    let width = out.len();
    assert_eq!(
        rows.len(),
        p.len() * width,
        "weighted sum: rows and weights differ"
    );
    #[cfg(target_arch = "x86_64")]
    if kernel.has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (`Kernel::available`); the sizes were checked.
        unsafe { avx2::weighted_row_sum(p, rows, out) };
        return;
    }
    let _ = kernel;
    out.fill(0.0);
    for (&pj, row) in p.iter().zip(rows.chunks_exact(width)) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += pj * v;
        }
    }
}

/// `exp_affine_sum` on the given kernel (the tests run each).
fn exp_affine_sum_with(kernel: Kernel, x: &mut [f32], scale: f32, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: the CPU has the features each kernel is compiled for (`Kernel::available`).
        Kernel::Avx512 => return unsafe { avx512::exp_affine_sum(x, scale, shift) },
        Kernel::Avx2 => return unsafe { avx2::exp_affine_sum(x, scale, shift) },
        Kernel::Portable => {}
    }
    let _ = kernel;
    scalar_exp_affine_sum(x, scale, shift)
}

/// `sigmoid_of` on the given kernel (the tests run each).
fn sigmoid_of_with(kernel: Kernel, x: &[f32], out: &mut [MaybeUninit<f32>], gelu: bool) {
    assert_eq!(x.len(), out.len(), "sigmoid_of: lengths differ");
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: as above.
        Kernel::Avx512 => return unsafe { avx512::sigmoid_of(x, out, gelu) },
        Kernel::Avx2 => return unsafe { avx2::sigmoid_of(x, out, gelu) },
        Kernel::Portable => {}
    }
    let _ = kernel;
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(1.0 / (1.0 + (-gate_arg(v, gelu)).exp()));
    }
}

fn scalar_exp_affine_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v * scale - shift).exp();
        sum += *v;
    }
    sum
}

/// Cephes' split of ln 2 (high part exact in few bits) and its degree-5 polynomial for e^r,
/// shared by the AVX2 and AVX-512 kernels.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// See `super::dots_with_rows`, for the first rows.len() / width rows (a multiple of 8),
    /// written with a row stride of `n` in `out`.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; width % 8 == 0; `out` holds m rows of n ≥ the rows given.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_with_rows(
        queries: &[f32],
        rows: &[f32],
        width: usize,
        n: usize,
        out: &mut [f32],
    ) {
        for (h, q) in queries.chunks_exact(width).enumerate() {
            for (block, eight) in rows.chunks_exact(8 * width).enumerate() {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..width).step_by(8) {
                    // SAFETY: c + 8 <= width, inside the query and each of the eight rows.
                    unsafe {
                        let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                        for (k, a) in acc.iter_mut().enumerate() {
                            let r = _mm256_loadu_ps(eight.as_ptr().add(k * width + c));
                            *a = _mm256_fmadd_ps(qc, r, *a);
                        }
                    }
                }
                // Eight horizontal sums at once: lane k of the result is the sum of acc[k].
                let t0 = _mm256_hadd_ps(acc[0], acc[1]);
                let t1 = _mm256_hadd_ps(acc[2], acc[3]);
                let t2 = _mm256_hadd_ps(acc[4], acc[5]);
                let t3 = _mm256_hadd_ps(acc[6], acc[7]);
                let (u0, u1) = (_mm256_hadd_ps(t0, t1), _mm256_hadd_ps(t2, t3));
                let sums = _mm256_add_ps(
                    _mm256_permute2f128_ps(u0, u1, 0x20),
                    _mm256_permute2f128_ps(u0, u1, 0x31),
                );
                // SAFETY: row h's entries 8·block..8·block + 8 lie inside `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(h * n + 8 * block), sums) };
            }
        }
    }

    /// See `super::weighted_row_sum`. Columns in strips of 64 (eight registers of sums: with
    /// fewer, each multiply-add waits on the one before it in its register), then of 8, then
    /// one by one; each strip reads the rows once.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; rows.len() == p.len() * out.len().
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn weighted_row_sum(p: &[f32], rows: &[f32], out: &mut [f32]) {
        let width = out.len();
        let mut c = 0;
        while c + 64 <= width {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, &pj) in p.iter().enumerate() {
                let w = _mm256_set1_ps(pj);
                // SAFETY: row j's columns c..c + 64 lie inside `rows` (the caller's sizes).
                let r = unsafe { rows.as_ptr().add(j * width + c) };
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(r.add(8 * k)) }, *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: columns c..c + 64 lie inside `out`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * k), *a) };
            }
            c += 64;
        }
        while c + 8 <= width {
            let mut acc = _mm256_setzero_ps();
            for (j, &pj) in p.iter().enumerate() {
                // SAFETY: as above, for eight columns.
                let v = unsafe { _mm256_loadu_ps(rows.as_ptr().add(j * width + c)) };
                acc = _mm256_fmadd_ps(_mm256_set1_ps(pj), v, acc);
            }
            // SAFETY: columns c..c + 8 lie inside `out`.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c), acc) };
            c += 8;
        }
        for (col, o) in out.iter_mut().enumerate().skip(c) {
            *o = p
                .iter()
                .enumerate()
                .map(|(j, &pj)| pj * rows[j * width + col])
                .sum();
        }
    }

    /// e^x for eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8(x: __m256) -> __m256 {
        // The constant comes first: on NaN these return their second operand, the input.
        let x = _mm256_min_ps(_mm256_set1_ps(88.0), x);
        let x = _mm256_max_ps(_mm256_set1_ps(-87.336_55), x);
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(P[0]);
        for &p in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(p));
        }
        let r2 = _mm256_mul_ps(r, r);
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), _mm256_set1_ps(1.0));
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }

    /// Horizontal sum of eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_affine_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (scale8, shift8) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
        let mut acc = _mm256_setzero_ps();
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly eight f32.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            let e = exp8(_mm256_fmsub_ps(v, scale8, shift8));
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), e) };
            acc = _mm256_add_ps(acc, e);
        }
        sum8(acc) + tail(chunks.into_remainder(), |v| v * scale - shift)
    }

    /// `gate_arg` on eight lanes, in the same order of operations.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gate_arg8(v: __m256, gelu: bool) -> __m256 {
        if !gelu {
            return v;
        }
        let k = _mm256_set1_ps(GELU_K);
        let cubic = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(k, v), v), v);
        _mm256_mul_ps(_mm256_set1_ps(2.0 * GELU_C), _mm256_add_ps(v, cubic))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn sigmoid_of(x: &[f32], out: &mut [MaybeUninit<f32>], gelu: bool) {
        let one = _mm256_set1_ps(1.0);
        let (xs, mut outs) = (x.chunks_exact(8), out.chunks_exact_mut(8));
        let rest = xs.remainder();
        for (c, o) in xs.zip(&mut outs) {
            // SAFETY: `c` and `o` hold exactly eight f32 each.
            let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate_arg8(v, gelu)));
            let s = _mm256_div_ps(one, _mm256_add_ps(one, e));
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().cast(), s) };
        }
        let mut lanes = [0f32; 8];
        lanes[..rest.len()].copy_from_slice(rest);
        tail(&mut lanes[..rest.len()], |v| -gate_arg(v, gelu));
        for (o, &e) in outs.into_remainder().iter_mut().zip(&lanes) {
            o.write(1.0 / (1.0 + e));
        }
    }

    /// The last (< 8) values through the same polynomial, so that a row's result does not
    /// depend on where the chunks end; returns their sum after `x = exp(f(x))`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tail(x: &mut [f32], f: impl Fn(f32) -> f32) -> f32 {
        if x.is_empty() {
            return 0.0;
        }
        let mut lanes = [0f32; 8];
        for (l, &v) in lanes.iter_mut().zip(x.iter()) {
            *l = f(v);
        }
        // SAFETY: `lanes` holds eight f32.
        let e = exp8(unsafe { _mm256_loadu_ps(lanes.as_ptr()) });
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), e) };
        let mut sum = 0f32;
        for (v, &l) in x.iter_mut().zip(&lanes) {
            *v = l;
            sum += l;
        }
        sum
    }
}

/// The AVX2 kernels' polynomial sixteen lanes at a time; tails go through masked loads and
/// stores.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        // min/max return their second operand for NaN: NaN stays NaN.
        let x = _mm512_min_ps(_mm512_set1_ps(88.0), x);
        let x = _mm512_max_ps(_mm512_set1_ps(-87.336_55), x);
        let n =
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(_mm512_fmadd_ps(
                x,
                _mm512_set1_ps(std::f32::consts::LOG2_E),
                _mm512_set1_ps(0.5),
            ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut y = _mm512_set1_ps(P[0]);
        for &p in &P[1..] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(p));
        }
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_add_ps(_mm512_fmadd_ps(y, r2, r), _mm512_set1_ps(1.0));
        let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        _mm512_mul_ps(y, _mm512_castsi512_ps(bits))
    }

    /// Lanes `..len` of a chunk of at most 16.
    fn mask(len: usize) -> __mmask16 {
        ((1u32 << len.min(16)) - 1) as __mmask16
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_affine_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
        let (scale16, shift16) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
        let mut acc = _mm512_setzero_ps();
        for c in x.chunks_mut(16) {
            let m = mask(c.len());
            // SAFETY: the masked lanes lie inside the chunk.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, c.as_ptr());
                let e = exp16(_mm512_fmsub_ps(v, scale16, shift16));
                _mm512_mask_storeu_ps(c.as_mut_ptr(), m, e);
                acc = _mm512_mask_add_ps(acc, m, acc, e);
            }
        }
        _mm512_reduce_add_ps(acc)
    }

    /// `gate_arg` on sixteen lanes, in the same order of operations.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gate_arg16(v: __m512, gelu: bool) -> __m512 {
        if !gelu {
            return v;
        }
        let k = _mm512_set1_ps(GELU_K);
        let cubic = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(k, v), v), v);
        _mm512_mul_ps(_mm512_set1_ps(2.0 * GELU_C), _mm512_add_ps(v, cubic))
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sigmoid_of(x: &[f32], out: &mut [MaybeUninit<f32>], gelu: bool) {
        let one = _mm512_set1_ps(1.0);
        for (c, o) in x.chunks(16).zip(out.chunks_mut(16)) {
            let m = mask(c.len());
            // SAFETY: the masked lanes lie inside both chunks (of equal lengths).
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, c.as_ptr());
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate_arg16(v, gelu)));
                let s = _mm512_div_ps(one, _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(o.as_mut_ptr().cast(), m, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sigmoid_of_on(kernel: Kernel, x: &[f32], gelu: bool) -> Vec<f32> {
        let mut out = vec![MaybeUninit::uninit(); x.len()];
        sigmoid_of_with(kernel, x, &mut out, gelu);
        // SAFETY: every value was written.
        out.into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect()
    }

    fn rel_err(a: f32, b: f64) -> f64 {
        if b == 0.0 {
            a.abs() as f64
        } else {
            ((a as f64 - b) / b).abs()
        }
    }

    #[test]
    fn dots_with_rows_match_f64_dots() {
        // Head sizes of 8 and 64 (the eight-row kernel), 20 (dots only), row counts that
        // leave rows over after the blocks of eight; every kernel here.
        for width in [8, 20, 64] {
            for (m, n) in [(1, 1), (3, 8), (3, 21), (2, 70)] {
                let q: Vec<f32> = (0..m * width)
                    .map(|i| ((i * 13) % 29) as f32 / 14.0 - 1.0)
                    .collect();
                let rows: Vec<f32> = (0..n * width)
                    .map(|i| ((i * 41) % 97) as f32 / 48.0 - 1.0)
                    .collect();
                for kernel in Kernel::available() {
                    let mut out = vec![f32::NAN; m * n];
                    dots_with_rows_with(kernel, &q, &rows, width, &mut out);
                    for h in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..width)
                                .map(|c| q[h * width + c] as f64 * rows[j * width + c] as f64)
                                .sum();
                            let got = out[h * n + j] as f64;
                            assert!(
                                (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                                "{kernel:?}, width {width}, query {h}, row {j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn weighted_row_sums_match_f64_sums() {
        // Widths of attention heads (64, 128), and ones that leave strips of 8 and single
        // columns over; every kernel here.
        for width in [1, 4, 8, 20, 40, 64, 100, 128] {
            for count in [1, 3, 37] {
                let p: Vec<f32> = (0..count).map(|j| ((j * 29) % 31) as f32 / 31.0).collect();
                let rows: Vec<f32> = (0..count * width)
                    .map(|i| ((i * 41) % 97) as f32 / 48.0 - 1.0)
                    .collect();
                for kernel in Kernel::available() {
                    let mut out = vec![f32::NAN; width];
                    weighted_row_sum_with(kernel, &p, &rows, &mut out);
                    for (c, &o) in out.iter().enumerate() {
                        let want: f64 = (0..count)
                            .map(|j| p[j] as f64 * rows[j * width + c] as f64)
                            .sum();
                        assert!(
                            (o as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{kernel:?}, width {width}, {count} rows, column {c}: {o} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn row_sums_match_f64_sums() {
        for len in [0, 1, 15, 16, 17, 576, 1000] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let dy: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 89) as f32 / 40.0 - 1.1)
                .collect();
            let w: Vec<f32> = (0..len).map(|i| ((i * 17) % 23) as f32 / 10.0).collect();
            let (sq, pr) = squares_and_products(&x, &dy, &w);
            let want_sq: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
            let want_pr: f64 = (0..len)
                .map(|i| x[i] as f64 * dy[i] as f64 * w[i] as f64)
                .sum();
            let scale = 1.0 + want_sq.abs() + want_pr.abs();
            assert!((sq as f64 - want_sq).abs() < 1e-5 * scale, "length {len}");
            assert!((pr as f64 - want_pr).abs() < 1e-5 * scale, "length {len}");
        }
    }

    #[test]
    fn max_matches_a_fold_at_every_length() {
        for len in [0, 1, 15, 16, 17, 33, 550] {
            let mut x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 - 500.0)
                .collect();
            let want = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&x), want, "length {len}");
            if len > 1 {
                // The largest in the last lane of a chunk, then in the tail, and NaN ignored.
                x[len - 1] = 1e6;
                x[0] = f32::NAN;
                assert_eq!(max(&x), 1e6, "length {len}");
            }
        }
    }

    #[test]
    fn exp_matches_f64_to_float_precision() {
        // 200 001 evenly spaced inputs across the range, plus special values.
        let mut xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 175.0 * i as f32 / 200_000.0)
            .collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 88.0, -87.3, 0.5, -0.5]);
        for kernel in Kernel::available() {
            let mut y = xs.clone();
            exp_affine_sum_with(kernel, &mut y, 1.0, 0.0);
            for (&x, &v) in xs.iter().zip(&y) {
                let want = (x as f64).exp();
                assert!(
                    rel_err(v, want) < 3e-7,
                    "{kernel:?}: exp({x}) = {v}, want {want}"
                );
            }
            // Far below the range: (almost) 0, never NaN or a negative number.
            let mut low = vec![-100.0f32, -1e30, f32::NEG_INFINITY, -88.0];
            exp_affine_sum_with(kernel, &mut low, 1.0, 0.0);
            assert!(low.iter().all(|&v| (0.0..1e-37).contains(&v)), "{low:?}");
            let mut nan = vec![f32::NAN; 9];
            exp_affine_sum_with(kernel, &mut nan, 1.0, 0.0);
            assert!(nan.iter().all(|v| v.is_nan()), "{kernel:?}");
        }
    }

    #[test]
    fn scale_shift_and_tails_agree_with_the_scalar_path() {
        for (kernel, len) in Kernel::available()
            .into_iter()
            .flat_map(|k| [0, 1, 7, 8, 9, 15, 16, 17, 31, 64, 100].map(|len| (k, len)))
        {
            let x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
            let (mut fast, mut slow) = (x.clone(), x.clone());
            let s1 = exp_affine_sum_with(kernel, &mut fast, 0.125, 1.5);
            let s2 = scalar_exp_affine_sum(&mut slow, 0.125, 1.5);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    rel_err(*a, *b as f64) < 5e-7,
                    "{kernel:?} len {len}: {a} vs {b}"
                );
            }
            assert!(
                (s1 - s2).abs() <= 1e-5 * s2.abs().max(1.0),
                "{kernel:?} len {len}"
            );
            for gelu in [false, true] {
                let sig = sigmoid_of_on(kernel, &x, gelu);
                // Against f64 from the f32 z: the rounding of z itself, which exp amplifies
                // at large |z|, is the scalar code's too.
                for (s, &v) in sig.iter().zip(&x) {
                    let z = gate_arg(v, gelu) as f64;
                    let want = 1.0 / (1.0 + (-z).exp());
                    assert!(
                        rel_err(*s, want) < 5e-7,
                        "{kernel:?} gelu {gelu}: sigmoid(z({v})) = {s}, want {want}"
                    );
                }
                // GELU's z in the vector lanes is the scalar z to the bit: the same as taking
                // the sigmoid of precomputed z values.
                let z: Vec<f32> = x.iter().map(|&v| gate_arg(v, gelu)).collect();
                assert_eq!(
                    sig,
                    sigmoid_of_on(kernel, &z, false),
                    "{kernel:?} len {len}"
                );
                // A value's result does not depend on where the chunks end.
                for (i, &v) in x.iter().enumerate() {
                    assert_eq!(sigmoid_of_on(kernel, &[v], gelu)[0], sig[i], "{kernel:?}");
                }
            }
        }
    }
}
