//! Products of a few activation rows with a quantized matrix, for decoding.
//!
//! Generating a token multiplies every weight matrix by one activation row, so the work is
//! reading the weights once. The panel product of `matmul.rs` (right for prefill and the
//! backward pass, where each dequantized panel serves hundreds of rows) would spend most of a
//! decoding step writing and re-reading f32 values (its tiled predecessor measured 47 % of
//! decoding time in candle's `to_float`). Here each block is expanded in registers and used at
//! once.
//!
//! Exactness: these kernels take the activations as f32 (llama.cpp quantizes them to 8 bits
//! for its integer dot products, which changed the greedy continuation of the PyTorch
//! reference case); generation's steps may take `integer`'s dots instead, against activations
//! rounded to 15 bits (`Activations`). A block's
//! sum Σ (d·q_j + m)·x_j is computed as d·Σ q_j·x_j + m·Σ x_j, with Σ x_j computed once per
//! block of x: the same sum up to f32 rounding, and two operations fewer per eight weights.
//! Q4_0's Σ d·(q_j − 8)·x_j is taken the same way, with m = −8d.
//!
//! On CPUs with 512-bit vectors only two ports run vector operations, so a block's cost is
//! its count of them: the scales are read through a table of f16 values by scalar loads, the
//! nibble bytes are widened once for both halves, and four weight rows share each block of x
//! and one horizontal sum. Measured on a Xeon (Emerald Rapids), one thread, a 1536 × 576 Q4_1
//! matrix in cache: 2.96–3.22 → 1.85–2.50 ns per block (AVX2 kernel: 3.32–4.42 → 2.19–3.43).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

mod integer;
pub use integer::has_integer_dots;
#[cfg(target_arch = "x86_64")]
pub(super) use integer::prefill;
#[cfg(test)]
pub(super) use integer::rounding_group;
#[cfg(target_arch = "x86_64")]
pub(super) use integer::takes_256_bit_paths;
use integer::RoundedRows;

/// Up to this many activation rows go through these kernels; more share tiles better.
pub const MAX_INPUT_ROWS: usize = 4;

/// Elements per block of the types with a register kernel.
const BLOCK: usize = 32;

/// Weight rows that the register kernels take at once for one input row (decoding): each
/// block of x is loaded once for them, and their four sums are reduced together, where one
/// row's horizontal sum and call took a quarter of its time (18-block rows).
#[cfg(target_arch = "x86_64")]
const ROW_GROUP: usize = 4;

/// One input row's dots with the weight rows from `r`, one dot per row: whole groups of
/// `ROW_GROUP` rows go to `group(first row, dots)`, the rows left over to `one(row, dot)`.
#[cfg(target_arch = "x86_64")]
fn in_row_groups(
    r: usize,
    dots: &mut [f32],
    mut group: impl FnMut(usize, &mut [f32]),
    mut one: impl FnMut(usize, &mut [f32]),
) {
    let whole = dots.len() / ROW_GROUP * ROW_GROUP;
    let (groups, rest) = dots.split_at_mut(whole);
    for (g, dots) in groups.chunks_exact_mut(ROW_GROUP).enumerate() {
        group(r + g * ROW_GROUP, dots);
    }
    for (k, dot) in rest.chunks_mut(1).enumerate() {
        one(r + whole + k, dot);
    }
}

/// Which implementation runs: chosen from the CPU at run time, selectable for tests and, with
/// `PROMPT_SALIENCE_KERNEL=avx2|portable`, cappable by hand (to measure one against another).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 512-bit register tiles for the panel products, and 512-bit decoding dots and
    /// dequantization (x86-64 with AVX-512F besides AVX2, FMA and F16C): twice the
    /// multiply-adds per instruction, which CPUs with two 512-bit FMA units (Intel Xeon since
    /// Skylake-SP) run at twice the rate. The remaining helpers run their AVX2 versions.
    Avx512,
    /// Blocks expanded in AVX2 registers (x86-64 with AVX2, FMA and F16C).
    Avx2,
    /// Any CPU: each row dequantized into a buffer, then dotted.
    Portable,
}

impl Kernel {
    /// Detected once: products and tile dequantization ask for every row.
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = std::env::var("PROMPT_SALIENCE_KERNEL").ok();
            if let Some(other) = cap
                .as_deref()
                .filter(|c| !matches!(*c, "avx2" | "portable"))
            {
                tracing::warn!(
                    "PROMPT_SALIENCE_KERNEL={other} is neither avx2 nor portable: ignored"
                );
            }
            Kernel::available()
                .into_iter()
                .find(|k| match cap.as_deref() {
                    Some("portable") => *k == Kernel::Portable,
                    Some("avx2") => *k != Kernel::Avx512,
                    _ => true,
                })
                .unwrap_or(Kernel::Portable)
        })
    }

    /// Every kernel this CPU can run, fastest first (the tests run each).
    pub fn available() -> Vec<Kernel> {
        let mut out = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avx512f") {
                out.push(Kernel::Avx512);
            }
            out.push(Kernel::Avx2);
        }
        out.push(Kernel::Portable);
        out
    }

    /// The AVX2 kernels may run: the CPU has at least AVX2, FMA and F16C.
    pub fn has_avx2(self) -> bool {
        matches!(self, Kernel::Avx2 | Kernel::Avx512)
    }
}

/// Block types with a register kernel: Q4_0, Q4_1 and Q8_0 (the layouts of ggml's
/// `block_q4_0`, `block_q4_1`, `block_q8_0`).
pub fn has_register_kernel(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// Block types that the register kernels dequantize (the five blocks of 32 values).
fn has_register_dequantization(dtype: GgmlDType) -> bool {
    has_register_kernel(dtype) || matches!(dtype, GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// Block types that `dequantize_blocks` writes itself: those with a register kernel, and
/// those of `super::dequantize` (on every CPU).
pub fn has_fast_dequantization(dtype: GgmlDType) -> bool {
    has_register_kernel(dtype) || super::dequantize::has_fast_dequantization(dtype)
}

/// Storage types whose decoding dots run in registers for rows of `cols` values: those with
/// a register kernel, Q5_0 (Gemma 3's and other Q4_K_M files' q, k, gate and up matrices),
/// Q4_K and Q5_K (most matrices of a Q4_K_M or Q5_K_M file) and Q6_K (their down
/// projections), whose dequantization is `super::dequantize`'s; and f16 and bf16 (Hugging Face
/// checkpoints, f16 GGUF files) where rows are whole runs of 32 values.
pub fn has_register_dots(dtype: GgmlDType, cols: usize) -> bool {
    // Every block type with a fast dequantization has its dots too.
    has_fast_dequantization(dtype)
        || (matches!(dtype, GgmlDType::F16 | GgmlDType::BF16) && cols.is_multiple_of(BLOCK))
}

/// How the decoding dots of the types with integer dots (`integer`: the K types on CPUs with
/// AVX2, the blocks of 32 where AVX2 is the widest kernel) take the activations; every other
/// type and CPU takes them as f32. Only generation's steps ask for `best()`; every other pass
/// is `Exact`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// As f32 (`PROMPT_SALIENCE_EXACT_DECODING=1`).
    Exact,
    /// Rounded to 15 bits for integer multiply-adds (see `integer`).
    Rounded,
}

impl Activations {
    /// Rounded, unless `PROMPT_SALIENCE_EXACT_DECODING` is set to 1 (read once).
    pub fn best() -> Activations {
        static BEST: std::sync::OnceLock<Activations> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            Activations::from_setting(std::env::var("PROMPT_SALIENCE_EXACT_DECODING").ok())
        })
    }

    /// The choice for a value of `PROMPT_SALIENCE_EXACT_DECODING` (None: unset).
    fn from_setting(value: Option<String>) -> Activations {
        match value.as_deref() {
            Some("1") => Activations::Exact,
            Some("0") | None => Activations::Rounded,
            Some(other) => {
                tracing::warn!(
                    "PROMPT_SALIENCE_EXACT_DECODING={other} is neither 1 nor 0: ignored"
                );
                Activations::Rounded
            }
        }
    }
}

/// One stored matrix of a product: its bytes where a register kernel reads them, its number of
/// rows, and the plain path's dequantization of row r as f32 (the portable kernel and every
/// other storage).
pub struct Part<'a> {
    pub blocks: Option<(&'a [u8], GgmlDType)>,
    pub rows: usize,
    pub dequantize_row: &'a (dyn Fn(usize, &mut [f32]) + Sync),
}

/// x Wᵀ for the n = x.len() / cols input rows (n ≤ MAX_INPUT_ROWS) and W the parts stacked by
/// rows: out[i * R + o_p + r] = Σ_c W_p[r, c] · x[i * cols + c], where part p's rows start at
/// o_p and R is their total. Stacked matrices (q, k and v; gate and up) share one parallel
/// loop, so a decoding step waits for its threads once per input instead of once per matrix.
/// Parts with integer dots (`integer::rounding_group`) take the activations as `activations`
/// says (`Activations::best()` outside tests).
pub fn product(
    parts: &[Part],
    cols: usize,
    x: &[f32],
    kernel: Kernel,
    activations: Activations,
) -> Vec<f32> {
    let n = x.len() / cols;
    assert!(n <= MAX_INPUT_ROWS && n * cols == x.len());
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    // Where each part's rows start, and one past the last.
    let starts: Vec<usize> = std::iter::once(0)
        .chain(parts.iter().scan(0, |end, p| {
            *end += p.rows;
            Some(*end)
        }))
        .collect();
    // Output rows in chunks small enough to balance the threads, large enough to amortize.
    let chunk = (rows / (8 * rayon::current_num_threads().max(1))).clamp(8, 256);
    // Σ x_j over each block of each input row, for the m·Σ x_j term of Q4_1.
    let block_sums: Vec<f32> = x.chunks(BLOCK).map(|b| b.iter().sum()).collect();
    // How many values share a scale where a part's dots are integer ones.
    let rounding_group = |dtype: GgmlDType| match activations {
        Activations::Rounded => integer::rounding_group(dtype, kernel),
        Activations::Exact => None,
    };
    // Rounded once for each grouping that some part takes.
    let rounded_by = |group: usize| {
        parts
            .iter()
            .any(|p| p.blocks.and_then(|(_, dtype)| rounding_group(dtype)) == Some(group))
            .then(|| RoundedRows::new(x, cols, group))
    };
    let (per_super_block, mut per_block) = (rounded_by(integer::SUPER), rounded_by(BLOCK));
    // Decoding's four-row loop multiplies the rounded values as words.
    if n == 1
        && parts
            .iter()
            .any(|p| p.blocks.is_some_and(|(_, d)| integer::takes_row_groups(d)))
    {
        per_block = per_block.map(RoundedRows::with_words);
    }
    let mut by_row = vec![0f32; rows * n];
    // Each chunk is a job of its own: rayon's adaptive split otherwise ran runs of chunks (a
    // quarter of them, with two threads) as one job, and a thread that had finished its share
    // waited for the other's last run. A 1B Q2_K decoding step on Zen 3: one thread's yields
    // 2.3 % → 0.5 % of the samples, 30.4–31.3 → 31.0–31.8 tokens/s; SmolLM2 157–172 →
    // 149–179 tokens/s, median 166 → 174.
    // The row buffer is only for the kernels without register dots.
    by_row
        .par_chunks_mut(chunk * n)
        .enumerate()
        .with_max_len(1)
        .for_each_init(Vec::new, |buffer, (ci, out)| {
            let (first, last) = (ci * chunk, ci * chunk + out.len() / n);
            let mut p = starts.partition_point(|&s| s <= first) - 1;
            // The chunk's rows, part by part.
            let mut row = first;
            while row < last {
                while row >= starts[p + 1] {
                    p += 1;
                }
                let (part, r) = (&parts[p], row - starts[p]);
                let rows = (starts[p + 1] - row).min(last - row);
                let dots = &mut out[(row - first) * n..(row - first + rows) * n];
                match (kernel, part.blocks) {
                    #[cfg(target_arch = "x86_64")]
                    (kernel, Some((bytes, dtype))) if rounding_group(dtype).is_some() => {
                        let blocks_of_32 = rounding_group(dtype) == Some(BLOCK);
                        let x = if blocks_of_32 {
                            &per_block
                        } else {
                            &per_super_block
                        };
                        let x = x.as_ref().expect("rounded for this part");
                        // SAFETY (all three): `rounding_group` is Some only where the CPU has
                        // AVX2, FMA and F16C, and the 512-bit kernels are taken where it has
                        // AVX-512F and BW; the rows lie inside `bytes`.
                        if blocks_of_32 {
                            let x = (x, &block_sums[..]);
                            unsafe {
                                integer::avx2::block_row_dots(
                                    bytes,
                                    dtype,
                                    (r, rows),
                                    cols,
                                    x,
                                    dots,
                                )
                            }
                        } else if integer::takes_avx512(kernel) {
                            unsafe {
                                integer::avx512::row_dots(bytes, dtype, (r, rows), cols, x, dots)
                            }
                        } else {
                            unsafe {
                                integer::avx2::row_dots(bytes, dtype, (r, rows), cols, x, dots)
                            }
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    (kernel, Some((bytes, dtype)))
                        if kernel.has_avx2() && has_register_dots(dtype, cols) =>
                    {
                        let row_dots = if kernel == Kernel::Avx512 {
                            avx512::row_dots
                        } else {
                            avx2::row_dots
                        };
                        // SAFETY: a kernel is only chosen (or requested by tests) where the CPU
                        // has its features; the rows lie inside `bytes`.
                        unsafe { row_dots(bytes, dtype, (r, rows), cols, x, &block_sums, dots) }
                    }
                    _ => {
                        buffer.resize(cols, 0.0);
                        for (k, dots) in dots.chunks_mut(n).enumerate() {
                            (part.dequantize_row)(r + k, buffer);
                            dots_with(buffer, x, kernel, dots);
                        }
                    }
                }
                row += rows;
            }
        });
    if n == 1 {
        return by_row;
    }
    let mut out = vec![0f32; n * rows];
    for (r, dots) in by_row.chunks(n).enumerate() {
        for (i, d) in dots.iter().enumerate() {
            out[i * rows + r] = *d;
        }
    }
    out
}

/// a · b for f32 rows of equal length, on the fastest kernel here (eight or more partial
/// sums, so not the plain loop's order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(Kernel::best(), a, b)
}

/// `dot` on the given kernel.
pub fn dot_with(kernel: Kernel, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of rows of different lengths");
    let mut d = [0f32];
    dots_with(a, b, kernel, &mut d);
    d[0]
}

/// dots[i] = w · x_i for each input row x_i.
fn dots_with(w: &[f32], x: &[f32], kernel: Kernel, dots: &mut [f32]) {
    for (d, xi) in dots.iter_mut().zip(x.chunks(w.len())) {
        *d = match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `product`.
            Kernel::Avx2 | Kernel::Avx512 => unsafe { avx2::dot(w, xi) },
            _ => portable_dot(w, xi),
        };
    }
}

/// Eight partial sums: the compiler keeps them in vector registers on any x86-64.
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// The f32 value of every f16 bit pattern (256 KiB, built on first use; a model's scales
/// take few distinct values, so the entries read stay in the first-level cache).
#[cfg(target_arch = "x86_64")]
fn f16_values() -> &'static [f32; 1 << 16] {
    static VALUES: std::sync::OnceLock<Box<[f32; 1 << 16]>> = std::sync::OnceLock::new();
    VALUES.get_or_init(|| {
        let mut values = Box::new([0f32; 1 << 16]);
        for (bits, v) in values.iter_mut().enumerate() {
            *v = half::f16::from_bits(bits as u16).to_f32();
        }
        values
    })
}

/// How far ahead of the block being read the decoding kernels ask for weight bytes. Without
/// it, 43 % of decoding time sat on the first load of each block: the hardware prefetcher
/// does not run far enough ahead of a stream that is consumed this fast. Measured on SmolLM2
/// (Xeon, 2 threads): 56 tokens/s without, 101 / 115 / 124 / 126 with 512 / 1024 / 2048 /
/// 4096 bytes.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 2048;

/// Starts loading the cache line `PREFETCH_AHEAD` bytes after `at` (past the end of the
/// weights it is a harmless hint: a prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(at: *const u8) {
    // SAFETY: a prefetch of any address is allowed; the pointer is never dereferenced.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH_AHEAD) as *const i8) }
}

/// Writes the weights of whole blocks (`blocks`: the stored bytes of whole blocks of `dtype`)
/// into `dst` as f32, with the register kernel or `super::dequantize`; false where neither
/// covers the type (the caller then uses the plain path). The values are exactly the plain
/// path's: d·q, or d·q + m rounded twice as there.
pub fn dequantize_blocks(blocks: &[u8], dtype: GgmlDType, dst: &mut [f32]) -> bool {
    dequantize_blocks_strided(blocks, dtype, dst, HALF)
}

/// Values per run of `dequantize_blocks_strided`: half a block, one panel of the matrix kernel.
pub const HALF: usize = BLOCK / 2;

/// As `dequantize_blocks`, for `dst.len()` or more values written in runs of 16: value `i` goes
/// to `dst[(i / 16) * stride + i % 16]` (the panels of `matmul`; a stride of 16 is the plain
/// contiguous layout). The values written are `blocks.len() / block bytes * 32`.
pub fn dequantize_blocks_strided(
    blocks: &[u8],
    dtype: GgmlDType,
    dst: &mut [f32],
    stride: usize,
) -> bool {
    dequantize_blocks_with(Kernel::best(), blocks, dtype, dst, stride)
}

/// `dequantize_blocks_strided` with the given kernel (the tests run each).
pub(super) fn dequantize_blocks_with(
    kernel: Kernel,
    blocks: &[u8],
    dtype: GgmlDType,
    dst: &mut [f32],
    stride: usize,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if kernel.has_avx2() && (has_register_dequantization(dtype) || has_integer_dots(dtype)) {
        let n = blocks.len() / dtype.type_size();
        super::dequantize::assert_runs_fit(n, dtype, dst.len(), stride);
        let blocks = &blocks[..n * dtype.type_size()];
        // SAFETY (both): the CPU has the kernel's features (and AVX-512BW where the integer
        // module's 512-bit loops are taken); the destination was checked above and the blocks
        // are whole.
        if has_integer_dots(dtype) {
            let dequantize = if integer::takes_avx512(kernel) {
                integer::avx512::dequantize
            } else {
                integer::avx2::dequantize
            };
            unsafe { dequantize(blocks, dtype, dst, stride) };
        } else {
            let dequantize = if kernel == Kernel::Avx512 {
                avx512::dequantize
            } else {
                avx2::dequantize
            };
            unsafe { dequantize(blocks, dtype, dst.as_mut_ptr(), stride) };
        }
        return true;
    }
    super::dequantize::dequantize_blocks(blocks, dtype, dst, stride)
}

/// A register kernel module's entry points, for the CPU features `$features`: `row_dots` and
/// `dequantize` pick the module's loop (`row_dots_n`, `dequantize_as`) for the storage type and
/// the number of input rows, so that each loop is compiled without a branch per block.
#[cfg(target_arch = "x86_64")]
macro_rules! register_kernel_entry_points {
    ($features:literal) => {
        /// dots[k·n + i] = W[r + k] · x_i for the `rows` rows from r and the n = dots.len() /
        /// rows input rows x_i; `block_sums` holds Σ x over each block of 32 of every x_i.
        ///
        /// # Safety
        /// The CPU has `$features`; `bytes` holds rows of `cols / 32` blocks of `dtype`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn row_dots(
            bytes: &[u8],
            dtype: GgmlDType,
            (r, rows): (usize, usize),
            cols: usize,
            x: &[f32],
            block_sums: &[f32],
            dots: &mut [f32],
        ) {
            let n = dots.len() / rows;
            // Each row on its own, through `$call` with the const N set to the input rows.
            macro_rules! each_row {
                (|$row:ident, $dots:ident| $call:expr) => {
                    for (k, $dots) in dots.chunks_mut(n).enumerate() {
                        let $row = r + k;
                        match n {
                            1 => {
                                const N: usize = 1;
                                $call
                            }
                            2 => {
                                const N: usize = 2;
                                $call
                            }
                            3 => {
                                const N: usize = 3;
                                $call
                            }
                            _ => {
                                const N: usize = 4;
                                $call
                            }
                        }
                    }
                };
            }
            macro_rules! by_rows {
                ($format:expr) => {
                    if n == 1 {
                        super::in_row_groups(
                            r,
                            dots,
                            |r, dots| {
                                row_group_dots::<{ $format }>(bytes, r, cols, x, block_sums, dots)
                            },
                            |r, dot| {
                                row_dots_n::<1, { $format }>(bytes, r, cols, x, block_sums, dot)
                            },
                        )
                    } else {
                        each_row!(|r, dots| row_dots_n::<N, { $format }>(
                            bytes, r, cols, x, block_sums, dots
                        ))
                    }
                };
            }
            // SAFETY: as for this function.
            unsafe {
                match dtype {
                    GgmlDType::Q4_0 => by_rows!(Q4_0),
                    GgmlDType::Q4_1 => by_rows!(Q4_1),
                    GgmlDType::Q8_0 => by_rows!(Q8_0),
                    GgmlDType::Q5_0 => by_rows!(Q5_0),
                    GgmlDType::Q5_1 => by_rows!(Q5_1),
                    GgmlDType::Q4K => each_row!(|r, dots| k_row_dots::<N, false>(
                        bytes, r, cols, x, block_sums, dots
                    )),
                    GgmlDType::Q5K => each_row!(|r, dots| k_row_dots::<N, true>(
                        bytes, r, cols, x, block_sums, dots
                    )),
                    GgmlDType::Q6K => {
                        each_row!(|r, dots| q6k_row_dots::<N>(bytes, r, cols, x, dots))
                    }
                    GgmlDType::Q2K => {
                        each_row!(|r, dots| q2k_row_dots::<N>(bytes, r, cols, x, dots))
                    }
                    GgmlDType::Q3K => {
                        each_row!(|r, dots| q3k_row_dots::<N>(bytes, r, cols, x, dots))
                    }
                    GgmlDType::F16 => {
                        each_row!(|r, dots| half_row_dots::<N, false>(bytes, r, cols, x, dots))
                    }
                    GgmlDType::BF16 => {
                        each_row!(|r, dots| half_row_dots::<N, true>(bytes, r, cols, x, dots))
                    }
                    _ => unreachable!("no register kernel for {dtype:?}"),
                }
            }
        }

        /// See `super::dequantize_blocks_strided`.
        ///
        /// # Safety
        /// The CPU has `$features`; `dtype` has a register dequantization; `blocks` holds whole
        /// blocks and `dst` has room for them at `stride`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dequantize(
            blocks: &[u8],
            dtype: GgmlDType,
            dst: *mut f32,
            stride: usize,
        ) {
            // SAFETY: as for this function.
            unsafe {
                match dtype {
                    GgmlDType::Q4_0 => dequantize_as::<Q4_0>(blocks, dst, stride),
                    GgmlDType::Q4_1 => dequantize_as::<Q4_1>(blocks, dst, stride),
                    GgmlDType::Q8_0 => dequantize_as::<Q8_0>(blocks, dst, stride),
                    GgmlDType::Q5_0 => dequantize_as::<Q5_0>(blocks, dst, stride),
                    GgmlDType::Q5_1 => dequantize_as::<Q5_1>(blocks, dst, stride),
                    _ => unreachable!("no register dequantization for {dtype:?}"),
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    register_kernel_entry_points!("avx2,fma,f16c");

    /// Block formats with a register kernel, as const parameters so that each gets its own
    /// loop without a branch per block.
    pub(super) const Q4_0: u8 = 0;
    pub(super) const Q4_1: u8 = 1;
    pub(super) const Q8_0: u8 = 2;
    /// Dots only (their dequantization is `super::super::dequantize`'s).
    pub(super) const Q5_0: u8 = 3;
    pub(super) const Q5_1: u8 = 4;

    /// Bytes per block of 32 weights.
    pub(super) const fn block_bytes(format: u8) -> usize {
        match format {
            Q4_0 => 18,
            Q4_1 => 20,
            Q5_0 => 22,
            Q5_1 => 24,
            _ => 34,
        }
    }

    /// Where a block's value bytes start (Q8_0's 32 signed bytes, the other formats' 16 bytes
    /// of nibbles).
    pub(super) const fn values_at(format: u8) -> usize {
        match format {
            Q4_1 => 4,
            Q5_0 => 6,
            Q5_1 => 8,
            _ => 2,
        }
    }

    /// Where the u32 of fifth bits of a Q5 block lies (bit j belongs to element j).
    pub(super) const fn fifth_bits_at(format: u8) -> Option<usize> {
        match format {
            Q5_0 => Some(2),
            Q5_1 => Some(4),
            _ => None,
        }
    }

    /// A block's scale d (in lane 0) and offset m (0 without one): f16 values at its start.
    ///
    /// # Safety
    /// `block` points at a whole block of `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scales<const FORMAT: u8>(block: *const u8) -> (__m128, f32) {
        // SAFETY: the block starts with its 2 (Q4_1: 4) bytes of scales.
        let bits = unsafe {
            if FORMAT == Q4_1 {
                std::ptr::read_unaligned(block as *const u32)
            } else {
                std::ptr::read_unaligned(block as *const u16) as u32
            }
        };
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
        let m = if FORMAT == Q4_1 {
            _mm_cvtss_f32(_mm_shuffle_ps(scales, scales, 1))
        } else {
            0.0
        };
        (scales, m)
    }

    /// A block's scale d and the offset that its weights' sum adds per unit of Σ x: m for
    /// Q4_1, and -8·d for Q4_0, whose stored q + 8 the products then take as they are (0 for
    /// Q8_0). Read with scalar loads through `F16_VALUES`: the vector conversion and broadcast
    /// were three of a block's eleven operations on the two ports that run 512-bit ones.
    ///
    /// # Safety
    /// `block` points at a whole block of `FORMAT`.
    #[inline(always)]
    pub(super) unsafe fn block_scales<const FORMAT: u8>(
        block: *const u8,
        f16_values: &[f32; 1 << 16],
    ) -> (f32, f32) {
        // SAFETY: the block starts with its 2 (Q4_1: 4) bytes of scales.
        let bits = |at: usize| unsafe { std::ptr::read_unaligned(block.add(at) as *const u16) };
        let d = f16_values[bits(0) as usize];
        let m = match FORMAT {
            Q4_1 | Q5_1 => f16_values[bits(2) as usize],
            Q4_0 => -8.0 * d,
            Q5_0 => -16.0 * d,
            _ => 0.0,
        };
        (d, m)
    }

    /// Bytes per Q4_K super-block of 256 values (ggml's `block_q4_K`: d and dmin as f16, 12
    /// bytes of 6-bit scales and mins, 128 bytes of nibbles), and per Q5_K one (the same with
    /// 32 bytes of fifth bits before the nibbles).
    pub(super) const fn k_bytes(five: bool) -> usize {
        if five {
            176
        } else {
            144
        }
    }

    /// The eight sub-blocks' scales d·sc and offsets -dmin·m of a Q4_K or Q5_K super-block: its
    /// values are d·sc·q - dmin·m, so a sub-block's dot is d·sc·Σ q·x - dmin·m·Σ x. The six-bit
    /// fields are unpacked all at once, as ggml does, and converted and scaled as one vector
    /// each (one field at a time, they were most of the work per super-block besides the
    /// products); the offsets stay a vector, for one multiply-add with the sub-blocks' Σ x.
    ///
    /// # Safety
    /// `block` points at a whole Q4_K super-block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k_scales(
        block: *const u8,
        f16_values: &[f32; 1 << 16],
    ) -> ([f32; 8], __m256) {
        // SAFETY: the super-block's first 16 bytes are d, dmin and the packed scales.
        let bits = |at: usize| unsafe { std::ptr::read_unaligned(block.add(at) as *const u16) };
        let (d, min) = (f16_values[bits(0) as usize], f16_values[bits(2) as usize]);
        // SAFETY: as above.
        let (sc, m) = unsafe { q4k_fields(block) };
        let to_f32 = |v: u64| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
        let mut scales = [0f32; 8];
        let scaled = _mm256_mul_ps(_mm256_set1_ps(d), to_f32(sc));
        // SAFETY: `scales` holds eight f32.
        unsafe { _mm256_storeu_ps(scales.as_mut_ptr(), scaled) };
        (scales, _mm256_mul_ps(_mm256_set1_ps(-min), to_f32(m)))
    }

    /// A Q4_K or Q5_K super-block's eight six-bit scales sc_j and mins m_j, byte j of each
    /// (those of `scale_min_k4`), unpacked all at once as ggml does: sub-blocks 4..8 take their
    /// low four bits from bytes 8..12 and their top two from the top of bytes 0..4 (4..8).
    ///
    /// # Safety
    /// `block` points at a whole Q4_K or Q5_K super-block.
    #[inline(always)]
    pub(super) unsafe fn q4k_fields(block: *const u8) -> (u64, u64) {
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const TOP2: u32 = 0x0303_0303;
        // SAFETY: bytes 4..16 of the super-block are the packed fields.
        let u = unsafe { std::ptr::read_unaligned(block.add(4) as *const [u32; 3]) };
        let u = u.map(u32::from_le);
        let wide = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
        let sc = wide(u[0] & LOW6, (u[2] & LOW4) | (((u[0] >> 6) & TOP2) << 4));
        let m = wide(
            u[1] & LOW6,
            ((u[2] >> 4) & LOW4) | (((u[1] >> 6) & TOP2) << 4),
        );
        (sc, m)
    }

    /// offsets[i] += Σ_j m_j · Σx over sub-block j, for a super-block's offsets `m` (from
    /// `q4k_scales`) and `block_sums` from its first sub-block, input rows `blocks` apart.
    ///
    /// # Safety
    /// `block_sums` holds 8 values at each of the N rows' starts.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn add_min_offsets<const N: usize>(
        m: __m256,
        block_sums: &[f32],
        blocks: usize,
        offsets: &mut [__m256; N],
    ) {
        for (i, offset) in offsets.iter_mut().enumerate() {
            let sums = &block_sums[i * blocks..i * blocks + 8];
            // SAFETY: eight values.
            let sums = unsafe { _mm256_loadu_ps(sums.as_ptr()) };
            *offset = _mm256_fmadd_ps(m, sums, *offset);
        }
    }

    /// The Q4_K or Q5_K rows' checks: N input rows, their block sums and N dots fit the
    /// slices; returns row `r` and its number of super-blocks.
    pub(super) fn k_row_for<'a, const N: usize, const FIVE: bool>(
        bytes: &'a [u8],
        r: usize,
        cols: usize,
        (x, block_sums, dots): (&[f32], &[f32], &[f32]),
    ) -> (&'a [u8], usize) {
        let supers = cols / 256;
        assert!(cols.is_multiple_of(256), "K rows are whole super-blocks");
        assert!(x.len() >= N * cols && block_sums.len() >= N * cols / BLOCK && dots.len() >= N);
        let row_bytes = supers * k_bytes(FIVE);
        (&bytes[r * row_bytes..(r + 1) * row_bytes], supers)
    }

    /// `row_dots` for N input rows of Q4_K (or with FIVE, Q5_K): each pair of sub-blocks
    /// shares 32 bytes of nibbles (the low ones are the first sub-block, the high ones the
    /// second); Q5_K's fifth bit of value l of sub-block j is bit j of byte l of its highs.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q4_K (Q5_K).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn k_row_dots<const N: usize, const FIVE: bool>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        block_sums: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = k_row_for::<N, FIVE>(bytes, r, cols, (x, block_sums, dots));
        let blocks = cols / BLOCK;
        let f16_values = f16_values();
        let mut scaled = [_mm256_setzero_ps(); N];
        let mut offsets = [_mm256_setzero_ps(); N];
        let (low, sixteen) = (_mm256_set1_epi32(0x0f), _mm256_set1_epi32(16));
        let nibbles_at = if FIVE { 48 } else { 16 };
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * k_bytes(FIVE));
                for ahead in [0, 64, 128] {
                    prefetch_ahead(at.add(ahead));
                }
                let (scales, m) = q4k_scales(at, f16_values);
                add_min_offsets(m, &block_sums[sb * 8..], blocks, &mut offsets);
                let widen = |p: *const u8| -> [__m256i; 4] {
                    [0, 8, 16, 24]
                        .map(|o| _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(o) as *const __m128i)))
                };
                let highs = if FIVE { widen(at.add(16)) } else { [low; 4] };
                // Sub-block j's values with their fifth bits (Q5_K).
                let with_highs = |v: [__m256i; 4], j: usize| {
                    if !FIVE {
                        return v.map(|v| _mm256_cvtepi32_ps(v));
                    }
                    let bit = _mm256_set1_epi32(1 << j);
                    std::array::from_fn(|k| {
                        let set = _mm256_and_si256(highs[k], bit);
                        let unset = _mm256_cmpeq_epi32(set, _mm256_setzero_si256());
                        let v = _mm256_or_si256(v[k], _mm256_andnot_si256(unset, sixteen));
                        _mm256_cvtepi32_ps(v)
                    })
                };
                for pair in 0..4 {
                    let wide = widen(at.add(nibbles_at + 32 * pair));
                    let lo = with_highs(wide.map(|v| _mm256_and_si256(v, low)), 2 * pair);
                    let hi = with_highs(wide.map(|v| _mm256_srli_epi32::<4>(v)), 2 * pair + 1);
                    for (half, values) in [lo, hi].iter().enumerate() {
                        let j = 2 * pair + half;
                        let d = _mm256_set1_ps(scales[j]);
                        for (i, scaled) in scaled.iter_mut().enumerate() {
                            let xb = x.as_ptr().add(i * cols + sb * 256 + j * BLOCK);
                            let a = _mm256_fmadd_ps(
                                values[1],
                                _mm256_loadu_ps(xb.add(8)),
                                _mm256_mul_ps(values[0], _mm256_loadu_ps(xb)),
                            );
                            let b = _mm256_fmadd_ps(
                                values[3],
                                _mm256_loadu_ps(xb.add(24)),
                                _mm256_mul_ps(values[2], _mm256_loadu_ps(xb.add(16))),
                            );
                            *scaled = _mm256_fmadd_ps(_mm256_add_ps(a, b), d, *scaled);
                        }
                    }
                }
            }
        }
        let offsets = sums4(&offsets);
        for (i, sum) in sums4(&scaled).into_iter().take(N).enumerate() {
            dots[i] = sum + offsets[i];
        }
    }

    /// Bytes per Q6_K super-block of 256 values (ggml's `block_q6_K`: 128 bytes of low
    /// nibbles, 64 of 2-bit highs, 16 signed scales, d as f16).
    pub(super) const Q6K_BYTES: usize = 210;

    /// Bytes per Q2_K super-block (ggml's `block_q2_K`: 16 bytes of 4-bit scale and min
    /// pairs, 64 of 2-bit values, d and dmin as f16) and per Q3_K one (`block_q3_K`: 32 bytes
    /// of high bits, 64 of 2-bit low values, 12 of 6-bit scales, d as f16).
    pub(super) const Q2K_BYTES: usize = 84;
    pub(super) const Q3K_BYTES: usize = 110;

    /// Row `r` of `bytes` (super-blocks of 256 values, `size` bytes each) and its number of
    /// super-blocks, after checking that N input rows and N dots fit the slices.
    pub(super) fn super_row_for<'a, const N: usize>(
        bytes: &'a [u8],
        r: usize,
        cols: usize,
        size: usize,
        (x, dots): (&[f32], &[f32]),
    ) -> (&'a [u8], usize) {
        let supers = cols / 256;
        assert!(cols.is_multiple_of(256), "K rows are whole super-blocks");
        assert!(x.len() >= N * cols && dots.len() >= N);
        (&bytes[r * supers * size..(r + 1) * supers * size], supers)
    }

    /// A Q2_K super-block's sixteen multipliers d·sc and offsets dmin·m, one pair per run of
    /// 16 values (x = d·sc·q - dmin·m).
    ///
    /// # Safety
    /// `block` points at a whole Q2_K super-block.
    #[inline(always)]
    pub(super) unsafe fn q2k_scales(
        block: *const u8,
        f16_values: &[f32; 1 << 16],
    ) -> ([f32; 16], [f32; 16]) {
        // SAFETY: the scales are the first 16 bytes, d and dmin the last four.
        let (packed, d, min) = unsafe {
            (
                std::ptr::read_unaligned(block as *const [u8; 16]),
                std::ptr::read_unaligned(block.add(80) as *const u16),
                std::ptr::read_unaligned(block.add(82) as *const u16),
            )
        };
        let (d, min) = (f16_values[d as usize], f16_values[min as usize]);
        (
            packed.map(|sc| d * (sc & 0xF) as f32),
            packed.map(|sc| min * (sc >> 4) as f32),
        )
    }

    /// A Q3_K super-block's sixteen multipliers d·(sc - 32), one per run of 16 values.
    ///
    /// # Safety
    /// `block` points at a whole Q3_K super-block.
    #[inline(always)]
    pub(super) unsafe fn q3k_scales(block: *const u8, f16_values: &[f32; 1 << 16]) -> [f32; 16] {
        // SAFETY: the packed scales are bytes 96..108, d the last two.
        let (packed, d) = unsafe {
            (
                std::ptr::read_unaligned(block.add(96) as *const [u8; 12]),
                std::ptr::read_unaligned(block.add(108) as *const u16),
            )
        };
        let d = f16_values[d as usize];
        super::super::dequantize::q3k_scales(&packed).map(|sc| d * (sc as f32 - 32.0))
    }

    /// `row_dots` for N input rows of Q2_K. In each half of a super-block, byte i of its 32
    /// holds values i, i + 32, i + 64 and i + 96 in its four bit pairs (ggml's layout); each
    /// run of 16 has its own multiplier and offset, applied to the values in registers.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q2_K.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q2k_row_dots<const N: usize>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = super_row_for::<N>(bytes, r, cols, Q2K_BYTES, (x, dots));
        let f16_values = f16_values();
        // Two chains per input row (even and odd bit pairs), so that one multiply-add does not
        // wait on the one before.
        let mut sums = [[_mm256_setzero_ps(); 2]; N];
        let three = _mm256_set1_epi32(3);
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * Q2K_BYTES);
                prefetch_ahead(at);
                prefetch_ahead(at.add(64));
                let (scales, offsets) = q2k_scales(at, f16_values);
                for half in 0..2 {
                    let qs = at.add(16 + 32 * half);
                    for l in (0..32).step_by(8) {
                        let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(l) as *const __m128i));
                        for step in 0..4 {
                            let v = _mm256_and_si256(
                                _mm256_srlv_epi32(q, _mm256_set1_epi32(2 * step as i32)),
                                three,
                            );
                            let e = 128 * half + 32 * step + l;
                            let run = e / 16;
                            let w = _mm256_fmsub_ps(
                                _mm256_cvtepi32_ps(v),
                                _mm256_set1_ps(scales[run]),
                                _mm256_set1_ps(offsets[run]),
                            );
                            for (i, chains) in sums.iter_mut().enumerate() {
                                let xv = _mm256_loadu_ps(x.as_ptr().add(i * cols + sb * 256 + e));
                                chains[step % 2] = _mm256_fmadd_ps(w, xv, chains[step % 2]);
                            }
                        }
                    }
                }
            }
        }
        two_chain_dots(&sums, dots);
    }

    /// `row_dots` for N input rows of Q3_K: Q2_K's layout of the low bit pairs, a third bit
    /// per value (set: q as is; clear: q - 4) in 32 bytes whose bit 4·half + step belongs to
    /// the bit pair `step` of that half; a multiplier per run of 16.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q3_K.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q3k_row_dots<const N: usize>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = super_row_for::<N>(bytes, r, cols, Q3K_BYTES, (x, dots));
        let f16_values = f16_values();
        let mut sums = [[_mm256_setzero_ps(); 2]; N];
        let (three, four) = (_mm256_set1_epi32(3), _mm256_set1_epi32(4));
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * Q3K_BYTES);
                prefetch_ahead(at);
                prefetch_ahead(at.add(64));
                let scales = q3k_scales(at, f16_values);
                for half in 0..2 {
                    let qs = at.add(32 + 32 * half);
                    for l in (0..32).step_by(8) {
                        let eight = |p: *const u8| {
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
                        };
                        let (q, h) = (eight(qs.add(l)), eight(at.add(l)));
                        for step in 0..4 {
                            let low = _mm256_and_si256(
                                _mm256_srlv_epi32(q, _mm256_set1_epi32(2 * step as i32)),
                                three,
                            );
                            // The third bit moved to bit 2: q = low | bit·4, less 4.
                            let shift = 4 * half as i32 + step as i32 - 2;
                            let bit = if shift >= 0 {
                                _mm256_srlv_epi32(h, _mm256_set1_epi32(shift))
                            } else {
                                _mm256_sllv_epi32(h, _mm256_set1_epi32(-shift))
                            };
                            let v = _mm256_sub_epi32(
                                _mm256_or_si256(low, _mm256_and_si256(bit, four)),
                                four,
                            );
                            let e = 128 * half + 32 * step + l;
                            let w = _mm256_mul_ps(
                                _mm256_cvtepi32_ps(v),
                                _mm256_set1_ps(scales[e / 16]),
                            );
                            for (i, chains) in sums.iter_mut().enumerate() {
                                let xv = _mm256_loadu_ps(x.as_ptr().add(i * cols + sb * 256 + e));
                                chains[step % 2] = _mm256_fmadd_ps(w, xv, chains[step % 2]);
                            }
                        }
                    }
                }
            }
        }
        two_chain_dots(&sums, dots);
    }

    /// A Q6_K super-block's sixteen scales d·sc, one per run of 16 values.
    ///
    /// # Safety
    /// `block` points at a whole Q6_K super-block.
    #[inline(always)]
    pub(super) unsafe fn q6k_scales(block: *const u8, f16_values: &[f32; 1 << 16]) -> [f32; 16] {
        // SAFETY: d is the super-block's last two bytes, the scales the 16 before it.
        let (bits, sc) = unsafe {
            (
                std::ptr::read_unaligned(block.add(208) as *const u16),
                std::ptr::read_unaligned(block.add(192) as *const [i8; 16]),
            )
        };
        let d = f16_values[bits as usize];
        sc.map(|s| d * s as f32)
    }

    /// `row_dots` for N input rows of Q6_K. In each half of a super-block, byte l of the low
    /// nibbles and of the 2-bit highs make four values: l, l + 32, l + 64 and l + 96 (ggml's
    /// layout), each less 32, each run of 16 with its own scale.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q6_K.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_row_dots<const N: usize>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = super_row_for::<N>(bytes, r, cols, Q6K_BYTES, (x, dots));
        let f16_values = f16_values();
        let mut scaled = [_mm256_setzero_ps(); N];
        let (low, two, bias) = (
            _mm256_set1_epi32(0x0f),
            _mm256_set1_epi32(3),
            _mm256_set1_epi32(32),
        );
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * Q6K_BYTES);
                for ahead in [0, 64, 128, 192] {
                    prefetch_ahead(at.add(ahead));
                }
                let scales = q6k_scales(at, f16_values);
                for half in 0..2 {
                    let (ql, qh) = (at.add(64 * half), at.add(128 + 32 * half));
                    for l in (0..32).step_by(8) {
                        let eight = |p: *const u8| {
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
                        };
                        let (a, b, h) = (eight(ql.add(l)), eight(ql.add(32 + l)), eight(qh.add(l)));
                        let high = |shift: i32| {
                            let bits = _mm256_and_si256(
                                _mm256_srlv_epi32(h, _mm256_set1_epi32(shift)),
                                two,
                            );
                            _mm256_slli_epi32::<4>(bits)
                        };
                        let values = [
                            _mm256_or_si256(_mm256_and_si256(a, low), high(0)),
                            _mm256_or_si256(_mm256_and_si256(b, low), high(2)),
                            _mm256_or_si256(_mm256_srli_epi32::<4>(a), high(4)),
                            _mm256_or_si256(_mm256_srli_epi32::<4>(b), high(6)),
                        ]
                        .map(|v| _mm256_cvtepi32_ps(_mm256_sub_epi32(v, bias)));
                        for (k, v) in values.iter().enumerate() {
                            let e = 128 * half + 32 * k + l;
                            let d = _mm256_set1_ps(scales[e / 16]);
                            for (i, acc) in scaled.iter_mut().enumerate() {
                                let xv = _mm256_loadu_ps(x.as_ptr().add(i * cols + sb * 256 + e));
                                *acc = _mm256_fmadd_ps(_mm256_mul_ps(*v, xv), d, *acc);
                            }
                        }
                    }
                }
            }
        }
        for (i, sum) in sums4(&scaled).into_iter().take(N).enumerate() {
            dots[i] = sum;
        }
    }

    /// Row `r` of `bytes` (blocks of `FORMAT`, `cols` values per row) and its number of
    /// blocks, after checking that N input rows, their block sums and N dots fit the slices.
    pub(super) fn row_for<'a, const N: usize, const FORMAT: u8>(
        bytes: &'a [u8],
        r: usize,
        cols: usize,
        (x, block_sums, dots): (&[f32], &[f32], &[f32]),
    ) -> (&'a [u8], usize) {
        let size = block_bytes(FORMAT);
        let blocks = cols / BLOCK;
        assert!(x.len() >= N * cols && block_sums.len() >= N * blocks && dots.len() >= N);
        (&bytes[r * blocks * size..(r + 1) * blocks * size], blocks)
    }

    /// Row `r` of f16 or bf16 `bytes` (`cols` values per row), after checking that the row
    /// is whole chunks of 32 values and that N input rows and N dots fit the slices.
    pub(super) fn half_row_for<'a, const N: usize>(
        bytes: &'a [u8],
        r: usize,
        cols: usize,
        (x, dots): (&[f32], &[f32]),
    ) -> &'a [u8] {
        assert!(
            cols.is_multiple_of(BLOCK),
            "half rows are taken 32 values at a time"
        );
        assert!(x.len() >= N * cols && dots.len() >= N);
        &bytes[r * cols * 2..(r + 1) * cols * 2]
    }

    /// Eight f16 (or, with BF, bf16) values at `at` as f32: exact either way.
    ///
    /// # Safety
    /// 16 bytes at `at` may be read.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half8<const BF: bool>(at: *const u8) -> __m256 {
        // SAFETY: the caller's bound.
        let v = unsafe { _mm_loadu_si128(at as *const __m128i) };
        if BF {
            // A bf16 is the high half of the f32 with the same bits.
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
        } else {
            _mm256_cvtph_ps(v)
        }
    }

    /// `row_dots_n` for f16 (bf16 with BF) weights: 32 values a step, two chains of
    /// multiply-adds per input row.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` f16 or bf16 values.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn half_row_dots<const N: usize, const BF: bool>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let row = half_row_for::<N>(bytes, r, cols, (x, dots));
        let mut sums = [[_mm256_setzero_ps(); 2]; N];
        for c in (0..cols).step_by(BLOCK) {
            // SAFETY: values c..c + 32 of the row (64 bytes) and of each x_i lie inside the
            // slices checked above.
            unsafe {
                let at = row.as_ptr().add(2 * c);
                prefetch_ahead(at);
                let w = [0, 16, 32, 48].map(|b| half8::<BF>(at.add(b)));
                for (i, chains) in sums.iter_mut().enumerate() {
                    let xc = x.as_ptr().add(i * cols + c);
                    for (k, w) in w.iter().enumerate() {
                        let xv = _mm256_loadu_ps(xc.add(8 * k));
                        chains[k % 2] = _mm256_fmadd_ps(*w, xv, chains[k % 2]);
                    }
                }
            }
        }
        two_chain_dots(&sums, dots);
    }

    /// A Q4 or Q5 block's 32 nibbles as bytes: elements 0..16 (the low nibbles) and 16..32
    /// (the high ones), without a Q5 block's fifth bits; Q4_0's stored q + 8 becomes the
    /// signed q, as the plain path computes it.
    ///
    /// # Safety
    /// `block` points at a whole block of `FORMAT`, one of the Q4 and Q5 formats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn nibbles<const FORMAT: u8>(block: *const u8) -> (__m128i, __m128i) {
        // SAFETY: the caller's bound.
        let (lo, hi) = unsafe { stored_nibbles::<FORMAT>(block) };
        if FORMAT == Q4_0 {
            let eight = _mm_set1_epi8(8);
            (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight))
        } else {
            (lo, hi)
        }
    }

    /// `nibbles` as stored: Q4_0's q + 8 too.
    ///
    /// # Safety
    /// As for `nibbles`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn stored_nibbles<const FORMAT: u8>(block: *const u8) -> (__m128i, __m128i) {
        // SAFETY: the 16 nibble bytes are inside the block.
        let qs = unsafe { _mm_loadu_si128(block.add(values_at(FORMAT)) as *const __m128i) };
        let low_nibbles = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(qs, low_nibbles);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low_nibbles);
        (lo, hi)
    }

    /// A block's integer values as four vectors of eight f32 (element order), its scale d
    /// broadcast, and its offset m (0 without one): the weights are d·q + m.
    ///
    /// # Safety
    /// `block` points at a whole block of `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_values<const FORMAT: u8>(block: *const u8) -> ([__m256; 4], __m256, f32) {
        // SAFETY (whole function): every read lies inside the block.
        unsafe {
            let (scales, m) = scales::<FORMAT>(block);
            let d = _mm256_broadcastss_ps(scales);
            let q = if FORMAT == Q8_0 {
                // 32 × i8 after d.
                let q = _mm256_loadu_si256(block.add(2) as *const __m256i);
                to_f32x32::<true>(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1))
            } else {
                let (lo, hi) = nibbles::<FORMAT>(block);
                if FORMAT == Q4_0 {
                    to_f32x32::<true>(lo, hi)
                } else {
                    to_f32x32::<false>(lo, hi)
                }
            };
            (q, d, m)
        }
    }

    /// The 32 bytes of lo then hi as four vectors of eight f32 values, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn to_f32x32<const SIGNED: bool>(lo: __m128i, hi: __m128i) -> [__m256; 4] {
        [
            to_f32::<SIGNED>(lo),
            to_f32::<SIGNED>(_mm_srli_si128(lo, 8)),
            to_f32::<SIGNED>(hi),
            to_f32::<SIGNED>(_mm_srli_si128(hi, 8)),
        ]
    }

    /// The low 8 bytes of v as eight f32 values (integers, signed or not).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn to_f32<const SIGNED: bool>(v: __m128i) -> __m256 {
        let wide = if SIGNED {
            _mm256_cvtepi8_epi32(v)
        } else {
            _mm256_cvtepu8_epi32(v)
        };
        _mm256_cvtepi32_ps(wide)
    }

    /// A block's 32 stored integers as four vectors of eight f32, in element order: Q8_0's
    /// signed q, and the Q4 formats' nibbles as stored (0..15; `block_scales` accounts for
    /// Q4_0's 8). Each half of the 16 nibble bytes is widened once and gives its low nibbles
    /// (elements 0..16) by a mask and its high ones (16..32) by a shift.
    ///
    /// # Safety
    /// `block` points at a whole block of `FORMAT`.
    #[inline(always)]
    unsafe fn stored_values<const FORMAT: u8>(block: *const u8) -> [__m256; 4] {
        // SAFETY (whole function): every read lies inside the block.
        unsafe {
            let eight = |at: usize| _mm_loadl_epi64(block.add(at) as *const __m128i);
            if FORMAT == Q8_0 {
                return [2, 10, 18, 26]
                    .map(|at| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight(at))));
            }
            let at = values_at(FORMAT);
            let (a, b) = (
                _mm256_cvtepu8_epi32(eight(at)),
                _mm256_cvtepu8_epi32(eight(at + 8)),
            );
            let low = _mm256_set1_epi32(0x0f);
            let q = [
                _mm256_and_si256(a, low),
                _mm256_and_si256(b, low),
                _mm256_srli_epi32::<4>(a),
                _mm256_srli_epi32::<4>(b),
            ];
            let Some(high_at) = fifth_bits_at(FORMAT) else {
                return q.map(|v| _mm256_cvtepi32_ps(v));
            };
            let high = std::ptr::read_unaligned(block.add(high_at) as *const u32) as i32;
            let lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
            let sixteen = _mm256_set1_epi32(16);
            let mut out = [_mm256_setzero_ps(); 4];
            for (k, v) in q.into_iter().enumerate() {
                let bits = _mm256_and_si256(_mm256_set1_epi32(high >> (8 * k)), lanes);
                let unset = _mm256_cmpeq_epi32(bits, _mm256_setzero_si256());
                let v = _mm256_or_si256(v, _mm256_andnot_si256(unset, sixteen));
                out[k] = _mm256_cvtepi32_ps(v);
            }
            out
        }
    }

    /// `row_dots` for N input rows of one format, so that the accumulators live in registers.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_dots_n<const N: usize, const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        block_sums: &[f32],
        dots: &mut [f32],
    ) {
        let size = block_bytes(FORMAT);
        let (row, blocks) = row_for::<N, FORMAT>(bytes, r, cols, (x, block_sums, dots));
        let f16_values = f16_values();
        // Per input row: d·Σ q·x as a vector, and Σ m·(Σ x) over the blocks.
        let mut scaled = [_mm256_setzero_ps(); N];
        let mut offsets = [0f32; N];
        for b in 0..blocks {
            // SAFETY: block b of the row, and 32 values of each x_i at b·32, lie inside the
            // slices checked above.
            unsafe {
                let at = row.as_ptr().add(b * size);
                prefetch_ahead(at);
                let (d, m) = block_scales::<FORMAT>(at, f16_values);
                let q = stored_values::<FORMAT>(at);
                let d = _mm256_set1_ps(d);
                for i in 0..N {
                    let xb = x.as_ptr().add(i * cols + b * BLOCK);
                    // Two independent chains, so one FMA's latency does not wait on another's.
                    let lo = _mm256_fmadd_ps(
                        q[1],
                        _mm256_loadu_ps(xb.add(8)),
                        _mm256_mul_ps(q[0], _mm256_loadu_ps(xb)),
                    );
                    let hi = _mm256_fmadd_ps(
                        q[3],
                        _mm256_loadu_ps(xb.add(24)),
                        _mm256_mul_ps(q[2], _mm256_loadu_ps(xb.add(16))),
                    );
                    scaled[i] = _mm256_fmadd_ps(_mm256_add_ps(lo, hi), d, scaled[i]);
                    if FORMAT != Q8_0 {
                        offsets[i] += m * *block_sums.get_unchecked(i * blocks + b);
                    }
                }
            }
        }
        for (i, sum) in sums4(&scaled).into_iter().take(N).enumerate() {
            dots[i] = sum + offsets[i];
        }
    }

    /// `row_dots_n::<1, FORMAT>` for the four rows from r, each summed in the same order as
    /// there.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_group_dots<const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        block_sums: &[f32],
        dots: &mut [f32],
    ) {
        let size = block_bytes(FORMAT);
        let (rows, blocks) = row_group_for::<FORMAT>(bytes, r, cols, (x, block_sums, dots));
        let f16_values = f16_values();
        let mut scaled = [_mm256_setzero_ps(); ROW_GROUP];
        let mut offsets = [0f32; ROW_GROUP];
        for b in 0..blocks {
            // SAFETY: block b of each row, and 32 values of x at b·32, lie inside the slices
            // checked above.
            unsafe {
                let xb = x.as_ptr().add(b * BLOCK);
                let xs = [0, 8, 16, 24].map(|at| _mm256_loadu_ps(xb.add(at)));
                let block_sum = *block_sums.get_unchecked(b);
                for k in 0..ROW_GROUP {
                    let at = rows.as_ptr().add((k * blocks + b) * size);
                    prefetch_ahead(at);
                    let (d, m) = block_scales::<FORMAT>(at, f16_values);
                    let q = stored_values::<FORMAT>(at);
                    let lo = _mm256_fmadd_ps(q[1], xs[1], _mm256_mul_ps(q[0], xs[0]));
                    let hi = _mm256_fmadd_ps(q[3], xs[3], _mm256_mul_ps(q[2], xs[2]));
                    scaled[k] =
                        _mm256_fmadd_ps(_mm256_add_ps(lo, hi), _mm256_set1_ps(d), scaled[k]);
                    if FORMAT != Q8_0 {
                        offsets[k] += m * block_sum;
                    }
                }
            }
        }
        for (k, sum) in sums4(&scaled).into_iter().enumerate() {
            dots[k] = sum + offsets[k];
        }
    }

    /// # Safety
    /// As for `dequantize`, with `blocks` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dequantize_as<const FORMAT: u8>(blocks: &[u8], dst: *mut f32, stride: usize) {
        let size = block_bytes(FORMAT);
        let n = blocks.len() / size;
        let m_of = |m: f32| _mm256_set1_ps(m);
        for b in 0..n {
            // SAFETY: block b lies inside `blocks`; its runs of 16 values at 2b and 2b + 1
            // are inside `dst` (the caller's bound).
            unsafe {
                let block = blocks.as_ptr().add(b * size);
                let (q, d, m) = match FORMAT {
                    // As in `avx512::dequantize_as`.
                    Q5_0 | Q5_1 => {
                        let (d, m) = block_scales::<FORMAT>(block, f16_values());
                        let q = stored_values::<FORMAT>(block);
                        let q = if FORMAT == Q5_0 {
                            q.map(|v| _mm256_sub_ps(v, _mm256_set1_ps(16.0)))
                        } else {
                            q
                        };
                        (q, _mm256_set1_ps(d), m)
                    }
                    _ => block_values::<FORMAT>(block),
                };
                for (k, v) in q.iter().enumerate() {
                    let w = _mm256_mul_ps(*v, d);
                    // d·q + m in two roundings, as candle's plain path computes it.
                    let w = if FORMAT == Q4_1 || FORMAT == Q5_1 {
                        _mm256_add_ps(w, m_of(m))
                    } else {
                        w
                    };
                    let run = 2 * b + k / 2;
                    _mm256_storeu_ps(dst.add(run * stride + 8 * (k % 2)), w);
                }
            }
        }
    }

    /// a · b for f32 rows of equal length.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let whole = a.len() / 32 * 32;
        for c in (0..whole).step_by(32) {
            for (k, acc) in acc.iter_mut().enumerate() {
                // SAFETY: c + 8k + 8 <= whole <= a.len() == b.len().
                let (x, y) = unsafe {
                    (
                        _mm256_loadu_ps(a.as_ptr().add(c + 8 * k)),
                        _mm256_loadu_ps(b.as_ptr().add(c + 8 * k)),
                    )
                };
                *acc = _mm256_fmadd_ps(x, y, *acc);
            }
        }
        let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
        sum8(_mm256_add_ps(
            _mm256_add_ps(acc[0], acc[1]),
            _mm256_add_ps(acc[2], acc[3]),
        )) + tail
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// dots[i] = the lane sum of input row i's two chains of multiply-adds.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn two_chain_dots<const N: usize>(sums: &[[__m256; 2]; N], dots: &mut [f32]) {
        let both = sums.map(|[even, odd]| _mm256_add_ps(even, odd));
        for (d, sum) in dots.iter_mut().zip(sums4(&both).into_iter().take(N)) {
            *d = sum;
        }
    }

    /// The lane sums of up to four vectors (missing ones count as zero), reduced together.
    /// Each vector's sum takes the same steps whatever the others hold, so a row's dot does
    /// not depend on the rows it was reduced with.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn sums4(v: &[__m256]) -> [f32; 4] {
        let at = |i: usize| v.get(i).copied().unwrap_or(_mm256_setzero_ps());
        let both = _mm256_hadd_ps(_mm256_hadd_ps(at(0), at(1)), _mm256_hadd_ps(at(2), at(3)));
        let s = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
        let mut out = [0f32; 4];
        // SAFETY: `out` holds four f32.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        out
    }

    /// The four rows from `r` of `bytes` and their number of blocks, after checking that one
    /// input row, its block sums and four dots fit the slices.
    pub(super) fn row_group_for<'a, const FORMAT: u8>(
        bytes: &'a [u8],
        r: usize,
        cols: usize,
        (x, block_sums, dots): (&[f32], &[f32], &[f32]),
    ) -> (&'a [u8], usize) {
        let size = block_bytes(FORMAT);
        let blocks = cols / BLOCK;
        assert!(x.len() >= cols && block_sums.len() >= blocks && dots.len() >= ROW_GROUP);
        (
            &bytes[r * blocks * size..(r + ROW_GROUP) * blocks * size],
            blocks,
        )
    }
}

/// The decoding dots and dequantization with 512-bit registers: a block's 32 weights are two
/// registers, half the instructions of AVX2. Since decoding prefetches its weights, the two
/// measure within noise of each other (the work is reading weights); dequantizing into panels
/// gained about 1 %.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::{
        add_min_offsets, block_bytes, block_scales, fifth_bits_at, half_row_for, k_bytes,
        k_row_for, nibbles, q4k_scales, q6k_scales, row_for, row_group_for, scales, super_row_for,
        values_at, Q2K_BYTES, Q3K_BYTES, Q4_0, Q4_1, Q5_0, Q5_1, Q6K_BYTES, Q8_0,
    };
    use super::*;

    register_kernel_entry_points!("avx512f,avx2,fma,f16c");

    /// A block's integer values as two vectors of sixteen f32 (element order), its scale d and
    /// its offset m (0 without one): the weights are d·q + m.
    ///
    /// # Safety
    /// `block` points at a whole block of `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn block_values<const FORMAT: u8>(block: *const u8) -> ([__m512; 2], f32, f32) {
        // SAFETY (whole function): every read lies inside the block.
        unsafe {
            let (scales, m) = scales::<FORMAT>(block);
            let d = _mm_cvtss_f32(scales);
            let q = if FORMAT == Q8_0 {
                let lo = _mm_loadu_si128(block.add(2) as *const __m128i);
                let hi = _mm_loadu_si128(block.add(18) as *const __m128i);
                [
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)),
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
                ]
            } else {
                let (lo, hi) = nibbles::<FORMAT>(block);
                if FORMAT == Q4_0 {
                    [
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)),
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
                    ]
                } else {
                    [
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)),
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)),
                    ]
                }
            };
            (q, d, m)
        }
    }

    /// # Safety
    /// As for `dequantize`, with `blocks` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn dequantize_as<const FORMAT: u8>(blocks: &[u8], dst: *mut f32, stride: usize) {
        let size = block_bytes(FORMAT);
        for b in 0..blocks.len() / size {
            // SAFETY: block b lies inside `blocks`; its runs of 16 values at 2b and 2b + 1
            // are inside `dst` (the caller's bound).
            unsafe {
                let block = blocks.as_ptr().add(b * size);
                let (q, d, m) = match FORMAT {
                    // The stored five-bit values; Q5_0's are then centred exactly as candle's
                    // integer q - 16 (small integers: the f32 subtraction is exact).
                    Q5_0 | Q5_1 => {
                        let (d, m) = block_scales::<FORMAT>(block, f16_values());
                        let q = stored_values::<FORMAT>(block);
                        let q = if FORMAT == Q5_0 {
                            q.map(|v| _mm512_sub_ps(v, _mm512_set1_ps(16.0)))
                        } else {
                            q
                        };
                        (q, d, m)
                    }
                    _ => block_values::<FORMAT>(block),
                };
                let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
                for (k, v) in q.iter().enumerate() {
                    let w = _mm512_mul_ps(*v, d);
                    // d·q + m in two roundings, as candle's plain path computes it.
                    let w = if FORMAT == Q4_1 || FORMAT == Q5_1 {
                        _mm512_add_ps(w, m)
                    } else {
                        w
                    };
                    _mm512_storeu_ps(dst.add((2 * b + k) * stride), w);
                }
            }
        }
    }

    /// A block's 32 stored integers as two vectors of sixteen f32, in element order (as
    /// `avx2::stored_values`): the 16 nibble bytes are widened once, for the low nibbles
    /// (elements 0..16) by a mask and the high ones (16..32) by a shift.
    ///
    /// # Safety
    /// `block` points at a whole block of `FORMAT`.
    #[inline(always)]
    unsafe fn stored_values<const FORMAT: u8>(block: *const u8) -> [__m512; 2] {
        // SAFETY (whole function): every read lies inside the block.
        unsafe {
            let sixteen = |at: usize| _mm_loadu_si128(block.add(at) as *const __m128i);
            if FORMAT == Q8_0 {
                return [2, 18].map(|at| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sixteen(at))));
            }
            let bytes = _mm512_cvtepu8_epi32(sixteen(values_at(FORMAT)));
            let (lo, hi) = (
                _mm512_and_si512(bytes, _mm512_set1_epi32(0x0f)),
                _mm512_srli_epi32::<4>(bytes),
            );
            let Some(high_at) = fifth_bits_at(FORMAT) else {
                return [lo, hi].map(|v| _mm512_cvtepi32_ps(v));
            };
            let high = std::ptr::read_unaligned(block.add(high_at) as *const u32);
            let sixteen = _mm512_set1_epi32(16);
            [
                _mm512_mask_or_epi32(lo, high as u16, lo, sixteen),
                _mm512_mask_or_epi32(hi, (high >> 16) as u16, hi, sixteen),
            ]
            .map(|v| _mm512_cvtepi32_ps(v))
        }
    }

    /// `row_dots` for N input rows of one format. Blocks alternate between two accumulators
    /// per row, so that consecutive blocks' multiply-adds do not wait on each other.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn row_dots_n<const N: usize, const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        block_sums: &[f32],
        dots: &mut [f32],
    ) {
        let size = block_bytes(FORMAT);
        let (row, blocks) = row_for::<N, FORMAT>(bytes, r, cols, (x, block_sums, dots));
        let f16_values = f16_values();
        let mut even = [_mm512_setzero_ps(); N];
        let mut odd = [_mm512_setzero_ps(); N];
        let mut offsets = [0f32; N];
        // SAFETY: block b of the row, and 32 values of each x_i at b·32, lie inside the
        // slices checked above.
        let block = |b: usize, scaled: &mut [__m512; N], offsets: &mut [f32; N]| unsafe {
            let at = row.as_ptr().add(b * size);
            prefetch_ahead(at);
            let (d, m) = block_scales::<FORMAT>(at, f16_values);
            let q = stored_values::<FORMAT>(at);
            let d = _mm512_set1_ps(d);
            for i in 0..N {
                let xb = x.as_ptr().add(i * cols + b * BLOCK);
                let sum = _mm512_fmadd_ps(
                    q[1],
                    _mm512_loadu_ps(xb.add(16)),
                    _mm512_mul_ps(q[0], _mm512_loadu_ps(xb)),
                );
                scaled[i] = _mm512_fmadd_ps(sum, d, scaled[i]);
                if FORMAT != Q8_0 {
                    offsets[i] += m * *block_sums.get_unchecked(i * blocks + b);
                }
            }
        };
        for b in (0..blocks / 2 * 2).step_by(2) {
            block(b, &mut even, &mut offsets);
            block(b + 1, &mut odd, &mut offsets);
        }
        if blocks % 2 == 1 {
            block(blocks - 1, &mut even, &mut offsets);
        }
        let both: [__m512; N] = std::array::from_fn(|i| _mm512_add_ps(even[i], odd[i]));
        for (i, sum) in sums4(&both).into_iter().take(N).enumerate() {
            dots[i] = sum + offsets[i];
        }
    }

    /// `row_dots_n::<1, FORMAT>` for the four rows from r, each summed in the same order as
    /// there.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in `FORMAT`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn row_group_dots<const FORMAT: u8>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        block_sums: &[f32],
        dots: &mut [f32],
    ) {
        let size = block_bytes(FORMAT);
        let (rows, blocks) = row_group_for::<FORMAT>(bytes, r, cols, (x, block_sums, dots));
        let f16_values = f16_values();
        let mut even = [_mm512_setzero_ps(); ROW_GROUP];
        let mut odd = [_mm512_setzero_ps(); ROW_GROUP];
        let mut offsets = [0f32; ROW_GROUP];
        // SAFETY: block b of each row, and 32 values of x at b·32, lie inside the slices
        // checked above.
        let block = |b: usize, scaled: &mut [__m512; ROW_GROUP], offsets: &mut [f32; ROW_GROUP]| unsafe {
            let xb = x.as_ptr().add(b * BLOCK);
            let (x0, x1) = (_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(16)));
            let block_sum = *block_sums.get_unchecked(b);
            for k in 0..ROW_GROUP {
                let at = rows.as_ptr().add((k * blocks + b) * size);
                prefetch_ahead(at);
                let (d, m) = block_scales::<FORMAT>(at, f16_values);
                let q = stored_values::<FORMAT>(at);
                let sum = _mm512_fmadd_ps(q[1], x1, _mm512_mul_ps(q[0], x0));
                scaled[k] = _mm512_fmadd_ps(sum, _mm512_set1_ps(d), scaled[k]);
                if FORMAT != Q8_0 {
                    offsets[k] += m * block_sum;
                }
            }
        };
        for b in (0..blocks / 2 * 2).step_by(2) {
            block(b, &mut even, &mut offsets);
            block(b + 1, &mut odd, &mut offsets);
        }
        if blocks % 2 == 1 {
            block(blocks - 1, &mut even, &mut offsets);
        }
        let both: [__m512; ROW_GROUP] = std::array::from_fn(|k| _mm512_add_ps(even[k], odd[k]));
        for (k, sum) in sums4(&both).into_iter().enumerate() {
            dots[k] = sum + offsets[k];
        }
    }

    /// `avx2::k_row_dots` with 512-bit registers: a sub-block's 32 values are two.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q4_K (Q5_K).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn k_row_dots<const N: usize, const FIVE: bool>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        block_sums: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = k_row_for::<N, FIVE>(bytes, r, cols, (x, block_sums, dots));
        let blocks = cols / BLOCK;
        let f16_values = f16_values();
        let mut even = [_mm512_setzero_ps(); N];
        let mut odd = [_mm512_setzero_ps(); N];
        let mut offsets = [_mm256_setzero_ps(); N];
        let (low, sixteen) = (_mm512_set1_epi32(0x0f), _mm512_set1_epi32(16));
        let nibbles_at = if FIVE { 48 } else { 16 };
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * k_bytes(FIVE));
                for ahead in [0, 64, 128] {
                    prefetch_ahead(at.add(ahead));
                }
                let (scales, m) = q4k_scales(at, f16_values);
                add_min_offsets(m, &block_sums[sb * 8..], blocks, &mut offsets);
                let widen = |p: *const u8| -> [__m512i; 2] {
                    [0, 16]
                        .map(|o| _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(o) as *const __m128i)))
                };
                let highs = if FIVE { widen(at.add(16)) } else { [low; 2] };
                // Sub-block j's values with their fifth bits (Q5_K).
                let with_highs = |v: [__m512i; 2], j: usize| {
                    if !FIVE {
                        return v.map(|v| _mm512_cvtepi32_ps(v));
                    }
                    let bit = _mm512_set1_epi32(1 << j);
                    std::array::from_fn(|k| {
                        let set = _mm512_test_epi32_mask(highs[k], bit);
                        _mm512_cvtepi32_ps(_mm512_mask_or_epi32(v[k], set, v[k], sixteen))
                    })
                };
                for pair in 0..4 {
                    let wide = widen(at.add(nibbles_at + 32 * pair));
                    let lo = with_highs(wide.map(|v| _mm512_and_si512(v, low)), 2 * pair);
                    let hi = with_highs(wide.map(|v| _mm512_srli_epi32::<4>(v)), 2 * pair + 1);
                    for (half, values) in [lo, hi].iter().enumerate() {
                        let j = 2 * pair + half;
                        let d = _mm512_set1_ps(scales[j]);
                        let acc = if half == 0 { &mut even } else { &mut odd };
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let xb = x.as_ptr().add(i * cols + sb * 256 + j * BLOCK);
                            let sum = _mm512_fmadd_ps(
                                values[1],
                                _mm512_loadu_ps(xb.add(16)),
                                _mm512_mul_ps(values[0], _mm512_loadu_ps(xb)),
                            );
                            *acc = _mm512_fmadd_ps(sum, d, *acc);
                        }
                    }
                }
            }
        }
        let both: [__m512; N] = std::array::from_fn(|i| _mm512_add_ps(even[i], odd[i]));
        let offsets = super::avx2::sums4(&offsets);
        for (i, sum) in sums4(&both).into_iter().take(N).enumerate() {
            dots[i] = sum + offsets[i];
        }
    }

    /// `avx2::q6k_row_dots` with 512-bit registers: a run of 16 values is one.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q6_K.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q6k_row_dots<const N: usize>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = super_row_for::<N>(bytes, r, cols, Q6K_BYTES, (x, dots));
        let f16_values = f16_values();
        let mut even = [_mm512_setzero_ps(); N];
        let mut odd = [_mm512_setzero_ps(); N];
        let (low, top, bias) = (
            _mm512_set1_epi32(0x0f),
            _mm512_set1_epi32(0x30),
            _mm512_set1_epi32(32),
        );
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * Q6K_BYTES);
                for ahead in [0, 64, 128, 192] {
                    prefetch_ahead(at.add(ahead));
                }
                let scales = q6k_scales(at, f16_values);
                for half in 0..2 {
                    let (ql, qh) = (at.add(64 * half), at.add(128 + 32 * half));
                    for l in [0, 16] {
                        let sixteen = |p: *const u8| {
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
                        };
                        let (a, b, h) = (
                            sixteen(ql.add(l)),
                            sixteen(ql.add(32 + l)),
                            sixteen(qh.add(l)),
                        );
                        // Bit pair k of h moved to bits 4..6: one shift (none for k = 2),
                        // then masked and merged with the low bits in one ternary operation
                        // (0xF8: low | (high & 0x30)); two ports run all of these.
                        let merge = |low: __m512i, high: __m512i| {
                            _mm512_ternarylogic_epi32::<0xF8>(low, high, top)
                        };
                        let values = [
                            merge(_mm512_and_si512(a, low), _mm512_slli_epi32::<4>(h)),
                            merge(_mm512_and_si512(b, low), _mm512_slli_epi32::<2>(h)),
                            merge(_mm512_srli_epi32::<4>(a), h),
                            merge(_mm512_srli_epi32::<4>(b), _mm512_srli_epi32::<2>(h)),
                        ]
                        .map(|v| _mm512_cvtepi32_ps(_mm512_sub_epi32(v, bias)));
                        for (k, v) in values.iter().enumerate() {
                            let e = 128 * half + 32 * k + l;
                            let d = _mm512_set1_ps(scales[e / 16]);
                            let acc = if k % 2 == 0 { &mut even } else { &mut odd };
                            for (i, acc) in acc.iter_mut().enumerate() {
                                let xv = _mm512_loadu_ps(x.as_ptr().add(i * cols + sb * 256 + e));
                                *acc = _mm512_fmadd_ps(_mm512_mul_ps(*v, xv), d, *acc);
                            }
                        }
                    }
                }
            }
        }
        let both: [__m512; N] = std::array::from_fn(|i| _mm512_add_ps(even[i], odd[i]));
        for (i, sum) in sums4(&both).into_iter().take(N).enumerate() {
            dots[i] = sum;
        }
    }

    /// A Q2_K super-block's sixteen multipliers d·sc and offsets dmin·m as one vector each:
    /// a run's pair is then broadcast by one permute (from arrays, the compiler moved each
    /// value out through general registers, three operations or more apiece).
    ///
    /// # Safety
    /// `block` points at a whole Q2_K super-block.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q2k_scale_vectors(block: *const u8, f16_values: &[f32; 1 << 16]) -> (__m512, __m512) {
        // SAFETY: the scales are the first 16 bytes, d and dmin the last four.
        let (packed, d, min) = unsafe {
            (
                _mm512_cvtepu8_epi32(_mm_loadu_si128(block as *const __m128i)),
                std::ptr::read_unaligned(block.add(80) as *const u16),
                std::ptr::read_unaligned(block.add(82) as *const u16),
            )
        };
        let (d, min) = (f16_values[d as usize], f16_values[min as usize]);
        let sc = _mm512_and_si512(packed, _mm512_set1_epi32(0xF));
        let m = _mm512_srli_epi32::<4>(packed);
        (
            _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sc)),
            _mm512_mul_ps(_mm512_set1_ps(min), _mm512_cvtepi32_ps(m)),
        )
    }

    /// A Q3_K super-block's sixteen multipliers d·(sc - 32) as one vector (see
    /// `q2k_scale_vectors`).
    ///
    /// # Safety
    /// `block` points at a whole Q3_K super-block.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q3k_scale_vector(block: *const u8, f16_values: &[f32; 1 << 16]) -> __m512 {
        // SAFETY: the packed scales are bytes 96..108, d the last two.
        let (packed, d) = unsafe {
            (
                std::ptr::read_unaligned(block.add(96) as *const [u8; 12]),
                std::ptr::read_unaligned(block.add(108) as *const u16),
            )
        };
        let sc = super::super::dequantize::q3k_scales(&packed);
        // SAFETY: `sc` holds 16 bytes.
        let sc = unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(sc.as_ptr() as *const __m128i)) };
        let sc = _mm512_cvtepi32_ps(_mm512_sub_epi32(sc, _mm512_set1_epi32(32)));
        _mm512_mul_ps(_mm512_set1_ps(f16_values[d as usize]), sc)
    }

    /// `avx2::q2k_row_dots` with 512-bit registers: each run of 16 values is one vector.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q2_K.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q2k_row_dots<const N: usize>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = super_row_for::<N>(bytes, r, cols, Q2K_BYTES, (x, dots));
        let f16_values = f16_values();
        let mut sums = [[_mm512_setzero_ps(); 2]; N];
        let three = _mm512_set1_epi32(3);
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * Q2K_BYTES);
                prefetch_ahead(at);
                prefetch_ahead(at.add(64));
                let (scales, offsets) = q2k_scale_vectors(at, f16_values);
                for half in 0..2 {
                    for part in 0..2 {
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                            at.add(16 + 32 * half + 16 * part) as *const __m128i,
                        ));
                        for step in 0..4 {
                            let v = _mm512_and_si512(
                                _mm512_srl_epi32(q, _mm_cvtsi32_si128(2 * step as i32)),
                                three,
                            );
                            let e = 128 * half + 32 * step + 16 * part;
                            let run = _mm512_set1_epi32((e / 16) as i32);
                            let w = _mm512_fmsub_ps(
                                _mm512_cvtepi32_ps(v),
                                _mm512_permutexvar_ps(run, scales),
                                _mm512_permutexvar_ps(run, offsets),
                            );
                            for (i, chains) in sums.iter_mut().enumerate() {
                                let xv = _mm512_loadu_ps(x.as_ptr().add(i * cols + sb * 256 + e));
                                chains[step % 2] = _mm512_fmadd_ps(w, xv, chains[step % 2]);
                            }
                        }
                    }
                }
            }
        }
        two_chain_dots(&sums, dots);
    }

    /// `avx2::q3k_row_dots` with 512-bit registers; the third bits by mask.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` in Q3_K.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q3k_row_dots<const N: usize>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let (row, supers) = super_row_for::<N>(bytes, r, cols, Q3K_BYTES, (x, dots));
        let f16_values = f16_values();
        let mut sums = [[_mm512_setzero_ps(); 2]; N];
        let (three, four) = (_mm512_set1_epi32(3), _mm512_set1_epi32(4));
        for sb in 0..supers {
            // SAFETY: super-block sb of the row, and 256 values of each x_i from sb·256, lie
            // inside the slices checked above.
            unsafe {
                let at = row.as_ptr().add(sb * Q3K_BYTES);
                prefetch_ahead(at);
                prefetch_ahead(at.add(64));
                let scales = q3k_scale_vector(at, f16_values);
                for half in 0..2 {
                    for part in 0..2 {
                        let sixteen = |p: *const u8| {
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
                        };
                        let q = sixteen(at.add(32 + 32 * half + 16 * part));
                        let h = sixteen(at.add(16 * part));
                        for step in 0..4 {
                            let low = _mm512_and_si512(
                                _mm512_srl_epi32(q, _mm_cvtsi32_si128(2 * step as i32)),
                                three,
                            );
                            // Lanes whose third bit is clear lose 4.
                            let bit = _mm512_set1_epi32(1 << (4 * half + step));
                            let clear = _mm512_testn_epi32_mask(h, bit);
                            let v = _mm512_mask_sub_epi32(low, clear, low, four);
                            let e = 128 * half + 32 * step + 16 * part;
                            let run = _mm512_set1_epi32((e / 16) as i32);
                            let w = _mm512_mul_ps(
                                _mm512_cvtepi32_ps(v),
                                _mm512_permutexvar_ps(run, scales),
                            );
                            for (i, chains) in sums.iter_mut().enumerate() {
                                let xv = _mm512_loadu_ps(x.as_ptr().add(i * cols + sb * 256 + e));
                                chains[step % 2] = _mm512_fmadd_ps(w, xv, chains[step % 2]);
                            }
                        }
                    }
                }
            }
        }
        two_chain_dots(&sums, dots);
    }

    /// Sixteen f16 (or, with BF, bf16) values at `at` as f32.
    ///
    /// # Safety
    /// 32 bytes at `at` may be read.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn half16<const BF: bool>(at: *const u8) -> __m512 {
        // SAFETY: the caller's bound.
        let v = unsafe { _mm256_loadu_si256(at as *const __m256i) };
        if BF {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        } else {
            _mm512_cvtph_ps(v)
        }
    }

    /// `avx2::half_row_dots` with 512-bit registers.
    ///
    /// # Safety
    /// As for `row_dots`, with `bytes` f16 or bf16 values.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn half_row_dots<const N: usize, const BF: bool>(
        bytes: &[u8],
        r: usize,
        cols: usize,
        x: &[f32],
        dots: &mut [f32],
    ) {
        let row = half_row_for::<N>(bytes, r, cols, (x, dots));
        let mut sums = [[_mm512_setzero_ps(); 2]; N];
        for c in (0..cols).step_by(BLOCK) {
            // SAFETY: values c..c + 32 of the row (64 bytes) and of each x_i lie inside the
            // slices checked above.
            unsafe {
                let at = row.as_ptr().add(2 * c);
                prefetch_ahead(at);
                let (lo, hi) = (half16::<BF>(at), half16::<BF>(at.add(32)));
                for (i, [even, odd]) in sums.iter_mut().enumerate() {
                    let xc = x.as_ptr().add(i * cols + c);
                    *even = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xc), *even);
                    *odd = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xc.add(16)), *odd);
                }
            }
        }
        two_chain_dots(&sums, dots);
    }

    /// `avx2::two_chain_dots` with 512-bit registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn two_chain_dots<const N: usize>(sums: &[[__m512; 2]; N], dots: &mut [f32]) {
        let both = sums.map(|[even, odd]| _mm512_add_ps(even, odd));
        for (d, sum) in dots.iter_mut().zip(sums4(&both).into_iter().take(N)) {
            *d = sum;
        }
    }

    /// The lane sums of up to four vectors (missing ones count as zero), reduced together, as
    /// `avx2::sums4` does.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn sums4(v: &[__m512]) -> [f32; 4] {
        let at = |i: usize| v.get(i).copied().unwrap_or(_mm512_setzero_ps());
        // Each vector's two 256-bit halves added, then as in AVX2.
        let half = |v: __m512| {
            let v = _mm512_castps_pd(v);
            _mm256_add_ps(
                _mm256_castpd_ps(_mm512_castpd512_pd256(v)),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(v)),
            )
        };
        super::avx2::sums4(&[half(at(0)), half(at(1)), half(at(2)), half(at(3))])
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::dequantize::tests::assert_same_as_candles;
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// The block types of 32 values with register dots (the AVX-512 kernels take their blocks
    /// in pairs, so the tests give them an odd number per row).
    pub(in crate::model) const BLOCKS_OF_32_WITH_DOTS: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    #[test]
    fn register_dequantization_is_bit_identical_to_candles() {
        let kernels: Vec<Kernel> = Kernel::available()
            .into_iter()
            .filter(|k| k.has_avx2())
            .collect();
        if kernels.is_empty() {
            eprintln!("this CPU has no AVX2+FMA+F16C: the register dequantization is not used");
            return;
        }
        let w = Tensor::randn(0f32, 1.0, (16, 256), &Device::Cpu).unwrap();
        for (kernel, dtype) in kernels
            .iter()
            .flat_map(|&k| BLOCKS_OF_32_WITH_DOTS.map(|dtype| (k, dtype)))
        {
            let label = format!("{kernel:?} {dtype:?}, register dequantization");
            assert_same_as_candles(&w, dtype, &label, |blocks, dst, stride| {
                dequantize_blocks_with(kernel, blocks, dtype, dst, stride)
            });
        }
    }

    #[test]
    fn exact_decoding_is_chosen_by_one() {
        let choose = |v: Option<&str>| Activations::from_setting(v.map(String::from));
        assert_eq!(choose(Some("1")), Activations::Exact);
        assert_eq!(choose(Some("0")), Activations::Rounded);
        assert_eq!(choose(None), Activations::Rounded);
        assert_eq!(choose(Some("yes")), Activations::Rounded);
    }

    #[test]
    fn grouped_rows_sum_as_rows_alone() {
        // Rows taken four at a time (one input row) get the bits each gets alone, so a dot does
        // not depend on where chunks and parts' borders fall. 11 rows: two groups in the first
        // chunk of 8, three single rows in the second; 17 blocks, an odd number.
        let (rows, cols) = (11, 17 * 32);
        let kernels: Vec<Kernel> = Kernel::available()
            .into_iter()
            .filter(|k| k.has_avx2())
            .collect();
        let no_plain_path = |_: usize, _: &mut [f32]| unreachable!("every row has a kernel");
        for dtype in BLOCKS_OF_32_WITH_DOTS {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            let data = QTensor::quantize(&w, dtype)
                .unwrap()
                .data()
                .unwrap()
                .to_vec();
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, cols, &Device::Cpu)
                .unwrap()
                .to_vec1()
                .unwrap();
            let row_bytes = data.len() / rows;
            for &kernel in &kernels {
                let part = |bytes, rows| Part {
                    blocks: Some((bytes, dtype)),
                    rows,
                    dequantize_row: &no_plain_path,
                };
                let together = product(&[part(&data, rows)], cols, &x, kernel, Activations::Exact);
                for (r, dot) in together.iter().enumerate() {
                    let bytes = &data[r * row_bytes..(r + 1) * row_bytes];
                    let alone = product(&[part(bytes, 1)], cols, &x, kernel, Activations::Exact)[0];
                    assert_eq!(
                        dot.to_bits(),
                        alone.to_bits(),
                        "{dtype:?}, {kernel:?}, row {r}"
                    );
                }
            }
        }
    }
}
