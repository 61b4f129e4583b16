//! Generation's prefill on the blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the K types
//! where the 256-bit integer paths are taken (`takes_256_bit_paths`: AVX2 is the widest
//! kernel, or 512-bit multiply-adds run no faster): x Wᵀ for many rows, the activations
//! rounded as decoding's integer dots round them (15 bits per block of 32), multiplied with
//! 16-bit multiply-adds (`vpmaddwd`: 16 per instruction, where an f32 FMA does 8) in a
//! register tile of 6 rows × 16 columns, each block of 32 converted and scaled in f32 (the
//! weights' d per column, the activations' scale per row). Where the CPU has AVX-512 VNNI,
//! each multiply-add and its sum are one `vpdpwssd` (`WordSums`). The offsets m·Σx of the Q4
//! and Q5 formats are taken in f32 against the f32 block sums, as the decoding dots take
//! them.
//!
//! The K types go through the same tile: a Q4_K or Q5_K sub-block of 32 is d·sc·q − dmin·m,
//! a block of 32 with scale d·sc and offset −dmin·m; a Q6_K block of 32 is two runs of 16 with
//! scales d·sc₁ and d·sc₂, packed as the integers sc·(q − 32) (at most 128 · 32 = 4096, so a
//! block's Σ w·v stays below 32 · 4096 · 16256 < 2³¹) with scale d, and a Q3_K one likewise
//! as (sc − 32)·(q − 4) (at most 128). A Q2_K block is two runs d·sc·q − dmin·m: the integers
//! sc·q with scale d, and two offsets, one against the block's Σ x and one against the
//! difference of its halves' sums (`PanelBuffers`). Gemma 3's o (Q4_K) and
//! down (Q6_K) matrices are a third of its prefill's multiply-adds.
//!
//! Why: a 100-token prefill is products (91 % of Gemma 3's layers' time), and the f32 tile
//! runs at the FMA limit. One thread over one strip of a prefill's packed operands
//! (`docs/bench/integer_tile_probe.rs`): 130–136 GFLOP/s against the f32 tile's 96–99. Only
//! generation rounds; salience keeps f32 (see the module above).

use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use super::super::super::matmul::avx2::transpose_8x8;
use super::super::super::matmul::{SharedOut, MR, NR};
use super::super::avx2::{block_bytes, block_scales, q4k_fields, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::super::f16_values;
use super::avx2::{self as k, block_integers, f16_at, is_signed, run_integers, scale_bytes};
use super::{round_group, BLOCK};

/// How the tile adds pairs of 16-bit products into its 32-bit sums: `vpmaddwd` then
/// `vpaddd`, or one `vpdpwssd` where the CPU has AVX-512 VNNI (and VL, for 256-bit
/// registers). The same bits either way: both wrap alike, and no sum here comes near 2³¹
/// (`panel_times`). On an AMD Zen 4 the prefill of 100 tokens of a Llama 1B shape took
/// 0.84–0.87 → 0.75–0.76 s (Q4_K) and 0.86–0.99 → 0.76–0.79 s (Q2_K). Decoding's loops keep
/// the separate instructions: fused, the Q4_0/Q4_1 four-row loop and the K types' 512-bit
/// loop decoded no faster there (Q4_0 27.5 / 25.6 against 26.2 / 28.3 tokens/s, Q4_K
/// 37.3 / 36.2 against 36.3 / 33.6, Q2_K 40.5 / 42.6 against 43.0 / 42.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WordSums {
    Separate,
    Fused,
}

impl WordSums {
    /// Fused where the CPU has it (the standard library caches the detection).
    fn best() -> WordSums {
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            WordSums::Fused
        } else {
            WordSums::Separate
        }
    }

    /// Every way this CPU runs (the tests compare them).
    #[cfg(test)]
    fn available() -> Vec<WordSums> {
        let mut ways = vec![WordSums::Separate];
        if WordSums::best() == WordSums::Fused {
            ways.push(WordSums::Fused);
        }
        ways
    }
}

/// Pairs of 16-bit values along the depth per block of 32.
const PAIRS: usize = BLOCK / 2;

/// The activation rows packed for the tile: panel `ip` holds rows `ip * MR..`, for every pair
/// of depth steps p the MR rows' (v[2p], v[2p + 1]) as one 32-bit lane each; per block, the
/// rows' scales, f32 sums and the differences of the sums of its two halves of 16 (for the
/// offsets of Q2_K's runs; zero where no part is Q2_K). Rows past the last are zero.
struct PackedActivations {
    pairs: Vec<i32>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    half_differences: Vec<f32>,
    blocks: usize,
}

impl PackedActivations {
    /// Rounds the rows of x (`cols` values each) as `RoundedRows::new` does (`round_group`,
    /// per block of 32) straight into the tile's layout, one row panel per task; the halves'
    /// differences only `for_runs` (a Q2_K part).
    fn new(x: &[f32], cols: usize, for_runs: bool) -> PackedActivations {
        let m = x.len() / cols;
        let blocks = cols / BLOCK;
        let panels = m.div_ceil(MR);
        let mut pairs = vec![0i32; panels * cols / 2 * MR];
        let mut scales = vec![0f32; panels * blocks * MR];
        let mut sums = vec![0f32; panels * blocks * MR];
        let mut half_differences = vec![0f32; panels * blocks * MR];
        pairs
            .par_chunks_mut(cols / 2 * MR)
            .zip(scales.par_chunks_mut(blocks * MR))
            .zip(sums.par_chunks_mut(blocks * MR))
            .zip(half_differences.par_chunks_mut(blocks * MR))
            .enumerate()
            .for_each(|(ip, (((panel, scales), sums), differences))| {
                let mut v = [0f32; BLOCK];
                for r in 0..MR.min(m - ip * MR) {
                    let row = &x[(ip * MR + r) * cols..(ip * MR + r + 1) * cols];
                    for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                        scales[b * MR + r] = round_group(block, &mut v);
                        sums[b * MR + r] = block.iter().sum();
                        if for_runs {
                            let (first, second) = block.split_at(BLOCK / 2);
                            differences[b * MR + r] =
                                first.iter().sum::<f32>() - second.iter().sum::<f32>();
                        }
                        for q in 0..PAIRS {
                            let (low, high) = (v[2 * q] as i32, v[2 * q + 1] as i32);
                            panel[(b * PAIRS + q) * MR + r] = (low & 0xFFFF) | (high << 16);
                        }
                    }
                }
            });
        PackedActivations {
            pairs,
            scales,
            sums,
            half_differences,
            blocks,
        }
    }
}

/// A task's packed panel of weights: 16-bit pairs (cols · NR), and per block and column the
/// scale d, the offset m (0 for the signed formats) and, where the block's two runs of 16
/// have offsets m₁ and m₂ of their own (Q2_K), m = (m₁ + m₂) / 2 and `m_split` = (m₁ − m₂) / 2:
/// m₁·Σ₁ + m₂·Σ₂ = m·(Σ₁ + Σ₂) + m_split·(Σ₁ − Σ₂).
///
/// Packing writes each column's pairs in order into `by_column` (cols per column), and
/// `interleave` moves them into `pairs`: written in place, a column's pairs were one store
/// each, NR pairs apart, most of a K-type panel's packing.
struct PanelBuffers {
    pairs: Vec<i16>,
    by_column: Vec<i16>,
    d: Vec<f32>,
    m: Vec<f32>,
    m_split: Vec<f32>,
}

/// Which offsets a packed panel's blocks have.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Offsets {
    /// The signed formats: none.
    None,
    /// One per block of 32, against the block's Σ x.
    PerBlock,
    /// One per run of 16 (Q2_K), as `PanelBuffers` splits them.
    PerRun,
}

/// One stored matrix: its blocks, type and rows (output columns of the product).
pub struct Part<'a> {
    pub bytes: &'a [u8],
    pub dtype: GgmlDType,
    pub rows: usize,
}

/// Whether `product` takes `dtype`.
pub fn takes(dtype: GgmlDType) -> bool {
    use GgmlDType::*;
    matches!(
        dtype,
        Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
    )
}

/// Values per K-type super-block.
const SUPER: usize = 256;

/// Whether this CPU runs `product`.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// x Wᵀ for the rows of x (`cols` values each), rounded per block of 32, and W the parts
/// stacked by rows: (rows of x × Σ part rows), row-major.
///
/// Panics unless the CPU runs it (`available`), every part's type is one that `takes`, and
/// its bytes hold its rows of `cols / 32` blocks.
pub fn product(parts: &[Part], x: &[f32], cols: usize) -> Vec<f32> {
    product_with(parts, x, cols, WordSums::best())
}

/// `product` with the tile's sums taken as `sums` says.
fn product_with(parts: &[Part], x: &[f32], cols: usize, sums: WordSums) -> Vec<f32> {
    assert!(
        available(),
        "the integer prefill product needs AVX2, FMA and F16C"
    );
    assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols));
    let n = x.len() / cols;
    let total: usize = parts.iter().map(|p| p.rows).sum();
    let for_runs = parts.iter().any(|p| p.dtype == GgmlDType::Q2K);
    let a = PackedActivations::new(x, cols, for_runs);
    // Tasks: each part's panels of NR output columns, a few panels per task.
    let mut tasks = Vec::new();
    let mut start = 0;
    for (pi, part) in parts.iter().enumerate() {
        assert!(
            takes(part.dtype),
            "no integer prefill product for {:?}",
            part.dtype
        );
        let block = part.dtype.block_size();
        assert!(
            cols.is_multiple_of(block),
            "rows of {:?} are whole blocks",
            part.dtype
        );
        assert!(part.bytes.len() >= part.rows * cols / block * part.dtype.type_size());
        for j0 in (0..part.rows).step_by(NR) {
            tasks.push((pi, start, j0));
        }
        start += part.rows;
    }
    let mut out = vec![0f32; n * total];
    let shared = SharedOut::of(&mut out);
    let blocks = cols / BLOCK;
    tasks.into_par_iter().for_each_init(
        || PanelBuffers {
            pairs: vec![0i16; cols * NR],
            by_column: vec![0i16; cols * NR],
            d: vec![0f32; blocks * NR],
            m: vec![0f32; blocks * NR],
            m_split: vec![0f32; blocks * NR],
        },
        |buffers, (pi, first_column, j0)| {
            let part = &parts[pi];
            let width = NR.min(part.rows - j0);
            let columns = (j0, width);
            // SAFETY (packing and product): the caller's conditions; the panel's columns and
            // every row of the output's columns first_column + j0.. belong to this task alone.
            let offsets = unsafe {
                match part.dtype {
                    GgmlDType::Q4_0 => pack_block_panel::<Q4_0>(part, columns, buffers),
                    GgmlDType::Q4_1 => pack_block_panel::<Q4_1>(part, columns, buffers),
                    GgmlDType::Q5_0 => pack_block_panel::<Q5_0>(part, columns, buffers),
                    GgmlDType::Q5_1 => pack_block_panel::<Q5_1>(part, columns, buffers),
                    GgmlDType::Q8_0 => pack_block_panel::<Q8_0>(part, columns, buffers),
                    GgmlDType::Q2K => pack_k_panel::<{ k::Q2K }>(part, columns, buffers),
                    GgmlDType::Q3K => pack_k_panel::<{ k::Q3K }>(part, columns, buffers),
                    GgmlDType::Q4K => pack_k_panel::<{ k::Q4K }>(part, columns, buffers),
                    GgmlDType::Q5K => pack_k_panel::<{ k::Q5K }>(part, columns, buffers),
                    _ => pack_k_panel::<{ k::Q6K }>(part, columns, buffers),
                }
            };
            let out = (shared, n, total, first_column + j0, width);
            unsafe {
                buffers.interleave();
                match sums {
                    WordSums::Separate => panel_times_packed_rows(&a, buffers, offsets, out),
                    WordSums::Fused => panel_times_packed_rows_vnni(&a, buffers, offsets, out),
                }
            };
        },
    );
    out
}

impl PanelBuffers {
    /// Writes block `b` of column `c`: its integers as pairs, its scale and offsets (m,
    /// m_split).
    #[inline(always)]
    fn put(
        &mut self,
        (b, c): (usize, usize),
        wide: &[i16; BLOCK],
        scale: f32,
        (offset, split): (f32, f32),
    ) {
        self.d[b * NR + c] = scale;
        self.m[b * NR + c] = offset;
        self.m_split[b * NR + c] = split;
        let depth = self.by_column.len() / NR;
        self.by_column[c * depth + b * BLOCK..][..BLOCK].copy_from_slice(wide);
    }

    /// Moves the columns' pairs from `by_column` into the tile's layout, pair p of column c
    /// at p·NR + c (32-bit lanes): 8 × 8 transposes of the pairs as 32-bit lanes.
    ///
    /// # Safety
    /// AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn interleave(&mut self) {
        let depth_pairs = self.by_column.len() / NR / 2;
        assert!(self.pairs.len() == self.by_column.len() && depth_pairs.is_multiple_of(8));
        let column = |c: usize| {
            // SAFETY: column c's pairs start inside `by_column` (c < NR).
            unsafe { (self.by_column.as_ptr() as *const f32).add(c * depth_pairs) }
        };
        let columns: [[*const f32; 8]; NR / 8] =
            std::array::from_fn(|g| std::array::from_fn(|k| column(8 * g + k)));
        let pairs = self.pairs.as_mut_ptr() as *mut f32;
        for p in (0..depth_pairs).step_by(8) {
            for (g, group) in columns.iter().enumerate() {
                // SAFETY: pairs p..p + 8 of each column, and rows p..p + 8 of the tile's
                // layout (NR lanes each) lie inside the buffers (lengths checked above). The
                // pairs move as bit patterns: shuffles only, no arithmetic on them.
                unsafe { transpose_8x8(group, p, pairs.add(p * NR + 8 * g)) };
            }
        }
    }

    /// Missing columns of a partial panel multiply as zeros; whole panels overwrite every
    /// value.
    fn clear_partial(&mut self, width: usize) {
        if width < NR {
            self.by_column.fill(0);
            self.d.fill(0.0);
            self.m.fill(0.0);
            self.m_split.fill(0.0);
        }
    }
}

/// Packs weight rows j0..j0 + width of a `part` of blocks of 32 as 16 columns of 16-bit
/// integer pairs (missing columns zero). Returns which offsets the blocks have.
///
/// # Safety
/// AVX2, FMA and F16C; `buffers` are sized for the part's depth, whose bytes hold its rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_block_panel<const FORMAT: u8>(
    part: &Part,
    (j0, width): (usize, usize),
    buffers: &mut PanelBuffers,
) -> Offsets {
    let blocks = buffers.d.len() / NR;
    let size = block_bytes(FORMAT);
    let f16_values = f16_values();
    buffers.clear_partial(width);
    for c in 0..width {
        let row = &part.bytes[(j0 + c) * blocks * size..(j0 + c + 1) * blocks * size];
        for b in 0..blocks {
            // SAFETY: block b lies inside the row.
            let at = unsafe { row.as_ptr().add(b * size) };
            let (scale, offset) = unsafe { block_scales::<FORMAT>(at, f16_values) };
            let w = unsafe { block_integers::<FORMAT>(at) };
            let mut wide = [0i16; BLOCK];
            // SAFETY: `wide` holds 32 values.
            unsafe {
                let low = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
                let high = _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(w));
                _mm256_storeu_si256(wide.as_mut_ptr() as *mut __m256i, low);
                _mm256_storeu_si256(wide.as_mut_ptr().add(16) as *mut __m256i, high);
            }
            buffers.put((b, c), &wide, scale, (offset, 0.0));
        }
    }
    if is_signed(FORMAT) {
        Offsets::None
    } else {
        Offsets::PerBlock
    }
}

/// Packs weight rows j0..j0 + width of a `part` of K-type `FORMAT` as
/// `pack_block_panel` packs the blocks of 32: per block of 32 its integers, scale and offset.
/// Returns which offsets the blocks have (Q4_K's and Q5_K's mins per block, Q2_K's per run).
///
/// # Safety
/// AVX2, FMA and F16C (the loops are compiled for them); `buffers` are sized for the part's
/// depth, whose bytes hold its rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack_k_panel<const FORMAT: u8>(
    part: &Part,
    (j0, width): (usize, usize),
    buffers: &mut PanelBuffers,
) -> Offsets {
    let f16_values = f16_values();
    let size = k::super_bytes(FORMAT);
    let supers = buffers.d.len() / NR / (SUPER / BLOCK);
    buffers.clear_partial(width);
    let mut offsets = [(0f32, 0f32); SUPER / BLOCK];
    for c in 0..width {
        let row = &part.bytes[(j0 + c) * supers * size..(j0 + c + 1) * supers * size];
        for (sb, bytes) in row.chunks_exact(size).enumerate() {
            let at = bytes.as_ptr();
            // SAFETY (both blocks): `bytes` is a whole super-block of `FORMAT`.
            let mut run_scales = _mm_setzero_si128();
            let scales = if matches!(FORMAT, k::Q4K | k::Q5K) {
                let (sc, mins) = unsafe { q4k_fields(at) };
                let (d, dmin) = unsafe { (f16_at(at, f16_values), f16_at(at.add(2), f16_values)) };
                std::array::from_fn(|j| {
                    offsets[j] = (-dmin * ((mins >> (8 * j)) & 0xFF) as f32, 0.0);
                    d * ((sc >> (8 * j)) & 0xFF) as f32
                })
            } else {
                // The runs' scales go into the integers; d is every block's scale.
                let (sc, mins, d, offset_factor) = unsafe { scale_bytes::<FORMAT>(at, f16_values) };
                run_scales = sc;
                if FORMAT == k::Q2K {
                    // SAFETY: 16 bytes either way.
                    let mins: [u8; 16] = unsafe { std::mem::transmute(mins) };
                    for (j, offset) in offsets.iter_mut().enumerate() {
                        let (m1, m2) = (mins[2 * j] as f32, mins[2 * j + 1] as f32);
                        *offset = (
                            offset_factor * (m1 + m2) / 2.0,
                            offset_factor * (m1 - m2) / 2.0,
                        );
                    }
                }
                [d; SUPER / BLOCK]
            };
            let ints = unsafe { run_integers::<FORMAT>(at, run_scales) };
            for (j, wide) in ints.iter().enumerate() {
                let b = sb * (SUPER / BLOCK) + j;
                buffers.put((b, c), wide, scales[j], offsets[j]);
            }
        }
    }
    match FORMAT {
        k::Q3K | k::Q6K => Offsets::None,
        k::Q2K => Offsets::PerRun,
        _ => Offsets::PerBlock,
    }
}

/// Multiplies every activation panel by the packed weight panel in `buffers` into the
/// output's columns `column..column + width`, adding the `offsets` (`PanelBuffers`).
///
/// # Safety
/// As for `product`; `buffers` hold a packed panel for `a`'s depth.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_times_packed_rows(
    a: &PackedActivations,
    buffers: &PanelBuffers,
    offsets: Offsets,
    out: (SharedOut, usize, usize, usize, usize),
) {
    // SAFETY: the caller's.
    unsafe { panel_times_with::<false>(a, buffers, offsets, out) }
}

/// `panel_times_packed_rows` with each multiply-add of the tile one `vpdpwssd`.
///
/// # Safety
/// As for `panel_times_packed_rows`, and the CPU has AVX-512 VNNI and VL.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn panel_times_packed_rows_vnni(
    a: &PackedActivations,
    buffers: &PanelBuffers,
    offsets: Offsets,
    out: (SharedOut, usize, usize, usize, usize),
) {
    // SAFETY: the caller's.
    unsafe { panel_times_with::<true>(a, buffers, offsets, out) }
}

/// The body of both, inlined into each so that it runs with their CPU features, chosen by the
/// kind of offsets: one copy of the tile per kind, whose per-block epilogue has no branches
/// (with AVX-512 VL it then also keeps the f32 sums in registers, where the run-time kind left
/// them on the stack: a Llama 1B shape's prefill 10–15 % faster on a Zen 4).
///
/// # Safety
/// As for `panel_times_packed_rows`, and AVX-512 VNNI and VL where `FUSED`.
#[inline(always)]
unsafe fn panel_times_with<const FUSED: bool>(
    a: &PackedActivations,
    buffers: &PanelBuffers,
    offsets: Offsets,
    out: (SharedOut, usize, usize, usize, usize),
) {
    // SAFETY (each): the caller's.
    unsafe {
        match offsets {
            Offsets::None => panel_times::<FUSED, { Offsets::None as u8 }>(a, buffers, out),
            Offsets::PerBlock => panel_times::<FUSED, { Offsets::PerBlock as u8 }>(a, buffers, out),
            Offsets::PerRun => panel_times::<FUSED, { Offsets::PerRun as u8 }>(a, buffers, out),
        }
    }
}

/// One kind of offsets' tile (`Offsets as u8`).
///
/// # Safety
/// As for `panel_times_packed_rows`, and AVX-512 VNNI and VL where `FUSED`.
#[inline(always)]
unsafe fn panel_times<const FUSED: bool, const OFFSETS: u8>(
    a: &PackedActivations,
    buffers: &PanelBuffers,
    (out, n, ldc, column, width): (SharedOut, usize, usize, usize, usize),
) {
    let blocks = a.blocks;
    let PanelBuffers {
        pairs: b_panel,
        d,
        m,
        m_split,
        ..
    } = buffers;
    let pair_len = a.pairs.len() / n.div_ceil(MR);
    for ip in 0..n.div_ceil(MR) {
        let rows = MR.min(n - ip * MR);
        let panel = &a.pairs[ip * pair_len..(ip + 1) * pair_len];
        let scales = &a.scales[ip * blocks * MR..(ip + 1) * blocks * MR];
        let sums = &a.sums[ip * blocks * MR..(ip + 1) * blocks * MR];
        let differences = &a.half_differences[ip * blocks * MR..(ip + 1) * blocks * MR];
        let mut tile = [[_mm256_setzero_ps(); 2]; MR];
        for b in 0..blocks {
            let mut acc = [[_mm256_setzero_si256(); 2]; MR];
            for p in b * PAIRS..(b + 1) * PAIRS {
                // SAFETY: pair p of the panels lies inside them (checked lengths above).
                unsafe {
                    let w = b_panel.as_ptr().add(p * NR * 2);
                    let w0 = _mm256_loadu_si256(w as *const __m256i);
                    let w1 = _mm256_loadu_si256(w.add(NR) as *const __m256i);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let v = _mm256_set1_epi32(*panel.get_unchecked(p * MR + r));
                        if FUSED {
                            acc[0] = _mm256_dpwssd_epi32(acc[0], v, w0);
                            acc[1] = _mm256_dpwssd_epi32(acc[1], v, w1);
                        } else {
                            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(v, w0));
                            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(v, w1));
                        }
                    }
                }
            }
            // A block's Σ w·v is at most 32 · 127 · 16256 < 2³¹: exact in 32 bits.
            let dv = [_mm256_loadu_ps(&d[b * NR]), _mm256_loadu_ps(&d[b * NR + 8])];
            let mv = [_mm256_loadu_ps(&m[b * NR]), _mm256_loadu_ps(&m[b * NR + 8])];
            let splits = [
                _mm256_loadu_ps(&m_split[b * NR]),
                _mm256_loadu_ps(&m_split[b * NR + 8]),
            ];
            for (r, (acc, tile)) in acc.iter().zip(tile.iter_mut()).enumerate() {
                let s = _mm256_set1_ps(scales[b * MR + r]);
                let sum = _mm256_set1_ps(sums[b * MR + r]);
                let difference = _mm256_set1_ps(differences[b * MR + r]);
                for h in 0..2 {
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[h]), dv[h]);
                    tile[h] = _mm256_fmadd_ps(v, s, tile[h]);
                    if OFFSETS != Offsets::None as u8 {
                        tile[h] = _mm256_fmadd_ps(mv[h], sum, tile[h]);
                    }
                    if OFFSETS == Offsets::PerRun as u8 {
                        tile[h] = _mm256_fmadd_ps(splits[h], difference, tile[h]);
                    }
                }
            }
        }
        for (r, tile) in tile.iter().enumerate().take(rows) {
            let mut values = [0f32; NR];
            _mm256_storeu_ps(values.as_mut_ptr(), tile[0]);
            _mm256_storeu_ps(values.as_mut_ptr().add(8), tile[1]);
            // SAFETY: row ip·MR + r < n and columns column..column + width < ldc belong to
            // this task alone.
            unsafe { out.write((ip * MR + r) * ldc + column, &values[..width]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{on_grid, quantized};
    use super::*;

    const TYPES: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];

    /// f64 x Wᵀ of the dequantized parts stacked by rows, and Σ |w·x| per output.
    fn plain(parts: &[(Vec<f32>, usize)], x: &[f32], cols: usize) -> (Vec<f64>, Vec<f64>) {
        let n = x.len() / cols;
        let (mut want, mut size) = (Vec::new(), Vec::new());
        for i in 0..n {
            let x = &x[i * cols..(i + 1) * cols];
            for (w, rows) in parts {
                for r in 0..*rows {
                    let w = &w[r * cols..(r + 1) * cols];
                    want.push(
                        w.iter()
                            .zip(x)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum(),
                    );
                    size.push(w.iter().zip(x).map(|(a, b)| f64::from((a * b).abs())).sum());
                }
            }
        }
        (want, size)
    }

    #[test]
    fn products_on_the_grid_match_f64_products() {
        // Activations the rounding keeps as they are: only the f32 sums of the blocks'
        // partials differ from f64. Row counts around the tile's 6, part rows around its 16,
        // and two parts of different types stacked.
        if !available() {
            eprintln!("no AVX2 + FMA + F16C: the integer prefill product is not used here");
            return;
        }
        // Three K super-blocks: every type's rows are whole blocks.
        let cols = 3 * SUPER;
        for (t, dtype) in TYPES.into_iter().enumerate() {
            let other = TYPES[(t + 3) % TYPES.len()];
            let (bytes_a, w_a) = quantized(21, cols, dtype, 30 + t as u64);
            let (bytes_b, w_b) = quantized(16, cols, other, 40 + t as u64);
            let parts = [
                Part {
                    bytes: &bytes_a,
                    dtype,
                    rows: 21,
                },
                Part {
                    bytes: &bytes_b,
                    dtype: other,
                    rows: 16,
                },
            ];
            for n in [5, 6, 7, 13] {
                let x = on_grid(n * cols, 50 + n as u64, BLOCK);
                let (want, size) = plain(&[(w_a.clone(), 21), (w_b.clone(), 16)], &x, cols);
                for sums in WordSums::available() {
                    let got = product_with(&parts, &x, cols, sums);
                    assert_eq!(got.len(), want.len());
                    for (o, ((g, w), s)) in got.iter().zip(&want).zip(&size).enumerate() {
                        assert!(
                            (f64::from(*g) - w).abs() <= 1e-6 * s,
                            "{dtype:?} + {other:?}, {sums:?}, n = {n}, output {o}: {g} against \
                             {w} (size {s})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn products_stay_within_the_rounding_bound_and_carry_nan() {
        // Off the grid each activation moves by at most half a step, 2⁻¹⁵ of its block's
        // largest |x|: the product moves by at most Σ_blocks max|x|·2⁻¹⁵·Σ|w|.
        if !available() {
            return;
        }
        let cols = SUPER;
        let n = 9;
        for (t, dtype) in TYPES.into_iter().enumerate() {
            let (bytes, w) = quantized(18, cols, dtype, 60 + t as u64);
            let mut x = crate::model::matmul::tests::random(n * cols, 70 + t as u64);
            x[3 * cols + 5] = f32::NAN;
            let parts = [Part {
                bytes: &bytes,
                dtype,
                rows: 18,
            }];
            let got = product(&parts, &x, cols);
            // The fused multiply-adds give the same bits as the separate ones.
            for sums in WordSums::available() {
                let again = product_with(&parts, &x, cols, sums);
                let same = got
                    .iter()
                    .zip(&again)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?}: {sums:?} gave other bits");
            }
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                for r in 0..18 {
                    let g = got[i * 18 + r];
                    if i == 3 {
                        assert!(g.is_nan(), "{dtype:?}: a NaN activation gave {g}");
                        continue;
                    }
                    let wr = &w[r * cols..(r + 1) * cols];
                    let want: f64 = wr
                        .iter()
                        .zip(xi)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum();
                    let bound: f64 = wr
                        .chunks(BLOCK)
                        .zip(xi.chunks(BLOCK))
                        .map(|(wb, xb)| {
                            let largest = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                            let w_sum: f32 = wb.iter().map(|v| v.abs()).sum();
                            f64::from(largest) / 16256.0 * 0.5 * f64::from(w_sum)
                        })
                        .sum();
                    assert!(
                        (f64::from(g) - want).abs() <= bound * 1.01 + 1e-5,
                        "{dtype:?}, x {i}, row {r}: {g} against {want} (bound {bound})"
                    );
                }
            }
        }
    }
}
