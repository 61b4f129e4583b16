//! Decoding dots with integer multiply-adds, against activations rounded to 15 bits: the K
//! types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) on every CPU with AVX2, and the blocks of 32 (Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0) where `takes_256_bit_paths`. Only generation takes them
//! (`Model::forward_cached`, `Model::decoding_logits`), its prefill on the blocks of 32 through
//! the integer tile of `prefill`; salience and perturbation keep f32 activations.
//!
//! Why: with f32 activations every weight is widened to a 32-bit lane, converted and
//! multiplied, and for the 2-, 3- and 6-bit types that costs more than reading it. On Llama
//! 1B shapes (Xeon, 2 threads) the f32 kernels decoded Q2_K at 0.50× llama.cpp's speed, Q3_K
//! at 0.55×, Q6_K at 0.76×, with 73 % of the time in the dots. Byte multiply-adds take 32
//! weights per AVX2 instruction, 64 per AVX-512BW one. One thread, a 256 × 2048 matrix in
//! cache, ns per super-block of 256 (f32 AVX-512 kernel → these with AVX-512BW; AVX2 →
//! AVX2): Q2_K 43 → 26 (69 → 33), Q3_K 48 → 37 (110 → 48), Q4_K 35 → 33 (46 → 39), Q5_K
//! 46 → 34 (84 → 46), Q6_K 58 → 30 (70 → 40).
//!
//! The blocks of 32 the same way on AVX2 (AMD Zen 3). Gemma 3's Q8_0 embedding table, read as
//! the output head, is 72 % of the bytes of its decoding step, and its Q5_0 matrices (18 %)
//! took nearly as long as the head in the f32 kernels (`perf`: 30 % of decoding against
//! 36 %): their fifth bits cost five vector operations per eight weights. The f32 kernel
//! widens, converts and multiplies 32 Q8_0 weights in twelve vector operations and read
//! 9.1–10.6 GB/s on one thread, 17–20 on two; these dots read 11.7–16.2 and 19–28, where a
//! plain sum of the same 178 MB read 14–19 and 24–34 (`docs/bench/q8_0_stream.rs`, runs an
//! hour apart). Gemma 3 decoded 73.8–76.3 tokens/s against 54.1–55.0 (three alternating
//! rounds); SmolLM2 (Q4_1, its decoding steps bound by their ~200 parallel loops, not by
//! reading) stayed within noise. Where 512-bit multiply-adds run at twice the 256-bit rate
//! (Intel Xeons) the 512-bit f32 kernels are kept (not measured against these); on an AMD
//! Zen 4, whose AVX-512 runs in 256-bit halves, these dots decoded a Llama 1B shape's Q4_0 at
//! 1.5× their speed (`takes_256_bit_paths`).
//!
//! Precision: llama.cpp rounds activations to 8 bits. Here each group of values of an
//! activation row (a super-block of 256 for the K types, a block of 32 for the others) gets a
//! scale s = max |x| / 16256 and integers v = round(x / s), stored as two signed bytes
//! v = 128·hi + lo (|hi| ≤ 127, |lo| ≤ 64), so that byte multiply-adds take them. Each value
//! is off by at most s / 2, 2⁻¹⁵ of the largest in its group: 128 times closer than 8 bits.
//! The formats' offsets (the mins of Q2_K, Q4_K, Q5_K, Q4_1 and Q5_1, the −32 of Q6_K, the −4
//! of Q3_K, the −8 and −16 of Q4_0 and Q5_0) are taken in f32 against the f32 sums of x over
//! each run of 16 values (each block of 32 for the Q4 and Q5 formats, and for Q4_K and Q5_K
//! in the AVX2 loop, whose two runs of a sub-block share their offset), so only the d·sc·u
//! part of a weight meets the rounding. Gemma 3 270M's Q4_K_M file and SmolLM2's Q4_1 file
//! give the same greedy continuations either way (`server/tests/decoding.rs`). With
//! `PROMPT_SALIENCE_EXACT_DECODING=1` every type takes the f32 kernels.
//!
//! Decoding's Q4_0 and Q4_1 dots take the same v as 16-bit words instead, four weight rows
//! at a time (`avx2::block_row_group_dots`): a block's 32 weights widened to words take two
//! word multiply-adds, where the two bytes take two byte and two word ones.

use candle_core::quantized::GgmlDType;

#[cfg(target_arch = "x86_64")]
pub(in crate::model) mod prefill;

/// Values per super-block (one activation scale for the K types), and per run (one weight
/// scale).
pub(super) const SUPER: usize = 256;
const RUN: usize = 16;

/// Values per block of the Q4, Q5 and Q8 formats (one activation scale for them).
const BLOCK: usize = super::BLOCK;

/// The largest |v|: 127 · 128, so that v = 128·hi + lo with |hi| ≤ 127 and |lo| ≤ 64.
const STEPS: f32 = 16256.0;

/// y rounded to the nearest integer (ties to even), for |y| < 2²²: adding 1.5·2²³ leaves no
/// bits below the units, and f32 arithmetic is not reassociated.
#[inline(always)]
fn to_integer(y: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (y + SHIFT) - SHIFT
}

/// Rounds one group of activations: writes v = round(x / s) (|v| ≤ STEPS) into `v` and
/// returns s. A group with a value that is not finite gets a NaN scale (so its products come
/// out NaN, as the f32 ones would), and an all-zero group scale 0; both get v = 0.
#[inline(always)]
fn round_group(group: &[f32], v: &mut [f32]) -> f32 {
    // Written so that the compiler vectorizes it (no call to `round`, no early exit): it runs
    // for every product of a decoding step.
    // Infinities and NaNs: every exponent bit set.
    let not_finite = group.iter().fold(0u32, |all, x| {
        all | (!x.to_bits() & 0x7F80_0000 == 0) as u32
    });
    let largest = group
        .iter()
        .fold(0f32, |m, x| if x.abs() > m { x.abs() } else { m });
    if not_finite != 0 || largest == 0.0 {
        v.fill(0.0);
        return if not_finite != 0 { f32::NAN } else { 0.0 };
    }
    // x / largest first: STEPS / largest overflows for groups of subnormals.
    for (v, x) in v.iter_mut().zip(group) {
        *v = to_integer(x / largest * STEPS).clamp(-STEPS, STEPS);
    }
    largest / STEPS
}

/// How many values of an activation row share a scale for the integer dots of `dtype` on
/// `kernel`, or None where the dots take f32 activations.
pub(in crate::model) fn rounding_group(dtype: GgmlDType, kernel: super::Kernel) -> Option<usize> {
    if !cfg!(target_arch = "x86_64") || !kernel.has_avx2() {
        return None;
    }
    if has_integer_dots(dtype) {
        Some(SUPER)
    } else if has_block_integer_dots(dtype) && takes_256_bit_paths(kernel) {
        Some(BLOCK)
    } else {
        None
    }
}

/// Whether the paths that exist only with 256-bit registers are taken on `kernel`: where AVX2
/// is the widest kernel, and where AVX-512's multiply-adds run no faster than AVX2's
/// (`machine::wide_multiply_adds`). They are generation's integer paths (the blocks of 32's
/// decoding dots, `avx2::block_row_dots`, and the prefill tile, `prefill`) and attention's
/// masked block products (`attention::Products`). On an AMD Zen 4 (AVX-512 in 256-bit halves),
/// against the 512-bit f32 kernels, a Llama 1B shape decoded Q4_0 at 15.9–18.1 → 23.6–27.3
/// tokens/s and Q8_0 at 14.5 → 21.6, and its Q4_0, Q4_K and Q6_K prefill of 100 tokens took
/// 0.97–1.17 → 0.82–1.07 s. Where 512-bit multiply-adds run at twice the rate (Intel Xeons)
/// the f32 kernels are kept: the prefill tile's 16-bit multiply-adds are twice an f32 FMA's
/// at the same width, no more than the wide FMAs, and neither side was measured there.
pub(in crate::model) fn takes_256_bit_paths(kernel: super::Kernel) -> bool {
    match kernel {
        super::Kernel::Avx2 => true,
        super::Kernel::Avx512 => !crate::machine::wide_multiply_adds(),
        super::Kernel::Portable => false,
    }
}

/// The types with blocks of 32 values whose decoding dots are integer ones where
/// `takes_256_bit_paths`.
fn has_block_integer_dots(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(dtype, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0)
}

/// The types whose decoding dots take four weight rows at a time against the activations
/// as 16-bit words (`avx2::block_row_group_dots`, which needs `RoundedRows::with_words`):
/// those whose dots are bound by their instructions. Not Q8_0, whose decoding reads twice the
/// bytes and is bound by reading them: one thread with the matrix in L3, four rows took
/// 1.2–1.35 ns per block against 1.85, but decoding from memory ran slower (a 1B model
/// 21.9 / 22.1 → 20.5 / 19.8 tokens/s, Gemma 3, whose Q8_0 output head is most of its bytes,
/// 79.0 / 86.3 → 68.9 / 65.8), the four rows' streams read less well than one. Not Q5_0 and
/// Q5_1: their fifth bits are merged into bytes (`block_integers`), which then take two more
/// shuffles to widen, and shuffles are what the four-row loop runs short of (one thread, ns
/// per block: 2.4 one row at a time, 2.8 four). Both measured in `docs/performance-log.md`,
/// twenty-fifth round.
pub(in crate::model) fn takes_row_groups(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1)
}

/// The K types: their decoding dots are integer ones on every CPU with AVX2, and their
/// register dequantization lives here.
pub fn has_integer_dots(dtype: GgmlDType) -> bool {
    matches!(
        dtype,
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
    )
}

/// The 512-bit loops run for the AVX-512 kernel where the CPU also has AVX-512BW; the AVX2
/// ones otherwise.
#[cfg(target_arch = "x86_64")]
pub(super) fn takes_avx512(kernel: super::Kernel) -> bool {
    kernel == super::Kernel::Avx512 && avx512::available()
}

/// Activation rows rounded for the integer dots (see the module's comment).
pub struct RoundedRows {
    cols: usize,
    /// Values per scale: 256 (K types) or 32 (the blocks of 32).
    group: usize,
    /// v = 128·hi + lo for every value, in the rows' order.
    hi: Vec<i8>,
    lo: Vec<i8>,
    /// v itself as 16-bit words, which the four-row loop multiplies (`with_words`); empty
    /// unless asked for.
    words: Vec<i16>,
    /// s for each group of each row: the value x stands for s·v.
    scales: Vec<f32>,
    /// Σ x over each run of 16 values of each row, from the f32 values.
    run_sums: Vec<f32>,
    /// Σ x over each 32 values (two runs' sums added): Q4_K's and Q5_K's offsets. Empty for
    /// rows rounded per block of 32, whose formats do not read it.
    pair_sums: Vec<f32>,
}

impl RoundedRows {
    /// Rounds rows of `cols` values (a multiple of `group`), with one scale per `group`
    /// values. A group with a value that is not finite gets a NaN scale, so its dots come out
    /// NaN as the f32 ones would.
    pub fn new(x: &[f32], cols: usize, group: usize) -> RoundedRows {
        assert!(group.is_multiple_of(RUN) && cols.is_multiple_of(group));
        assert!(x.len().is_multiple_of(cols));
        let (mut hi, mut lo) = (vec![0i8; x.len()], vec![0i8; x.len()]);
        let mut v = vec![0f32; group];
        let scales = x
            .chunks(group)
            .zip(hi.chunks_mut(group).zip(lo.chunks_mut(group)))
            .map(|(block, (hi, lo))| {
                let scale = round_group(block, &mut v);
                for ((v, hi), lo) in v.iter().zip(hi.iter_mut()).zip(lo.iter_mut()) {
                    let h = to_integer(v / 128.0);
                    (*hi, *lo) = (h as i8, (v - 128.0 * h) as i8);
                }
                scale
            })
            .collect();
        let run_sums: Vec<f32> = x.chunks(RUN).map(|run| run.iter().sum()).collect();
        // Only the K types' rows (one scale per super-block) are read by sub-block.
        let pair_sums = match group {
            SUPER => run_sums.chunks(2).map(|pair| pair.iter().sum()).collect(),
            _ => Vec::new(),
        };
        RoundedRows {
            cols,
            group,
            hi,
            lo,
            words: Vec::new(),
            scales,
            run_sums,
            pair_sums,
        }
    }

    /// The same rows with v = 128·hi + lo also as 16-bit words, for the four-row loop of the
    /// formats that `takes_row_groups`.
    pub fn with_words(mut self) -> RoundedRows {
        let words = self.hi.iter().zip(&self.lo);
        self.words = words
            .map(|(&hi, &lo)| 128 * i16::from(hi) + i16::from(lo))
            .collect();
        self
    }

    /// The value that stands for x[i]: s·(128·hi + lo).
    #[cfg(test)]
    fn value(&self, i: usize) -> f32 {
        let v = 128.0 * f32::from(self.hi[i]) + f32::from(self.lo[i]);
        self.scales[i / self.group] * v
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.hi.len() / self.cols
    }
}

/// Calls `$row_dots::<N, $format>` for each weight row from `$r` whose dots `$dots` holds, N
/// being `$n`, the number of input rows (1 to 4), so that each count gets its own loop.
/// Expands to unsafe calls: the caller vouches for `$row_dots`'s conditions.
#[cfg(target_arch = "x86_64")]
macro_rules! each_weight_row {
    ($row_dots:ident, $format:expr, ($bytes:expr, $r:expr, $cols:expr, $x:expr, $dots:expr, $n:expr)) => {
        for (k, dots) in $dots.chunks_mut($n).enumerate() {
            let (bytes, r, cols, x) = ($bytes, $r + k, $cols, $x);
            // SAFETY: the caller's.
            unsafe {
                match $n {
                    1 => $row_dots::<1, { $format }>(bytes, r, cols, x, dots),
                    2 => $row_dots::<2, { $format }>(bytes, r, cols, x, dots),
                    3 => $row_dots::<3, { $format }>(bytes, r, cols, x, dots),
                    _ => $row_dots::<4, { $format }>(bytes, r, cols, x, dots),
                }
            }
        }
    };
}

/// An integer kernel module's entry points for the CPU features `$features`: `row_dots` picks
/// the module's `row_dots_n` for the storage type and the number of input rows, and
/// `dequantize` its `dequantize_as`, so that each loop is compiled without a branch per
/// super-block.
#[cfg(target_arch = "x86_64")]
macro_rules! integer_entry_points {
    ($features:literal) => {
        /// dots[k·n + i] = W[r + k] · x_i for the `rows` rows from r and the n = dots.len() /
        /// rows rounded input rows x_i.
        ///
        /// # Safety
        /// The CPU has `$features`; `bytes` holds rows of `cols / 256` super-blocks of `dtype`,
        /// one with integer dots.
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn row_dots(
            bytes: &[u8],
            dtype: GgmlDType,
            (r, rows): (usize, usize),
            cols: usize,
            x: &RoundedRows,
            dots: &mut [f32],
        ) {
            let n = dots.len() / rows;
            assert!(x.cols == cols && x.rows() >= n);
            macro_rules! each_row {
                ($format:expr) => {
                    // SAFETY: as for this function.
                    each_weight_row!(row_dots_n, $format, (bytes, r, cols, x, dots, n))
                };
            }
            match dtype {
                GgmlDType::Q2K => each_row!(Q2K),
                GgmlDType::Q3K => each_row!(Q3K),
                GgmlDType::Q4K => each_row!(Q4K),
                GgmlDType::Q5K => each_row!(Q5K),
                GgmlDType::Q6K => each_row!(Q6K),
                _ => unreachable!("no integer dots for {dtype:?}"),
            }
        }

        /// Writes the values of the whole K super-blocks in `blocks` into `dst` in runs of 16,
        /// `stride` apart (as `dequantize::dequantize_blocks`), with the same bits as candle's
        /// dequantization.
        ///
        /// # Safety
        /// The CPU has `$features`; `dtype` is a K type; the runs fit `dst`
        /// (`dequantize::assert_runs_fit`).
        #[target_feature(enable = $features)]
        pub(in super::super) unsafe fn dequantize(
            blocks: &[u8],
            dtype: GgmlDType,
            dst: &mut [f32],
            stride: usize,
        ) {
            // SAFETY: as for this function.
            unsafe {
                match dtype {
                    GgmlDType::Q2K => dequantize_as::<Q2K>(blocks, dst, stride),
                    GgmlDType::Q3K => dequantize_as::<Q3K>(blocks, dst, stride),
                    GgmlDType::Q4K => dequantize_as::<Q4K>(blocks, dst, stride),
                    GgmlDType::Q5K => dequantize_as::<Q5K>(blocks, dst, stride),
                    GgmlDType::Q6K => dequantize_as::<Q6K>(blocks, dst, stride),
                    _ => unreachable!("not a K type: {dtype:?}"),
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::avx2::{
        block_bytes, block_scales, fifth_bits_at, k_bytes, q4k_fields, stored_nibbles, values_at,
        Q2K_BYTES, Q3K_BYTES, Q4_0, Q4_1, Q5_0, Q5_1, Q6K_BYTES, Q8_0,
    };
    use super::super::{f16_values, in_row_groups, prefetch_ahead, ROW_GROUP};
    use super::{RoundedRows, BLOCK, RUN, SUPER};
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    pub(super) const Q2K: u8 = 0;
    pub(super) const Q3K: u8 = 1;
    pub(super) const Q6K: u8 = 2;
    pub(super) const Q4K: u8 = 3;
    pub(super) const Q5K: u8 = 4;

    pub(super) const fn super_bytes(format: u8) -> usize {
        match format {
            Q2K => Q2K_BYTES,
            Q3K => Q3K_BYTES,
            Q4K => k_bytes(false),
            Q5K => k_bytes(true),
            _ => Q6K_BYTES,
        }
    }

    integer_entry_points!("avx2,fma,f16c");

    /// What a super-block's weights share: per run of 16 the integer multiplier (each as
    /// a pair of equal 16-bit words in a 32-bit lane, runs 0..8 and 8..16, each eight as
    /// runs 0, 2, 4, 6 in the low 128-bit lane and 1, 3, 5, 7 in the high one) and the offset
    /// taken against the run's Σ x (in f32, runs in order), and the factor d of the integer
    /// part. Where a sub-block's two runs share both (`shared_by_run_pairs`), they are held
    /// once per sub-block of 32 instead: the multipliers of sub-blocks 0..4 in both lanes of
    /// the first vector, 4..8 in the second's, and the offsets in the first vector, as
    /// integers not yet times `offset_factor` (the second is unused).
    struct Scales {
        multipliers: [__m256i; 2],
        offsets: [__m256; 2],
        d: f32,
        /// What each offset integer is multiplied by.
        offset_factor: f32,
    }

    /// A super-block's sixteen multipliers sc (one per run of 16) as signed bytes, the integer
    /// parts of the runs' offsets likewise, d, and the offsets' factor: run k's offset is
    /// factor · offset_k, taken against the run's Σ x.
    ///
    /// # Safety
    /// `at` points at a whole super-block of `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_bytes<const FORMAT: u8>(
        at: *const u8,
        f16_values: &[f32; 1 << 16],
    ) -> (__m128i, __m128i, f32, f32) {
        // SAFETY: the caller's bound; d and dmin lie inside the super-block.
        let f16 = |at: *const u8| unsafe { f16_at(at, f16_values) };
        let low4 = _mm_set1_epi8(0x0F);
        // SAFETY (loads): each lies inside the super-block.
        match FORMAT {
            Q2K => {
                let packed = unsafe { _mm_loadu_si128(at as *const __m128i) };
                let m = _mm_and_si128(_mm_srli_epi16::<4>(packed), low4);
                let (d, dmin) = (f16(unsafe { at.add(80) }), f16(unsafe { at.add(82) }));
                (_mm_and_si128(packed, low4), m, d, -dmin)
            }
            Q3K => {
                let packed = unsafe { std::ptr::read_unaligned(at.add(96) as *const [u8; 12]) };
                let sc = super::super::super::dequantize::q3k_scales(&packed);
                let sc = _mm_sub_epi8(
                    unsafe { _mm_loadu_si128(sc.as_ptr() as *const __m128i) },
                    _mm_set1_epi8(32),
                );
                let d = f16(unsafe { at.add(108) });
                (sc, sc, d, -4.0 * d)
            }
            Q4K | Q5K => {
                // Eight sub-blocks of 32: each field twice, once per run of 16.
                let (sc, m) = unsafe { q4k_fields(at) };
                let twice = |v: u64| {
                    let v = _mm_cvtsi64_si128(v as i64);
                    _mm_unpacklo_epi8(v, v)
                };
                let (d, dmin) = (f16(at), f16(unsafe { at.add(2) }));
                (twice(sc), twice(m), d, -dmin)
            }
            _ => {
                let sc = unsafe { _mm_loadu_si128(at.add(192) as *const __m128i) };
                let d = f16(unsafe { at.add(208) });
                (sc, sc, d, -32.0 * d)
            }
        }
    }

    /// The f16 value stored at `at`, as f32.
    ///
    /// # Safety
    /// `at` points at two readable bytes.
    #[inline(always)]
    pub(super) unsafe fn f16_at(at: *const u8, f16_values: &[f32; 1 << 16]) -> f32 {
        f16_values[unsafe { std::ptr::read_unaligned(at as *const u16) } as usize]
    }

    /// The shuffle that copies each 32-bit lane's low 16-bit word into its high one.
    #[inline(always)]
    fn words_twice() -> __m256i {
        // SAFETY: only called from the kernels, which run where AVX2 is present.
        unsafe {
            _mm256_setr_epi8(
                0, 1, 0, 1, 4, 5, 4, 5, 8, 9, 8, 9, 12, 13, 12, 13, 0, 1, 0, 1, 4, 5, 4, 5, 8, 9,
                8, 9, 12, 13, 12, 13,
            )
        }
    }

    /// # Safety
    /// `at` points at a whole super-block of `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales<const FORMAT: u8>(at: *const u8, f16_values: &[f32; 1 << 16]) -> Scales {
        let words_twice = words_twice();
        if shared_by_run_pairs(FORMAT) {
            // The eight sub-blocks' fields straight from their bytes: one widening and, for
            // the multipliers, one shuffle (the general path below unpacks sixteen runs).
            // SAFETY: the caller's bound; d and dmin are the super-block's first four bytes.
            let ((sc, m), d, dmin) = unsafe {
                (
                    q4k_fields(at),
                    f16_at(at, f16_values),
                    f16_at(at.add(2), f16_values),
                )
            };
            let widen = |v: u64| _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64));
            // Sub-blocks 0..4 in both 128-bit lanes, then 4..8: chunk c's multiplier is one
            // in-lane broadcast (`chunk_multiplier`), as for the other formats.
            let multipliers = _mm256_shuffle_epi8(widen(sc), words_twice);
            return Scales {
                multipliers: [
                    _mm256_permute2x128_si256::<0x00>(multipliers, multipliers),
                    _mm256_permute2x128_si256::<0x11>(multipliers, multipliers),
                ]
                .map(|v| opaque(v)),
                offsets: [_mm256_cvtepi32_ps(widen(m)), _mm256_setzero_ps()],
                d,
                offset_factor: -dmin,
            };
        }
        // SAFETY: the caller's bound.
        let (sc, offset_ints, d, offset_d) = unsafe { scale_bytes::<FORMAT>(at, f16_values) };
        let widen = |v: __m128i| {
            [
                _mm256_cvtepi8_epi32(v),
                _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v)),
            ]
        };
        // Chunk c holds runs 2c and 2c + 1, one per 128-bit lane: with the even runs of each
        // eight in the low lanes and the odd ones in the high lanes, its multiplier is one
        // in-lane broadcast (`chunk_multiplier`).
        let by_chunk = _mm_shuffle_epi8(
            sc,
            _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15),
        );
        let offset_factor = offset_d;
        let offset_d = _mm256_set1_ps(offset_d);
        Scales {
            multipliers: widen(by_chunk).map(|v| _mm256_shuffle_epi8(v, words_twice)),
            offsets: widen(offset_ints).map(|v| _mm256_mul_ps(_mm256_cvtepi32_ps(v), offset_d)),
            d,
            offset_factor,
        }
    }

    /// The unsigned integer parts u of values 32c..32c + 32 of a super-block (the weights
    /// are d·sc·u plus the run's offset), one per byte.
    ///
    /// # Safety
    /// `at` points at a whole super-block of `FORMAT`; c < 8.
    #[inline(always)]
    unsafe fn chunk<const FORMAT: u8>(at: *const u8, c: usize) -> __m256i {
        let load = |offset: usize| {
            // SAFETY: every offset used leaves 32 bytes inside the super-block.
            unsafe { _mm256_loadu_si256(at.add(offset) as *const __m256i) }
        };
        let (half, step) = (c / 4, c % 4);
        match FORMAT {
            Q2K => {
                let q = load(16 + 32 * half);
                let shift = _mm_cvtsi32_si128(2 * step as i32);
                _mm256_and_si256(_mm256_srl_epi16(q, shift), _mm256_set1_epi8(3))
            }
            Q3K => {
                let (q, high) = (load(32 + 32 * half), load(0));
                let shift = _mm_cvtsi32_si128(2 * step as i32);
                let low = _mm256_and_si256(_mm256_srl_epi16(q, shift), _mm256_set1_epi8(3));
                _mm256_or_si256(low, bit_to(high, 4 * half + step, 2))
            }
            Q4K | Q5K => {
                // Sub-block pair c / 2 shares 32 bytes: low nibbles first, then high ones.
                let q = load(if FORMAT == Q5K { 48 } else { 16 } + 32 * (c / 2));
                let q = if c.is_multiple_of(2) {
                    q
                } else {
                    _mm256_srli_epi16::<4>(q)
                };
                let nibbles = _mm256_and_si256(q, _mm256_set1_epi8(0x0F));
                if FORMAT == Q5K {
                    _mm256_or_si256(nibbles, bit_to(load(16), c, 4))
                } else {
                    nibbles
                }
            }
            _ => {
                // ggml's block_q6_K: per half, 64 bytes of low nibbles and 32 of bit pairs.
                let (a, b, h) = (load(64 * half), load(64 * half + 32), load(128 + 32 * half));
                let (low, top) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
                let (nibbles, pairs) = match step {
                    0 => (_mm256_and_si256(a, low), _mm256_slli_epi16::<4>(h)),
                    1 => (_mm256_and_si256(b, low), _mm256_slli_epi16::<2>(h)),
                    2 => (_mm256_and_si256(_mm256_srli_epi16::<4>(a), low), h),
                    _ => (
                        _mm256_and_si256(_mm256_srli_epi16::<4>(b), low),
                        _mm256_srli_epi16::<2>(h),
                    ),
                };
                _mm256_or_si256(nibbles, _mm256_and_si256(pairs, top))
            }
        }
    }

    /// `dequantize` for one format, 8 values per register (as the AVX-512BW one).
    ///
    /// # Safety
    /// As for `dequantize`, with `blocks` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_as<const FORMAT: u8>(blocks: &[u8], dst: &mut [f32], stride: usize) {
        let size = super_bytes(FORMAT);
        let f16_values = f16_values();
        let bias = _mm256_set1_epi32(match FORMAT {
            Q3K => 4,
            Q6K => 32,
            _ => 0,
        });
        let (mut multipliers, mut offsets) = ([0f32; 16], [0f32; 16]);
        let mut u = [0u8; SUPER];
        for (b, block) in blocks.chunks_exact(size).enumerate() {
            let at = block.as_ptr();
            // SAFETY: `block` is a whole super-block; the arrays hold 16 f32 and 256 bytes;
            // run b·16 + k starts (b·16 + k)·stride into `dst`, which the caller checked.
            unsafe {
                let (sc, offset_ints, d, offset_d) = scale_bytes::<FORMAT>(at, f16_values);
                for (out, (ints, factor)) in [&mut multipliers, &mut offsets]
                    .into_iter()
                    .zip([(sc, d), (offset_ints, offset_d)])
                {
                    for (k, ints) in [ints, _mm_srli_si128::<8>(ints)].into_iter().enumerate() {
                        let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ints));
                        let v = _mm256_mul_ps(_mm256_set1_ps(factor), v);
                        _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), v);
                    }
                }
                for c in 0..SUPER / 32 {
                    let chunk = chunk::<FORMAT>(at, c);
                    _mm256_storeu_si256(u.as_mut_ptr().add(32 * c) as *mut __m256i, chunk);
                }
                for run in 0..SUPER / RUN {
                    for k in 0..2 {
                        let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            u.as_ptr().add(RUN * run + 8 * k) as *const __m128i,
                        ));
                        let q = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, bias));
                        let y = _mm256_mul_ps(_mm256_set1_ps(multipliers[run]), q);
                        let y = match FORMAT {
                            Q2K | Q4K | Q5K => _mm256_add_ps(y, _mm256_set1_ps(offsets[run])),
                            _ => y,
                        };
                        let to = (b * SUPER / RUN + run) * stride + 8 * k;
                        _mm256_storeu_ps(dst.as_mut_ptr().add(to), y);
                    }
                }
            }
        }
    }

    /// Bit `from` of every byte of `v`, moved to bit `to` (the others clear): one 16-bit shift
    /// (bits that cross into the next byte of a pair are masked off) and one mask.
    #[inline(always)]
    fn bit_to(v: __m256i, from: usize, to: usize) -> __m256i {
        // SAFETY: only called from the kernels, which run where AVX2 is present.
        unsafe {
            let moved = if from <= to {
                _mm256_sll_epi16(v, _mm_cvtsi32_si128((to - from) as i32))
            } else {
                _mm256_srl_epi16(v, _mm_cvtsi32_si128((from - to) as i32))
            };
            _mm256_and_si256(moved, _mm256_set1_epi8(1 << to))
        }
    }

    /// `v` itself, hidden from the compiler's shuffle combining: it would merge the lane
    /// copies that `scales` makes once per super-block into each chunk's broadcast, two
    /// shuffles per chunk again.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn opaque(mut v: __m256i) -> __m256i {
        // SAFETY: an empty template: the register is read and written unchanged.
        unsafe {
            std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags));
        }
        v
    }

    /// Lane k of each 128-bit half of `multipliers`, in all four lanes of that half: chunk
    /// k's multiplier (of its group of four) as `scales` lays them out. One immediate
    /// shuffle: a `vpermd` needed index vectors, which the loop kept in registers it then
    /// spilled (the compiler made it two shuffles), and a lane broadcast was two shuffles
    /// too.
    #[inline(always)]
    fn chunk_multiplier(multipliers: __m256i, k: usize) -> __m256i {
        // SAFETY: only called from the kernels, which run where AVX2 is present.
        unsafe {
            match k {
                0 => _mm256_shuffle_epi32::<0x00>(multipliers),
                1 => _mm256_shuffle_epi32::<0x55>(multipliers),
                2 => _mm256_shuffle_epi32::<0xAA>(multipliers),
                _ => _mm256_shuffle_epi32::<0xFF>(multipliers),
            }
        }
    }

    /// Whether a K type's runs of 16 come in pairs with one scale (its sub-blocks of 32).
    const fn shared_by_run_pairs(format: u8) -> bool {
        matches!(format, Q4K | Q5K)
    }

    /// Row r's dots with N rounded input rows.
    ///
    /// # Safety
    /// As for `row_dots`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_dots_n<const N: usize, const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &RoundedRows,
        dots: &mut [f32],
    ) {
        let size = super_bytes(FORMAT);
        let supers = cols / SUPER;
        assert!(cols.is_multiple_of(SUPER), "K rows are whole super-blocks");
        assert!(x.rows() >= N && x.cols == cols && x.group == SUPER && dots.len() >= N);
        let row = &bytes[r * supers * size..(r + 1) * supers * size];
        let f16_values = f16_values();
        let mut totals = [_mm256_setzero_ps(); N];
        for sb in 0..supers {
            // SAFETY: super-block sb of the row lies inside it; 256 rounded values of each x_i
            // from sb·256, its 16 run sums and its 8 sub-block sums lie inside the slices
            // checked above (each sum vector is derived from x's length).
            unsafe {
                let at = row.as_ptr().add(sb * size);
                for ahead in (0..size).step_by(64) {
                    prefetch_ahead(at.add(ahead));
                }
                let scales = scales::<FORMAT>(at, f16_values);
                // Q4_K's and Q5_K's two runs of a chunk share their multiplier and offset
                // (`Scales`): the offsets are taken once per sub-block below.
                let mut high = [_mm256_setzero_si256(); N];
                let mut low = [_mm256_setzero_si256(); N];
                for c in 0..SUPER / 32 {
                    let u = chunk::<FORMAT>(at, c);
                    let sc = chunk_multiplier(scales.multipliers[c / 4], c % 4);
                    for i in 0..N {
                        let o = i * cols + sb * SUPER + 32 * c;
                        let hi = _mm256_loadu_si256(x.hi.as_ptr().add(o) as *const __m256i);
                        let lo = _mm256_loadu_si256(x.lo.as_ptr().add(o) as *const __m256i);
                        // Pairs of u·v (at most 2·63·127: no saturation), then sc times
                        // each pair, summed in 32-bit lanes (at most 8·2·128·16002 a super-block).
                        let pairs_hi = _mm256_maddubs_epi16(u, hi);
                        let pairs_lo = _mm256_maddubs_epi16(u, lo);
                        high[i] = _mm256_add_epi32(high[i], _mm256_madd_epi16(sc, pairs_hi));
                        low[i] = _mm256_add_epi32(low[i], _mm256_madd_epi16(sc, pairs_lo));
                    }
                }
                for i in 0..N {
                    let v = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(high[i]),
                        _mm256_set1_ps(128.0),
                        _mm256_cvtepi32_ps(low[i]),
                    );
                    let factor = scales.d * x.scales[i * supers + sb];
                    totals[i] = _mm256_fmadd_ps(v, _mm256_set1_ps(factor), totals[i]);
                    if shared_by_run_pairs(FORMAT) {
                        // One offset per 32 values, against their Σ x.
                        let at = (i * cols + sb * SUPER) / (2 * RUN);
                        let sums = _mm256_loadu_ps(x.pair_sums.as_ptr().add(at));
                        let offsets = _mm256_mul_ps(scales.offsets[0], sums);
                        let factor = _mm256_set1_ps(scales.offset_factor);
                        totals[i] = _mm256_fmadd_ps(offsets, factor, totals[i]);
                        continue;
                    }
                    let sums = x.run_sums.as_ptr().add((i * cols + sb * SUPER) / RUN);
                    totals[i] =
                        _mm256_fmadd_ps(scales.offsets[0], _mm256_loadu_ps(sums), totals[i]);
                    totals[i] =
                        _mm256_fmadd_ps(scales.offsets[1], _mm256_loadu_ps(sums.add(8)), totals[i]);
                }
            }
        }
        let sums = super::super::avx2::sums4(&totals);
        dots[..N].copy_from_slice(&sums[..N]);
    }

    /// dots[k·n + i] = W[r + k] · x_i for the `rows` rows from r of a type with blocks of 32
    /// (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the n = dots.len() / rows input rows x_i, rounded
    /// per block of 32; `block_sums` holds Σ x over each block of 32 of every x_i (f32).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `bytes` holds rows of `cols / 32` blocks of `dtype`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn block_row_dots(
        bytes: &[u8],
        dtype: GgmlDType,
        (r, rows): (usize, usize),
        cols: usize,
        (x, block_sums): (&RoundedRows, &[f32]),
        dots: &mut [f32],
    ) {
        let n = dots.len() / rows;
        assert!(x.cols == cols && x.group == BLOCK && x.rows() >= n);
        assert!(block_sums.len() >= n * cols / BLOCK);
        let x = (x, block_sums);
        macro_rules! each_row {
            ($format:expr) => {
                // SAFETY: as for this function.
                each_weight_row!(block_row_dots_n, $format, (bytes, r, cols, x, dots, n))
            };
        }
        // Decoding (one input row) of the types that `takes_row_groups`: four weight rows at
        // a time, the rest one by one.
        macro_rules! by_rows {
            ($format:expr) => {
                if n == 1 {
                    in_row_groups(
                        r,
                        dots,
                        // SAFETY (both): as for this function.
                        |r, dots| unsafe {
                            block_row_group_dots::<{ $format }>(bytes, r, cols, x, dots)
                        },
                        |r, dot| unsafe {
                            block_row_dots_n::<1, { $format }>(bytes, r, cols, x, dot)
                        },
                    )
                } else {
                    each_row!($format)
                }
            };
        }
        match dtype {
            GgmlDType::Q4_0 => by_rows!(Q4_0),
            GgmlDType::Q4_1 => by_rows!(Q4_1),
            GgmlDType::Q5_0 => each_row!(Q5_0),
            GgmlDType::Q5_1 => each_row!(Q5_1),
            GgmlDType::Q8_0 => each_row!(Q8_0),
            _ => unreachable!("no integer block dots for {dtype:?}"),
        }
    }

    /// `block_row_dots` for one input row, all weight rows one at a time
    /// (`block_row_dots_n`) or four at a time (`block_row_group_dots`): the timing test's
    /// two sides.
    ///
    /// # Safety
    /// As for `block_row_dots`.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn block_dots_for_timing(
        bytes: &[u8],
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        x: (&RoundedRows, &[f32]),
        dots: &mut [f32],
        one_at_a_time: bool,
    ) {
        macro_rules! each {
            ($format:expr) => {
                for r in (0..rows).step_by(ROW_GROUP) {
                    let dots = &mut dots[r..r + ROW_GROUP];
                    // SAFETY: as for this function.
                    unsafe {
                        if one_at_a_time {
                            for (k, dot) in dots.chunks_mut(1).enumerate() {
                                block_row_dots_n::<1, { $format }>(bytes, r + k, cols, x, dot)
                            }
                        } else {
                            block_row_group_dots::<{ $format }>(bytes, r, cols, x, dots)
                        }
                    }
                }
            };
        }
        match dtype {
            GgmlDType::Q4_0 => each!(Q4_0),
            GgmlDType::Q4_1 => each!(Q4_1),
            _ => unreachable!("no four-row dots for {dtype:?}"),
        }
    }

    /// How far ahead the four-row loop asks for weight bytes, at least: each block asks for
    /// the same block of the row this many bytes on (rounded up to whole groups of four rows)
    /// into the second-level cache, and for the next line of its own row into the first. The
    /// four rows are four short streams that the hardware prefetchers follow badly (no
    /// software prefetch: 15–17 tokens/s on a Llama 1B shape's Q4_0, AMD Zen 4). One group
    /// ahead into the first-level cache (the previous loop) stalled on its miss buffers:
    /// 28.1–29.6 tokens/s there, against 36.0–40.2 one group ahead into L2 with the near line
    /// and 31.7–38.3 with this. SmolLM2 (Q4_1, 576 columns: a group is 1.4 KB, so one group
    /// ahead comes too late) 146–177 → 141–157 one group ahead into L2, 153–204 with this.
    /// Alternating binaries, three to six rounds each; on Zen 3 not measured.
    const GROUP_PREFETCH_BYTES: usize = 4096;

    /// `block_row_dots_n::<1, FORMAT>` for the four weight rows from r (Q4_0 and Q4_1,
    /// `takes_row_groups`), with the activations as 16-bit words: a block's 32 weights widened
    /// to words take two word multiply-adds, where the activations' two bytes took two byte
    /// and two word ones, and the four rows share each block's activation loads, scale and
    /// offset. Each row's d comes from the f16 table by a broadcast load, and Q4_0's centre
    /// −8d goes into the same multiply-add as the scale, spread over the eight lanes that
    /// are summed at the end. One thread, ns per block of a row (`block_dot_timings`, 8192 ×
    /// 2048, in L3): Q4_0 1.91 → 1.25, Q4_1 1.91 → 1.43.
    ///
    /// # Safety
    /// As for `block_row_dots`, with `bytes` in `FORMAT` and four dots.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_row_group_dots<const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        (x, block_sums): (&RoundedRows, &[f32]),
        dots: &mut [f32],
    ) {
        const { assert!(FORMAT == Q4_0 || FORMAT == Q4_1) };
        let size = block_bytes(FORMAT);
        let blocks = cols / BLOCK;
        assert!(x.rows() >= 1 && x.cols == cols && x.words.len() >= cols);
        assert!(block_sums.len() >= blocks && dots.len() >= ROW_GROUP);
        let rows = &bytes[r * blocks * size..(r + ROW_GROUP) * blocks * size];
        // Whole groups ahead, so that the prefetch lands on the same block of a later row.
        let group_bytes = ROW_GROUP * blocks * size;
        let ahead = group_bytes * GROUP_PREFETCH_BYTES.div_ceil(group_bytes);
        let f16_values = f16_values();
        let mut totals = [_mm256_setzero_ps(); ROW_GROUP];
        let mut offsets = [0f32; ROW_GROUP];
        for b in 0..blocks {
            // SAFETY: block b of each row lies inside `rows`; 32 words from b·32, their scale
            // and their sum lie inside the slices checked above.
            unsafe {
                let words = x.words.as_ptr().add(b * BLOCK);
                let xs = [0, RUN].map(|at| _mm256_loadu_si256(words.add(at) as *const __m256i));
                let scale = _mm256_broadcast_ss(x.scales.get_unchecked(b));
                // Q4_0's offset −8d·Σx spread over the eight lanes summed at the end: each lane
                // takes −Σx, which d then scales.
                let block_sum = *block_sums.get_unchecked(b);
                let lane_offset = _mm256_set1_ps(-block_sum);
                for (k, total) in totals.iter_mut().enumerate() {
                    let at = rows.as_ptr().add((k * blocks + b) * size);
                    // A later group's row into L2, this row's next line into L1
                    // (`GROUP_PREFETCH_BYTES`).
                    _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(ahead) as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64) as *const i8);
                    let [first, second] = block_words::<FORMAT>(at);
                    // Pairs of w·v at most 2·128·16256, and four products per lane below 2²⁴:
                    // exact in f32.
                    let v = _mm256_cvtepi32_ps(_mm256_add_epi32(
                        _mm256_madd_epi16(first, xs[0]),
                        _mm256_madd_epi16(second, xs[1]),
                    ));
                    let bits = |o: usize| std::ptr::read_unaligned(at.add(o) as *const u16);
                    let d = _mm256_broadcast_ss(&f16_values[bits(0) as usize]);
                    *total = if FORMAT == Q4_1 {
                        let m = f16_values[bits(2) as usize];
                        offsets[k] = m.mul_add(block_sum, offsets[k]);
                        _mm256_fmadd_ps(_mm256_mul_ps(v, scale), d, *total)
                    } else {
                        _mm256_fmadd_ps(_mm256_fmadd_ps(v, scale, lane_offset), d, *total)
                    };
                }
            }
        }
        let sums = super::super::avx2::sums4(&totals);
        for ((dot, sum), offset) in dots.iter_mut().zip(sums).zip(offsets) {
            *dot = sum + offset;
        }
    }

    /// A Q4_0 or Q4_1 block's 32 stored u as 16-bit words, the elements 0..16 then 16..32.
    ///
    /// # Safety
    /// `at` points at a whole block of `FORMAT`.
    #[inline(always)]
    unsafe fn block_words<const FORMAT: u8>(at: *const u8) -> [__m256i; 2] {
        // SAFETY (loads): the value bytes lie inside the block.
        unsafe {
            let bytes = _mm_loadu_si128(at.add(values_at(FORMAT)) as *const __m128i);
            // Widened first (one shuffle, the load folded into it), then split: the compiler
            // otherwise splits the bytes first and widens twice.
            let q = opaque(_mm256_cvtepu8_epi16(bytes));
            [
                _mm256_and_si256(q, _mm256_set1_epi16(0x0f)),
                _mm256_srli_epi16::<4>(q),
            ]
        }
    }

    /// Whether a format's weights are d·w with w signed (Q8_0), rather than d·u + m with u
    /// unsigned (Q4_1, Q5_1, and Q4_0 and Q5_0 with m = −8d and −16d, `block_scales`). Byte
    /// multiply-adds take u as it is, where a signed w takes three sign operations a block
    /// (w's magnitude and the activations' two bytes): Q4_0 and Q5_0 take one offset against
    /// the block's Σ x instead.
    pub(super) const fn is_signed(format: u8) -> bool {
        matches!(format, Q8_0)
    }

    /// A super-block's eight blocks of 32 as the 16-bit integers that the prefill tile
    /// multiplies (`prefill`): u for Q4_K and Q5_K, whose scales are per block of 32, and
    /// sc·(u − bias) for the types with a scale per run of 16 (Q2_K, Q3_K and Q6_K: bias 0,
    /// 4 and 32), the runs' scales `run_scales` being `scale_bytes`' first field (unused for
    /// Q4_K and Q5_K).
    ///
    /// # Safety
    /// `at` points at a whole super-block of `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_integers<const FORMAT: u8>(
        at: *const u8,
        run_scales: __m128i,
    ) -> [[i16; BLOCK]; SUPER / BLOCK] {
        let mut ints = [[0i16; BLOCK]; SUPER / BLOCK];
        let (scales, bias) = if shared_by_run_pairs(FORMAT) {
            ([0i8; 16], 0)
        } else {
            // SAFETY: 16 bytes either way.
            let sc: [i8; 16] = unsafe { std::mem::transmute(run_scales) };
            (
                sc,
                if FORMAT == Q3K {
                    4
                } else if FORMAT == Q6K {
                    32
                } else {
                    0
                },
            )
        };
        let bias = _mm256_set1_epi16(bias);
        for (c, block) in ints.iter_mut().enumerate() {
            // SAFETY: the caller's bound; c < 8.
            let u = unsafe { chunk::<FORMAT>(at, c) };
            let runs = [
                _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u)),
                _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(u)),
            ];
            for (k, run) in runs.into_iter().enumerate() {
                let v = if shared_by_run_pairs(FORMAT) {
                    run
                } else {
                    let sc = _mm256_set1_epi16(scales[2 * c + k] as i16);
                    _mm256_mullo_epi16(_mm256_sub_epi16(run, bias), sc)
                };
                // SAFETY: a block holds 32 values, two runs of 16.
                unsafe { _mm256_storeu_si256(block.as_mut_ptr().add(RUN * k) as *mut __m256i, v) };
            }
        }
        ints
    }

    /// A block's 32 integers w (signed) or u (unsigned, see `is_signed`) as bytes, in element
    /// order (`stored_nibbles`), with bit j of a Q5 block's u32 the fifth bit of element j.
    ///
    /// # Safety
    /// `at` points at a whole block of `FORMAT`.
    #[inline(always)]
    pub(super) unsafe fn block_integers<const FORMAT: u8>(at: *const u8) -> __m256i {
        // SAFETY (loads): the value bytes and the fifth bits lie inside the block.
        if FORMAT == Q8_0 {
            return unsafe { _mm256_loadu_si256(at.add(2) as *const __m256i) };
        }
        // Q4_0's and Q5_0's stored u: their centres are offsets (`is_signed`).
        let (low, high) = unsafe { stored_nibbles::<FORMAT>(at) };
        let u = _mm256_set_m128i(high, low);
        match fifth_bits_at(FORMAT) {
            Some(bits_at) => {
                let bits = unsafe { std::ptr::read_unaligned(at.add(bits_at) as *const u32) };
                // Byte j gets the bits' byte j / 8, then keeps bit j % 8 of it.
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(bits as i32),
                    _mm256_setr_epi8(
                        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                        3, 3, 3, 3, 3, 3, 3,
                    ),
                );
                let bit_of_byte = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit_of_byte), bit_of_byte);
                _mm256_or_si256(u, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
            }
            None => u,
        }
    }

    /// Row r's dots with N input rows rounded per block of 32. `maddubs` multiplies unsigned
    /// bytes by signed ones: it takes u as it is, and a signed w as |w| against the
    /// activations' bytes with w's signs (Q8_0). The offsets m·Σx of the Q4 and Q5 formats are
    /// taken in f32 against the f32 block sums, as the f32 kernels take them.
    ///
    /// # Safety
    /// As for `block_row_dots`, with `bytes` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_row_dots_n<const N: usize, const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        (x, block_sums): (&RoundedRows, &[f32]),
        dots: &mut [f32],
    ) {
        let size = block_bytes(FORMAT);
        let blocks = cols / BLOCK;
        assert!(x.rows() >= N && x.cols == cols && x.group == BLOCK && dots.len() >= N);
        assert!(block_sums.len() >= N * blocks);
        let row = &bytes[r * blocks * size..(r + 1) * blocks * size];
        let f16_values = f16_values();
        let (ones, high_weight) = (_mm256_set1_epi16(1), _mm256_set1_epi16(128));
        let mut totals = [_mm256_setzero_ps(); N];
        let mut offsets = [0f32; N];
        for b in 0..blocks {
            // SAFETY: block b of the row lies inside it; 32 rounded values of each x_i from
            // b·32, their scale and their sum lie inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(b * size);
                prefetch_ahead(at);
                let (d, m) = block_scales::<FORMAT>(at, f16_values);
                let w = block_integers::<FORMAT>(at);
                let magnitudes = if is_signed(FORMAT) {
                    _mm256_sign_epi8(w, w)
                } else {
                    w
                };
                for (i, total) in totals.iter_mut().enumerate() {
                    let o = i * cols + b * BLOCK;
                    let mut hi = _mm256_loadu_si256(x.hi.as_ptr().add(o) as *const __m256i);
                    let mut lo = _mm256_loadu_si256(x.lo.as_ptr().add(o) as *const __m256i);
                    if is_signed(FORMAT) {
                        (hi, lo) = (_mm256_sign_epi8(hi, w), _mm256_sign_epi8(lo, w));
                    }
                    // Pairs of |w|·v at most 2·128·127: no saturation. A block's Σ w·v is at
                    // most 32·128·16256 < 2³¹: exact in 32 bits.
                    let pairs_hi = _mm256_maddubs_epi16(magnitudes, hi);
                    let pairs_lo = _mm256_maddubs_epi16(magnitudes, lo);
                    let v = _mm256_add_epi32(
                        _mm256_madd_epi16(pairs_hi, high_weight),
                        _mm256_madd_epi16(pairs_lo, ones),
                    );
                    let factor = d * *x.scales.get_unchecked(i * blocks + b);
                    *total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(factor), *total);
                    if !is_signed(FORMAT) {
                        offsets[i] += m * *block_sums.get_unchecked(i * blocks + b);
                    }
                }
            }
        }
        let sums = super::super::avx2::sums4(&totals);
        for i in 0..N {
            dots[i] = sums[i] + offsets[i];
        }
    }
}

/// The kernels of `avx2` with 512-bit registers (AVX-512BW for bytes and words): each
/// instruction takes 64 values, two of the AVX2 kernels' chunks, whose stored bytes are
/// broadcast to both halves and shifted by different counts where the two chunks share them.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::super::{f16_values, prefetch_ahead};
    use super::avx2::{scale_bytes, super_bytes, Q2K, Q3K, Q4K, Q5K, Q6K};
    use super::{RoundedRows, RUN, SUPER};
    use candle_core::quantized::GgmlDType;
    use std::arch::x86_64::*;

    /// The CPU has AVX-512BW besides AVX-512F (read once).
    pub(super) fn available() -> bool {
        static BW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *BW.get_or_init(|| is_x86_feature_detected!("avx512bw"))
    }

    integer_entry_points!("avx512f,avx512bw,avx2,fma,f16c");

    /// 32 bytes at `at` in both halves.
    ///
    /// # Safety
    /// 32 bytes at `at` may be read.
    #[inline(always)]
    unsafe fn twice(at: *const u8) -> __m512i {
        // SAFETY: the caller's bound; AVX-512F is present where the kernels run.
        unsafe { _mm512_broadcast_i64x4(_mm256_loadu_si256(at as *const __m256i)) }
    }

    /// Sixteen 16-bit counts of `a` then sixteen of `b`, for the per-word shifts.
    #[inline(always)]
    fn counts(a: u16, b: u16) -> __m512i {
        let word = |v: u16| v as i64 * 0x0001_0001_0001_0001;
        // SAFETY: AVX-512F is present where the kernels run.
        unsafe {
            _mm512_set_epi64(
                word(b),
                word(b),
                word(b),
                word(b),
                word(a),
                word(a),
                word(a),
                word(a),
            )
        }
    }

    /// Bytes of `v` whose bit `a` (low half) or `b` (high half) is set, as a mask.
    #[inline(always)]
    fn bits_set(v: __m512i, a: usize, b: usize) -> __mmask64 {
        let bit = |k: usize| i64::from(0x0101_0101u32 << k) | i64::from(0x0101_0101u32 << k) << 32;
        // SAFETY: AVX-512F and BW are present where the kernels run.
        unsafe {
            let bits = _mm512_set_epi64(
                bit(b),
                bit(b),
                bit(b),
                bit(b),
                bit(a),
                bit(a),
                bit(a),
                bit(a),
            );
            _mm512_test_epi8_mask(v, bits)
        }
    }

    /// The unsigned integer parts u of values 64p..64p + 64 of a super-block, one per byte
    /// (the AVX2 kernels' chunks 2p and 2p + 1).
    ///
    /// # Safety
    /// `at` points at a whole super-block of `FORMAT`; p < 4.
    #[inline(always)]
    unsafe fn pair<const FORMAT: u8>(at: *const u8, p: usize) -> __m512i {
        // SAFETY (whole function): every read lies inside the super-block.
        unsafe {
            let (half, step) = (p / 2, 2 * (p % 2));
            match FORMAT {
                Q2K | Q3K => {
                    let q = twice(at.add(if FORMAT == Q2K { 16 } else { 32 } + 32 * half));
                    let shift = counts(2 * step as u16, 2 * step as u16 + 2);
                    let low = _mm512_and_si512(_mm512_srlv_epi16(q, shift), _mm512_set1_epi8(3));
                    if FORMAT == Q2K {
                        low
                    } else {
                        let set = bits_set(twice(at), 4 * half + step, 4 * half + step + 1);
                        _mm512_mask_add_epi8(low, set, low, _mm512_set1_epi8(4))
                    }
                }
                Q4K | Q5K => {
                    let q = twice(at.add(if FORMAT == Q5K { 48 } else { 16 } + 32 * p));
                    let q = _mm512_srlv_epi16(q, counts(0, 4));
                    let nibbles = _mm512_and_si512(q, _mm512_set1_epi8(0x0F));
                    if FORMAT == Q5K {
                        let set = bits_set(twice(at.add(16)), 2 * p, 2 * p + 1);
                        _mm512_mask_add_epi8(nibbles, set, nibbles, _mm512_set1_epi8(16))
                    } else {
                        nibbles
                    }
                }
                _ => {
                    // Low nibbles [A, B] for steps 0 and 1, high ones for 2 and 3; the bit
                    // pairs of H moved to bits 4..6 by <<4, <<2 (steps 0, 1) or 0, >>2 (2, 3);
                    // then 0xF8: h | (ab & 0x0F).
                    let ab = _mm512_loadu_si512(at.add(64 * half) as *const _);
                    let ab = if step == 0 {
                        ab
                    } else {
                        _mm512_srli_epi16::<4>(ab)
                    };
                    let h = twice(at.add(128 + 32 * half));
                    let h = if step == 0 {
                        _mm512_sllv_epi16(h, counts(4, 2))
                    } else {
                        _mm512_srlv_epi16(h, counts(0, 2))
                    };
                    _mm512_ternarylogic_epi32::<0xF8>(
                        _mm512_and_si512(h, _mm512_set1_epi8(0x30)),
                        ab,
                        _mm512_set1_epi8(0x0F),
                    )
                }
            }
        }
    }

    /// `dequantize` for one format: the integer parts come from the dots' unpacking, the
    /// multipliers d·sc and offsets −dmin·m are rounded to f32 as candle rounds them, and each
    /// value is (d·sc)·q − dmin·m with q = u − 4 (Q3_K) or u − 32 (Q6_K), a multiply then an
    /// add: candle's bits.
    ///
    /// # Safety
    /// As for `dequantize`, with `blocks` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn dequantize_as<const FORMAT: u8>(blocks: &[u8], dst: &mut [f32], stride: usize) {
        let size = super_bytes(FORMAT);
        let f16_values = f16_values();
        let bias = _mm512_set1_epi32(match FORMAT {
            Q3K => 4,
            Q6K => 32,
            _ => 0,
        });
        let (mut multipliers, mut offsets) = ([0f32; 16], [0f32; 16]);
        let mut u = [0u8; SUPER];
        for (b, block) in blocks.chunks_exact(size).enumerate() {
            let at = block.as_ptr();
            // SAFETY: `block` is a whole super-block; the arrays hold 16 f32 and 256 bytes;
            // run b·16 + k starts (b·16 + k)·stride into `dst`, which the caller checked.
            unsafe {
                let (sc, offset_ints, d, offset_d) = scale_bytes::<FORMAT>(at, f16_values);
                let to_f32 = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
                _mm512_storeu_ps(
                    multipliers.as_mut_ptr(),
                    _mm512_mul_ps(_mm512_set1_ps(d), to_f32(sc)),
                );
                _mm512_storeu_ps(
                    offsets.as_mut_ptr(),
                    _mm512_mul_ps(_mm512_set1_ps(offset_d), to_f32(offset_ints)),
                );
                for p in 0..4 {
                    _mm512_storeu_si512(
                        u.as_mut_ptr().add(64 * p) as *mut _,
                        pair::<FORMAT>(at, p),
                    );
                }
                for run in 0..SUPER / RUN {
                    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        u.as_ptr().add(RUN * run) as *const __m128i
                    ));
                    let q = _mm512_cvtepi32_ps(_mm512_sub_epi32(q, bias));
                    let y = _mm512_mul_ps(_mm512_set1_ps(multipliers[run]), q);
                    let y = match FORMAT {
                        Q2K | Q4K | Q5K => _mm512_add_ps(y, _mm512_set1_ps(offsets[run])),
                        _ => y,
                    };
                    _mm512_storeu_ps(dst.as_mut_ptr().add((b * SUPER / RUN + run) * stride), y);
                }
            }
        }
    }

    /// Row r's dots with N rounded input rows.
    ///
    /// # Safety
    /// As for `row_dots`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn row_dots_n<const N: usize, const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &RoundedRows,
        dots: &mut [f32],
    ) {
        let size = super_bytes(FORMAT);
        let supers = cols / SUPER;
        assert!(cols.is_multiple_of(SUPER), "K rows are whole super-blocks");
        assert!(x.rows() >= N && x.cols == cols && x.group == SUPER && dots.len() >= N);
        let row = &bytes[r * supers * size..(r + 1) * supers * size];
        let f16_values = f16_values();
        let words_twice = _mm512_set4_epi32(0x0d0c_0d0c, 0x0908_0908, 0x0504_0504, 0x0100_0100);
        // The lanes of pair p's multipliers: runs 4p..4p + 4, four lanes each.
        let pick: [__m512i; 4] = std::array::from_fn(|p| {
            let p = 4 * p as i32;
            _mm512_setr_epi32(
                p,
                p,
                p,
                p,
                p + 1,
                p + 1,
                p + 1,
                p + 1,
                p + 2,
                p + 2,
                p + 2,
                p + 2,
                p + 3,
                p + 3,
                p + 3,
                p + 3,
            )
        });
        let mut totals = [_mm512_setzero_ps(); N];
        for sb in 0..supers {
            // SAFETY: super-block sb of the row lies inside it; 256 rounded values of each x_i
            // from sb·256, and its 16 run sums, lie inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * size);
                for ahead in (0..size).step_by(64) {
                    prefetch_ahead(at.add(ahead));
                }
                let (sc, offset_ints, d, offset_d) = scale_bytes::<FORMAT>(at, f16_values);
                let multipliers = _mm512_shuffle_epi8(_mm512_cvtepi8_epi32(sc), words_twice);
                let offsets = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(offset_ints)),
                    _mm512_set1_ps(offset_d),
                );
                let mut high = [_mm512_setzero_si512(); N];
                let mut low = [_mm512_setzero_si512(); N];
                for (p, pick) in pick.iter().enumerate() {
                    let u = pair::<FORMAT>(at, p);
                    let sc = _mm512_permutexvar_epi32(*pick, multipliers);
                    for i in 0..N {
                        let o = i * cols + sb * SUPER + 64 * p;
                        let hi = _mm512_loadu_si512(x.hi.as_ptr().add(o) as *const _);
                        let lo = _mm512_loadu_si512(x.lo.as_ptr().add(o) as *const _);
                        let pairs_hi = _mm512_maddubs_epi16(u, hi);
                        let pairs_lo = _mm512_maddubs_epi16(u, lo);
                        high[i] = _mm512_add_epi32(high[i], _mm512_madd_epi16(sc, pairs_hi));
                        low[i] = _mm512_add_epi32(low[i], _mm512_madd_epi16(sc, pairs_lo));
                    }
                }
                for i in 0..N {
                    let v = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(high[i]),
                        _mm512_set1_ps(128.0),
                        _mm512_cvtepi32_ps(low[i]),
                    );
                    let factor = d * x.scales[i * supers + sb];
                    totals[i] = _mm512_fmadd_ps(v, _mm512_set1_ps(factor), totals[i]);
                    let sums = x.run_sums.as_ptr().add((i * cols + sb * SUPER) / RUN);
                    totals[i] = _mm512_fmadd_ps(offsets, _mm512_loadu_ps(sums), totals[i]);
                }
            }
        }
        for (d, total) in dots.iter_mut().zip(totals) {
            *d = _mm512_reduce_add_ps(total);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::super::matmul::tests::random;
    use super::super::{product, Activations, Kernel, Part};
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every type with integer dots, the values per activation scale on the AVX2 kernel, and
    /// a row length for the tests: the blocks of 32 take 640 (Gemma 3's hidden size), no
    /// multiple of 256.
    const TYPES: [(GgmlDType, usize, usize); 10] = [
        (GgmlDType::Q2K, SUPER, 2 * SUPER),
        (GgmlDType::Q3K, SUPER, 2 * SUPER),
        (GgmlDType::Q4K, SUPER, 2 * SUPER),
        (GgmlDType::Q5K, SUPER, 2 * SUPER),
        (GgmlDType::Q6K, SUPER, 2 * SUPER),
        (GgmlDType::Q4_0, BLOCK, 20 * BLOCK),
        (GgmlDType::Q4_1, BLOCK, 20 * BLOCK),
        (GgmlDType::Q5_0, BLOCK, 20 * BLOCK),
        (GgmlDType::Q5_1, BLOCK, 20 * BLOCK),
        (GgmlDType::Q8_0, BLOCK, 20 * BLOCK),
    ];

    /// Rows whose values lie on the rounding grid, s = 2⁻⁷ in every group of `group` values
    /// (one value at ±16256·s), so that rounding leaves them as they are.
    pub(super) fn on_grid(len: usize, seed: u64, group: usize) -> Vec<f32> {
        let s = 1.0 / 128.0;
        let mut x: Vec<f32> = random(len, seed)
            .iter()
            .map(|v| (v * STEPS).round() * s)
            .collect();
        for (b, block) in x.chunks_mut(group).enumerate() {
            block[(b * 37) % group] = if b % 2 == 0 { STEPS * s } else { -STEPS * s };
        }
        x
    }

    #[test]
    fn integer_dots_are_taken_where_measured() {
        use GgmlDType::{F16, Q4K, Q4_1, Q5_0, Q6K, Q8_0};
        assert_eq!(rounding_group(Q4K, Kernel::Avx2), Some(SUPER));
        assert_eq!(rounding_group(Q6K, Kernel::Avx512), Some(SUPER));
        // The 512-bit f32 kernels keep the blocks of 32 where they run at full width.
        let narrow_512 = (!crate::machine::wide_multiply_adds()).then_some(BLOCK);
        for dtype in [Q4_1, Q5_0, Q8_0] {
            assert_eq!(rounding_group(dtype, Kernel::Avx2), Some(BLOCK));
            assert_eq!(rounding_group(dtype, Kernel::Avx512), narrow_512);
        }
        for dtype in [Q4K, Q8_0, F16] {
            assert_eq!(rounding_group(dtype, Kernel::Portable), None);
        }
        assert_eq!(rounding_group(F16, Kernel::Avx2), None);
    }

    fn integer_kernels() -> Vec<Kernel> {
        let kernels: Vec<Kernel> = Kernel::available()
            .into_iter()
            .filter(|k| k.has_avx2())
            .collect();
        if kernels.is_empty() {
            eprintln!("this CPU has no AVX2+FMA+F16C: the integer dots are not used");
        }
        kernels
    }

    /// The rows' stored bytes and their values as f32 (candle's dequantization).
    pub(super) fn quantized(
        rows: usize,
        cols: usize,
        dtype: GgmlDType,
        seed: u64,
    ) -> (Vec<u8>, Vec<f32>) {
        let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let values = q.dequantize(&Device::Cpu).unwrap();
        (
            q.data().unwrap().to_vec(),
            values.flatten_all().unwrap().to_vec1().unwrap(),
        )
    }

    /// out[i·rows + r] of `product` for rows of `dtype`, with rounded activations.
    fn rounded_product(
        bytes: &[u8],
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        x: &[f32],
        kernel: Kernel,
    ) -> Vec<f32> {
        let no_plain_path = |_: usize, _: &mut [f32]| unreachable!("every row has a kernel");
        let part = Part {
            blocks: Some((bytes, dtype)),
            rows,
            dequantize_row: &no_plain_path,
        };
        product(&[part], cols, x, kernel, Activations::Rounded)
    }

    #[test]
    fn rounding_keeps_each_value_within_half_a_step() {
        for group in [SUPER, BLOCK] {
            let cols = 2 * SUPER;
            let mut x = random(3 * cols, 1);
            x[cols..cols + group].fill(0.0);
            x[2 * cols + 5] = 1e4;
            let rounded = RoundedRows::new(&x, cols, group);
            assert_eq!((rounded.rows(), rounded.group), (3, group));
            assert_eq!(rounded.scales.len(), 3 * cols / group);
            for (b, block) in x.chunks(group).enumerate() {
                let largest = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = largest / STEPS;
                assert_eq!(rounded.scales[b], step, "group of {group}, block {b}");
                for (j, v) in block.iter().enumerate() {
                    let i = b * group + j;
                    assert!(
                        rounded.hi[i].unsigned_abs() <= 127 && rounded.lo[i].unsigned_abs() <= 64
                    );
                    let d = (rounded.value(i) - v).abs();
                    assert!(
                        d <= 0.5 * step * (1.0 + 1e-5),
                        "group of {group}, value {i}: {v} off by {d}, step {step}"
                    );
                }
            }
            // The sums of runs are the f32 values' own.
            let want: f32 = x[16..32].iter().sum();
            assert_eq!(rounded.run_sums[1], want);
            // The outlier's group: its other values keep 2⁻¹⁵ of 1e4, about 0.3.
            assert!((rounded.value(2 * cols) - x[2 * cols]).abs() <= 0.31);
            // Subnormals (16256 / largest overflows): the values stay in place, within the
            // precision their subnormal scale has (about 1 %).
            let tiny: Vec<f32> = (0..group).map(|k| (k as f32 - 100.0) * 7e-41).collect();
            let rounded = RoundedRows::new(&tiny, group, group);
            let largest = tiny.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, v) in tiny.iter().enumerate() {
                let d = (rounded.value(i) - v).abs();
                assert!(d <= 0.01 * largest, "subnormal {i}: {v} off by {d}");
            }
        }
    }

    #[test]
    fn integer_dots_on_the_grid_match_f64_dots() {
        // With activations the rounding keeps as they are, the integer dots differ from the
        // f64 dots of the dequantized weights only by the f32 sums of super-block partials.
        let rows = 9;
        for kernel in integer_kernels() {
            for (t, (dtype, group, cols)) in TYPES.into_iter().enumerate() {
                let (bytes, w) = quantized(rows, cols, dtype, 10 + t as u64);
                for n in 1..=super::super::MAX_INPUT_ROWS {
                    let x = on_grid(n * cols, 20 + n as u64, group);
                    let got = rounded_product(&bytes, dtype, rows, cols, &x, kernel);
                    for i in 0..n {
                        for r in 0..rows {
                            let (w, x) =
                                (&w[r * cols..(r + 1) * cols], &x[i * cols..(i + 1) * cols]);
                            let want: f64 = w
                                .iter()
                                .zip(x)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum();
                            let size: f64 =
                                w.iter().zip(x).map(|(a, b)| f64::from((a * b).abs())).sum();
                            let d = (f64::from(got[i * rows + r]) - want).abs();
                            assert!(
                                d <= 1e-6 * size,
                                "{dtype:?}, {kernel:?}, n = {n}, x {i}, row {r}: {} against {want} (size {size})",
                                got[i * rows + r]
                            );
                        }
                    }
                }
            }
        }
    }

    /// Not a test: times the decoding loops of the blocks of 32 on one thread, four rows at a
    /// time against one at a time, in ns per block of each row
    /// (`cargo test --release -p salience-engine block_dot_timings -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn block_dot_timings() {
        if !super::super::Kernel::available().contains(&super::super::Kernel::Avx2) {
            return;
        }
        use GgmlDType::*;
        // A 1B model's gate matrix (in L3), a few rows (in L2), and from memory.
        for (rows, cols, dtype) in [
            (8192, 2048, Q4_0),
            (256, 2048, Q4_0),
            (32768, 2048, Q4_0),
            (8192, 2048, Q4_1),
        ] {
            let (bytes, _) = quantized(rows, cols, dtype, 1);
            let x = random(cols, 2);
            let rounded = RoundedRows::new(&x, cols, BLOCK).with_words();
            let sums: Vec<f32> = x.chunks(BLOCK).map(|b| b.iter().sum()).collect();
            let mut dots = vec![0f32; rows];
            let mut line = format!("{dtype:?}, {rows} × {cols}:");
            for _ in 0..3 {
                for one_at_a_time in [true, false] {
                    let mut best = f64::MAX;
                    for _ in 0..(80_000 / rows).max(3) {
                        let t = std::time::Instant::now();
                        // SAFETY: the CPU has AVX2 (checked above); `bytes` holds the rows.
                        unsafe {
                            avx2::block_dots_for_timing(
                                &bytes,
                                dtype,
                                rows,
                                cols,
                                (&rounded, &sums),
                                &mut dots,
                                one_at_a_time,
                            )
                        };
                        best = best.min(t.elapsed().as_secs_f64());
                    }
                    let ns = best * 1e9 / (rows * cols / BLOCK) as f64;
                    let name = if one_at_a_time { "rows" } else { "groups" };
                    line += &format!(" {name} {ns:.2}");
                }
            }
            eprintln!("{line}");
        }
    }

    #[test]
    fn integer_dots_stay_within_the_rounding_bound() {
        // Off the grid, each value moves by at most half a step: a dot moves by at most
        // Σ |w_j| · s / 2 plus what the offsets' split adds (below |w| + |offset| ≤ 2·max |w|
        // per run for these formats' values).
        let rows = 7;
        for kernel in integer_kernels() {
            for (t, (dtype, group, cols)) in TYPES.into_iter().enumerate() {
                let (bytes, w) = quantized(rows, cols, dtype, 30 + t as u64);
                let x = random(cols, 40);
                let got = rounded_product(&bytes, dtype, rows, cols, &x, kernel);
                let rounded = RoundedRows::new(&x, cols, group);
                for r in 0..rows {
                    let w = &w[r * cols..(r + 1) * cols];
                    let want: f64 = w
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    // Per block of 32 (a Q4_1 or Q5_1 offset is its block's minimum).
                    let bound: f64 = w
                        .chunks(BLOCK)
                        .enumerate()
                        .map(|(block, w)| {
                            let largest = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                            let step = rounded.scales[block * BLOCK / group];
                            f64::from(2.0 * largest * 0.5 * step) * BLOCK as f64
                        })
                        .sum();
                    let d = (f64::from(got[r]) - want).abs();
                    assert!(
                        d <= bound + 1e-6 * want.abs(),
                        "{dtype:?}, {kernel:?}, row {r}: {d} > {bound}"
                    );
                }
            }
        }
    }

    #[test]
    fn integer_dots_carry_nan() {
        let (rows, cols) = (2, SUPER);
        let mut x = random(cols, 50);
        x[3] = f32::NAN;
        for kernel in integer_kernels() {
            for (dtype, _, _) in TYPES {
                let (bytes, _) = quantized(rows, cols, dtype, 60);
                let got = rounded_product(&bytes, dtype, rows, cols, &x, kernel);
                assert!(
                    got.iter().all(|v| v.is_nan()),
                    "{dtype:?}, {kernel:?}: {got:?}"
                );
            }
        }
    }
}
