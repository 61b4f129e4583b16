//! Matrix products whose right operand is made panel by panel: stored weights are dequantized
//! straight into the layout the register kernel reads.
//!
//! Why not the `gemm` crate for these: it packs both operands itself, so a weight tile went
//! through three passes (dequantize, pack, multiply) and the activations were packed again for
//! every tile. At 100 tokens dequantizing, packing and zeroing took 17 % of a salience pass
//! beside 63 % in gemm's kernels. Here the activations are packed once per product, each weight
//! value is written once, into its panel, and the kernel writes the output in place.
//!
//! The scheme is Goto's (as in BLIS): C (m × n) = A (m × k) · B (k × n). A is packed once into
//! panels of `MR` rows. Tasks own strips of output columns; for each depth chunk (about 300, so
//! that a 16-column panel of B stays in L1) a task packs its strip of B and runs the `MR × NR`
//! register kernel over every row panel of A, a block of rows at a time (kept in L2).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::decode_dot::Kernel;
use crate::threads::costliest_first;

/// Rows of A (and C) per register tile.
pub const MR: usize = 6;
/// Columns of B (and C) per register tile: two AVX registers.
pub const NR: usize = 16;
/// Depth chunks aim at this length: a B panel of NR columns is then 20 KB, inside L1.
const DEPTH_TARGET: usize = 320;
/// Widest strip of output columns one task owns.
const STRIP_MAX: usize = 256;
/// Row panels of A run over a strip's B panels together: 144 rows × 320 depth is 180 KB (L2).
const ROW_PANELS_PER_BLOCK: usize = 24;

/// A block of B to pack: depth `k0..k1`, columns `j0..j1`.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub k0: usize,
    pub k1: usize,
    pub j0: usize,
    pub j1: usize,
}

/// The right operand B (k × n) of a product, produced on demand.
pub trait PanelSource: Sync {
    /// Depth chunks start at multiples of this (a quantization block along k).
    fn depth_align(&self) -> usize {
        1
    }

    /// Column strips start at multiples of this (a quantization block along n).
    fn column_align(&self) -> usize {
        1
    }

    /// Writes B[k0..k1, j0..j1] (the span) as panels of `NR` columns: B[k][j] goes to
    /// `((j - j0) / NR) * (k1 - k0) * NR + (k - k0) * NR + (j - j0) % NR`. Lanes past `j1` in
    /// the last panel may be left as they are: the kernel's results there are never stored.
    /// `scratch` is the caller's, kept between calls.
    fn pack(&self, span: Span, dst: &mut [f32], scratch: &mut Vec<f32>);

    /// Asks the CPU to start loading what `pack` will read for the same arguments: called one
    /// pack ahead, so that stored weights (beyond the last-level cache for most models) arrive
    /// during the current chunk's arithmetic instead of stalling the next pack.
    fn prefetch(&self, _span: Span) {}
}

/// Starts loading the cache lines of `bytes` (a hint: no effect on results).
pub fn prefetch_bytes(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes.len()).step_by(64) {
        // SAFETY: a prefetch of an address inside the slice; it never faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(bytes.as_ptr().add(line) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Writes one row of B (columns j0.. of depth `k - k0`) into panels of depth `kl`: the
/// untransposing half of packing.
pub fn row_into_panels(row: &[f32], k: usize, kl: usize, dst: &mut [f32]) {
    for (panel, values) in row.chunks(NR).enumerate() {
        let at = panel * kl * NR + k * NR;
        dst[at..at + values.len()].copy_from_slice(values);
    }
}

/// Writes `width = rows.len() / kl` stored rows of length `kl` as one panel's lanes:
/// `panel[p * NR + lane] = rows[lane * kl + p]` (the transposing half of packing Wᵀ).
pub fn transpose_into_panel(rows: &[f32], kl: usize, panel: &mut [f32], kernel: Kernel) {
    let lanes = rows.len() / kl;
    assert!(lanes <= NR && panel.len() >= kl * NR);
    // Steps 0..whole go through register transposes where the kernel has them; the rest,
    // and every step of a partial panel, one value at a time.
    let mut whole = 0;
    #[cfg(target_arch = "x86_64")]
    if lanes == NR && kernel == Kernel::Avx512 {
        whole = kl / NR * NR;
        let src: [*const f32; NR] = std::array::from_fn(|l| rows[l * kl..].as_ptr());
        for p in (0..whole).step_by(NR) {
            // SAFETY: AVX-512F is there (Kernel::Avx512); every read is inside `rows`
            // (p + 16 <= kl for each lane) and every write inside `panel` (p + 16 <= kl rows
            // of NR).
            unsafe { avx512::transpose_16x16(&src, p, panel[p * NR..].as_mut_ptr()) };
        }
    } else if lanes == NR && kernel.has_avx2() {
        whole = kl / 8 * 8;
        // SAFETY: AVX2 is there; every read is inside `rows` (p + 8 <= kl for each lane) and
        // every write inside `panel` (p + 8 <= kl rows of NR).
        unsafe {
            for half in 0..2 {
                let src: [*const f32; 8] =
                    std::array::from_fn(|l| rows.as_ptr().add((half * 8 + l) * kl));
                for p in (0..whole).step_by(8) {
                    avx2::transpose_8x8(&src, p, panel.as_mut_ptr().add(p * NR + half * 8));
                }
            }
        }
    }
    let _ = kernel;
    for (lane, row) in rows.chunks_exact(kl).enumerate() {
        for (p, &v) in row.iter().enumerate().skip(whole) {
            panel[p * NR + lane] = v;
        }
    }
}

/// The left operand, packed: panel `i` holds rows `i * MR ..` as `k × MR` values, row-minor
/// (`A[i * MR + r][p]` at `p * MR + r`); rows past `m` are zero.
pub struct PackedRows {
    data: Vec<f32>,
    m: usize,
    k: usize,
}

impl PackedRows {
    /// Packs A (m × k), whose rows start `lda` values apart in `a`.
    pub fn new(a: &[f32], lda: usize, m: usize, k: usize) -> PackedRows {
        assert!(
            m == 0 || a.len() >= (m - 1) * lda + k,
            "A is shorter than m rows"
        );
        // Written in parallel without zeroing first (a serial pass over ~1 MB that the second
        // thread would wait for); padding rows are written as zeros.
        let len = m.div_ceil(MR) * MR * k;
        let mut data: Vec<f32> = Vec::with_capacity(len);
        if k > 0 {
            let zeros = vec![0f32; k];
            let kernel = Kernel::best();
            data.spare_capacity_mut()[..len]
                .par_chunks_mut(MR * k)
                .enumerate()
                .for_each(|(i, panel)| {
                    // Rows past m read zeros.
                    let rows: [&[f32]; MR] = std::array::from_fn(|r| match i * MR + r {
                        row if row < m => &a[row * lda..][..k],
                        _ => &zeros,
                    });
                    interleave_rows(kernel, &rows, panel);
                });
        }
        // SAFETY: every one of the `len` values was written above (k > 0), or len is 0.
        unsafe { data.set_len(len) };
        PackedRows { data, m, k }
    }

    /// Packs the m rows (k values each) that `row(i, dst)` makes, writing every value of
    /// `dst`. Each task makes its panel's six rows in a buffer of its own, which is still in
    /// L1 when they are interleaved: the rows are never stored as a matrix and read back, as
    /// `new` would read a producer's output (from L3, most of `new`'s time).
    pub fn from_rows(m: usize, k: usize, row: &RowMaker<'_>) -> PackedRows {
        let mut packed = PackedRows::from_rows_split(m, &[k], row);
        packed.pop().expect("one part")
    }

    /// `from_rows` for rows made whole but multiplied in parts: part j packs columns
    /// `widths[..j].sum()..` of each row, `widths[j]` of them (the rows of stacked weights,
    /// such as gate and up, each against its own stored matrix).
    pub fn from_rows_split(m: usize, widths: &[usize], row: &RowMaker<'_>) -> Vec<PackedRows> {
        let k: usize = widths.iter().sum();
        let panels = m.div_ceil(MR);
        let mut parts: Vec<Vec<f32>> = widths
            .iter()
            .map(|w| Vec::with_capacity(panels * MR * w))
            .collect();
        if k > 0 {
            let kernel = Kernel::best();
            let outs: Vec<SharedOut> = parts
                .iter_mut()
                .map(|p| SharedOut::of_uninit(p.spare_capacity_mut()))
                .collect();
            (0..panels).into_par_iter().for_each(|i| {
                ROWS.with(|rows| {
                    let mut rows = rows.borrow_mut();
                    rows.resize(MR * k, 0.0);
                    for (r, dst) in rows.chunks_exact_mut(k).enumerate() {
                        match i * MR + r {
                            // SAFETY: f32 and MaybeUninit<f32> share a layout, and the maker
                            // writes only values.
                            at if at < m => row(at, unsafe {
                                &mut *(dst as *mut [f32] as *mut [MaybeUninit<f32>])
                            }),
                            _ => dst.fill(0.0),
                        }
                    }
                    let mut c0 = 0;
                    for (&w, out) in widths.iter().zip(&outs) {
                        if w > 0 {
                            let part: [&[f32]; MR] =
                                std::array::from_fn(|r| &rows[r * k + c0..][..w]);
                            assert!(out.len() >= (i + 1) * MR * w, "a part's panels fit it");
                            // SAFETY: panel i of the part lies inside its buffer (asserted)
                            // and only this task writes it.
                            let panel = unsafe {
                                std::slice::from_raw_parts_mut(
                                    out.get().add(i * MR * w) as *mut MaybeUninit<f32>,
                                    MR * w,
                                )
                            };
                            interleave_rows(kernel, &part, panel);
                        }
                        c0 += w;
                    }
                })
            });
        }
        parts
            .into_iter()
            .zip(widths)
            .map(|(mut data, &w)| {
                // SAFETY: every panel of every part was written above, or the part is 0
                // values wide (every part is when k is 0).
                unsafe { data.set_len(panels * MR * w) };
                PackedRows { data, m, k: w }
            })
            .collect()
    }

    /// Row panel `i`'s values for depth `k0..`.
    fn panel(&self, i: usize, k0: usize) -> &[f32] {
        &self.data[i * MR * self.k + k0 * MR..(i + 1) * MR * self.k]
    }
}

/// Makes row `i` of a matrix into `dst` (its whole row, every value written).
pub type RowMaker<'a> = dyn Fn(usize, &mut [MaybeUninit<f32>]) + Sync + 'a;

thread_local! {
    /// `PackedRows::from_rows`'s six rows, made before they are interleaved.
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// One panel of A: `panel[p * MR + r] = rows[r][p]` for every step `p` of the rows (each
/// row's length; `panel` holds MR values per step).
pub(super) fn interleave_rows(kernel: Kernel, rows: &[&[f32]; MR], panel: &mut [MaybeUninit<f32>]) {
    let k = rows[0].len();
    assert!(
        rows.iter().all(|r| r.len() == k) && panel.len() == MR * k,
        "a panel of A is MR rows of one length"
    );
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 {
        // SAFETY: AVX-512F is there (Kernel::Avx512); the lengths were checked above.
        done = unsafe { avx512::interleave_six(rows, panel.as_mut_ptr().cast()) };
    } else if kernel == Kernel::Avx2 {
        // SAFETY: AVX2 is there (Kernel::Avx2); the lengths were checked above.
        done = unsafe { avx2::interleave_six(rows, panel.as_mut_ptr().cast()) };
    }
    let _ = kernel;
    // The six rows step together, each step's values written side by side (column by column
    // was twice as slow: six strided passes over the panel).
    for (p, step) in panel.chunks_exact_mut(MR).enumerate().skip(done) {
        for (v, row) in step.iter_mut().zip(rows) {
            v.write(row[p]);
        }
    }
}

/// C = A · B, or C += A · B with `accumulate`, for C (m × n) whose rows start `ldc` values
/// apart in `c`. Runs on rayon's pool.
pub fn product(
    a: &PackedRows,
    b: &dyn PanelSource,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    kernel: Kernel,
) {
    let out = SharedOut::of(c);
    // SAFETY: C is initialized, so accumulating reads are fine.
    unsafe { run(a, b, n, out, ldc, accumulate, kernel) }
}

/// C = A · B into memory not yet written: every C[i][j] (i < m, j < n) is written, nothing
/// else; no zeroing pass before.
pub fn product_uninit(
    a: &PackedRows,
    b: &dyn PanelSource,
    n: usize,
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    kernel: Kernel,
) {
    let out = SharedOut::of_uninit(c);
    // SAFETY: without accumulation C is only written.
    unsafe { run(a, b, n, out, ldc, false, kernel) }
}

/// A buffer of `len` values not yet written, for `product_uninit`.
pub fn uninit(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit values need no initialization.
    unsafe { v.set_len(len) };
    v
}

/// The values of a buffer from `uninit`.
///
/// # Safety
/// Every value was written.
pub unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same layout (MaybeUninit<f32> is repr(transparent)), same allocation; the caller
    // vouches for the values.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut f32, v.len(), v.capacity()) }
}

// Per-thread buffers of the products: packed B and the source's scratch. Reused from one
// product to the next (allocating and zeroing ~300 KB per task cost more than the packing).
thread_local! {
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// # Safety
/// `out`'s values are valid for writes, and for reads where `accumulate`.
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    a: &PackedRows,
    b: &dyn PanelSource,
    n: usize,
    out: SharedOut,
    ldc: usize,
    accumulate: bool,
    kernel: Kernel,
) {
    let part = ColumnPart {
        source: b,
        columns: n,
        at: 0,
    };
    // SAFETY: as the caller's.
    unsafe { run_parts(a, &[part], out, ldc, accumulate, kernel) }
}

/// Columns `at..at + columns` of C, the product of A with `source`.
pub struct ColumnPart<'a> {
    pub source: &'a dyn PanelSource,
    pub columns: usize,
    pub at: usize,
}

/// C = A · [B₁ B₂ …] for C (m × Σ columns) whose rows start `ldc` values apart in `c`: the
/// parts side by side (q, k and v; gate and up), each stored on its own. One product: their
/// column strips go to the threads together, as one list (three products of their own each
/// ended with a thread waiting for the other).
pub fn product_of_parts_uninit(
    a: &PackedRows,
    parts: &[ColumnPart],
    c: &mut [MaybeUninit<f32>],
    ldc: usize,
    kernel: Kernel,
) {
    let out = SharedOut::of_uninit(c);
    // SAFETY: without accumulation C is only written.
    unsafe { run_parts(a, parts, out, ldc, false, kernel) }
}

/// One part's plan: its depth chunks and column strips.
struct PartPlan {
    chunks: Vec<(usize, usize)>,
    strips: Vec<(usize, usize)>,
    out: SharedOut,
}

/// # Safety
/// As `run`; the parts' columns lie inside C's rows and do not overlap.
unsafe fn run_parts(
    a: &PackedRows,
    parts: &[ColumnPart],
    out: SharedOut,
    ldc: usize,
    accumulate: bool,
    kernel: Kernel,
) {
    let (m, k) = (a.m, a.k);
    let n = parts.iter().map(|p| p.at + p.columns).max().unwrap_or(0);
    if m == 0 || n == 0 {
        return;
    }
    assert!(out.len() >= (m - 1) * ldc + n, "C is shorter than m rows");
    if k == 0 {
        if !accumulate {
            for p in parts {
                for row in 0..m {
                    for j in p.at..p.at + p.columns {
                        out.get().add(row * ldc + j).write(0.0);
                    }
                }
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let plans: Vec<PartPlan> = parts
        .iter()
        .map(|p| PartPlan {
            chunks: depth_chunks(k, p.source.depth_align()),
            strips: column_strips(p.columns, p.source.column_align(), threads),
            out: SharedOut(out.get().wrapping_add(p.at), out.len().saturating_sub(p.at)),
        })
        .collect();
    let buffer_len = plans
        .iter()
        .map(|plan| {
            let deepest = plan.chunks.iter().map(|&(k0, k1)| k1 - k0).max();
            let widest = plan.strips.iter().map(|&(j0, j1)| j1 - j0).max();
            deepest.unwrap_or(0) * widest.unwrap_or(0).div_ceil(NR) * NR
        })
        .max()
        .unwrap_or(0);
    let row_panels = m.div_ceil(MR);
    let tasks: Vec<(usize, usize)> = plans
        .iter()
        .enumerate()
        .flat_map(|(pi, plan)| (0..plan.strips.len()).map(move |si| (pi, si)))
        .collect();
    let width = |&(pi, si): &(usize, usize)| plans[pi].strips[si].1 - plans[pi].strips[si].0;
    let one_task = |(pi, si): (usize, usize)| {
        let PartPlan {
            chunks,
            strips,
            out,
        } = &plans[pi];
        let (b, out) = (parts[pi].source, *out);
        BUFFERS.with(|buffers| {
            // A task never runs inside another on the same thread (packing does not wait on
            // rayon), so the borrow is free; fresh buffers if that ever changes.
            let mut own = (Vec::new(), Vec::new());
            let mut guard = buffers.try_borrow_mut();
            let (packed_b, scratch) = match guard.as_deref_mut() {
                Ok(pair) => pair,
                Err(_) => &mut own,
            };
            if packed_b.len() < buffer_len {
                packed_b.resize(buffer_len, 0.0);
            }
            let (j0, j1) = strips[si];
            let panels = (j1 - j0).div_ceil(NR);
            for (ci, &(k0, k1)) in chunks.iter().enumerate() {
                let kl = k1 - k0;
                b.pack(
                    Span { k0, k1, j0, j1 },
                    &mut packed_b[..panels * kl * NR],
                    scratch,
                );
                // The next pack: this strip's next chunk, else the next strip's first.
                let next = match chunks.get(ci + 1) {
                    Some(&depth) => Some((depth, (j0, j1))),
                    None => strips.get(si + 1).map(|&strip| (chunks[0], strip)),
                };
                if let Some(((k0, k1), (j0, j1))) = next {
                    b.prefetch(Span { k0, k1, j0, j1 });
                }
                let add = accumulate || k0 > 0;
                for first in (0..row_panels).step_by(ROW_PANELS_PER_BLOCK) {
                    let last = (first + ROW_PANELS_PER_BLOCK).min(row_panels);
                    #[cfg(target_arch = "x86_64")]
                    if kernel == Kernel::Avx512 {
                        let strip = Strip {
                            b: &packed_b[..panels * kl * NR],
                            kl,
                            j0,
                            j1,
                        };
                        // SAFETY: AVX-512F is there (Kernel::Avx512); the tiles lie inside C
                        // as below.
                        unsafe { avx512::rows_by_strip(a, k0, first..last, strip, out, ldc, add) };
                        continue;
                    }
                    for jp in 0..panels {
                        let bp = &packed_b[jp * kl * NR..(jp + 1) * kl * NR];
                        let col = j0 + jp * NR;
                        let cols = NR.min(j1 - col);
                        for ip in first..last {
                            let rows = MR.min(m - ip * MR);
                            // SAFETY: tile (ip, col) lies inside C (rows < m, columns < n),
                            // only this strip's task writes its columns, and the first chunk
                            // writes before later ones read.
                            unsafe {
                                let dst = out.get().add(ip * MR * ldc + col);
                                tile(kernel, kl, a.panel(ip, k0), bp, dst, ldc, rows, cols, add);
                            }
                        }
                    }
                }
            }
        })
    };
    if parts.len() == 1 {
        // In order: each strip's task prefetches the next strip's first chunk.
        tasks.into_par_iter().for_each(one_task);
    } else {
        costliest_first(tasks, width, one_task);
    }
}

/// Depth ranges of about `DEPTH_TARGET`, each starting at a multiple of `align`.
fn depth_chunks(k: usize, align: usize) -> Vec<(usize, usize)> {
    let align = align.max(1);
    assert!(
        k.is_multiple_of(align),
        "depth {k} is not a multiple of its block {align}"
    );
    let count = k.div_ceil(DEPTH_TARGET);
    let len = (k.div_ceil(count) / align * align).max(align);
    (0..k)
        .step_by(len)
        .map(|k0| (k0, (k0 + len).min(k)))
        .collect()
}

/// Column ranges for the tasks: whole units of `NR` columns and `align`, at most `STRIP_MAX`
/// wide where the units allow, in a number that the threads share evenly.
fn column_strips(n: usize, align: usize, threads: usize) -> Vec<(usize, usize)> {
    let unit = lcm(NR, align.max(1));
    let units = n.div_ceil(unit);
    let per_task = (STRIP_MAX / unit).max(1);
    let threads = threads.max(1);
    let tasks = units.div_ceil(per_task).div_ceil(threads) * threads;
    let tasks = tasks.min(units);
    (0..tasks)
        .map(|t| {
            (
                t * units / tasks * unit,
                ((t + 1) * units / tasks * unit).min(n),
            )
        })
        .filter(|(j0, j1)| j0 < j1)
        .collect()
}

fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// A task's packed strip of B for one depth chunk: `kl` deep, columns `j0..j1` as panels.
#[derive(Clone, Copy)]
struct Strip<'a> {
    b: &'a [f32],
    kl: usize,
    j0: usize,
    j1: usize,
}

/// An output that parallel tasks write, each its own part (the product's column strips,
/// attention's rows): its start and length.
#[derive(Clone, Copy)]
pub(super) struct SharedOut(*mut f32, usize);
// SAFETY: tasks write disjoint parts of the output through it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    pub(super) fn of(values: &mut [f32]) -> SharedOut {
        SharedOut(values.as_mut_ptr(), values.len())
    }

    pub(super) fn of_uninit(values: &mut [MaybeUninit<f32>]) -> SharedOut {
        SharedOut(values.as_mut_ptr().cast(), values.len())
    }

    fn get(self) -> *mut f32 {
        self.0
    }

    fn len(self) -> usize {
        self.1
    }

    /// Writes `values` from position `at` on.
    ///
    /// # Safety
    /// No other thread reads or writes those positions meanwhile.
    pub(super) unsafe fn write(self, at: usize, values: &[f32]) {
        assert!(at + values.len() <= self.1, "write past the output's end");
        // SAFETY: inside the output (asserted); the caller owns these positions.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len()) }
    }
}

/// One register tile: C[..rows, ..cols] (=|+=) a · b, for `a` an MR-row panel and `b` an
/// NR-column panel of depth `kl`.
///
/// # Safety
/// `c` points at a `rows × cols` block of rows `ldc` apart that the caller may write.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    kernel: Kernel,
    kl: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    debug_assert!(a.len() >= kl * MR && b.len() >= kl * NR);
    if rows == MR && cols == NR {
        return register_tile(kernel, kl, a, b, c, ldc, accumulate);
    }
    // An edge: the whole tile into a buffer, then the part that exists.
    let mut full = [0f32; MR * NR];
    register_tile(kernel, kl, a, b, full.as_mut_ptr(), NR, false);
    for r in 0..rows {
        for j in 0..cols {
            let dst = c.add(r * ldc + j);
            *dst = if accumulate {
                *dst + full[r * NR + j]
            } else {
                full[r * NR + j]
            };
        }
    }
}

/// # Safety
/// As `tile`, for a whole `MR × NR` block.
unsafe fn register_tile(
    kernel: Kernel,
    kl: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx2 {
        return avx2::register_tile(kl, a.as_ptr(), b.as_ptr(), c, ldc, accumulate);
    }
    let _ = kernel;
    portable_register_tile(kl, a, b, c, ldc, accumulate)
}

/// # Safety
/// As `register_tile`.
unsafe fn portable_register_tile(
    kl: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a[..kl * MR]
        .chunks_exact(MR)
        .zip(b[..kl * NR].chunks_exact(NR))
    {
        for (row, &av) in acc.iter_mut().zip(ap) {
            for (s, &bv) in row.iter_mut().zip(bp) {
                *s += av * bv;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            let dst = c.add(r * ldc + j);
            *dst = if accumulate { *dst + v } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::*;

    /// Twelve accumulators (6 rows × 2 registers of 8 columns), two B loads and six
    /// broadcasts of A per step of depth: 12 FMAs for 8 loads.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a` holds `kl * MR` values, `b` `kl * NR`, and `c` is as in
    /// `tile`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn register_tile(
        kl: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for p in 0..kl {
            let b0 = _mm256_loadu_ps(b.add(p * NR));
            let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
            let ap = a.add(p * MR);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*ap.add(r));
                row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                row[1] = _mm256_fmadd_ps(av, b1, row[1]);
            }
        }
        for (r, row) in acc.iter().enumerate() {
            let dst = c.add(r * ldc);
            let (mut lo, mut hi) = (row[0], row[1]);
            if accumulate {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(dst));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(dst.add(8)));
            }
            _mm256_storeu_ps(dst, lo);
            _mm256_storeu_ps(dst.add(8), hi);
        }
    }

    /// Columns `p..p + 8` of the eight rows `src` become rows `p..p + 8` of eight lanes at
    /// `dst` (rows NR apart).
    ///
    /// # Safety
    /// AVX2; each `src[l].add(p + 8)` and `dst.add(7 * NR + 8)` stay inside their buffers.
    #[target_feature(enable = "avx2")]
    pub(in crate::model) unsafe fn transpose_8x8(src: &[*const f32; 8], p: usize, dst: *mut f32) {
        let r: [__m256; 8] = std::array::from_fn(|l| _mm256_loadu_ps(src[l].add(p)));
        for (i, o) in transposed(r).iter().enumerate() {
            _mm256_storeu_ps(dst.add(i * NR), *o);
        }
    }

    /// `interleave_rows` eight steps at a time: the six rows' next eight values each,
    /// transposed, each step's six values stored with two lanes to spare, which the next
    /// step's store overwrites. Returns the steps written (all but the last one to nine); the
    /// caller writes the rest.
    ///
    /// # Safety
    /// AVX2; the six rows have one length k, `panel` room for MR * k values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn interleave_six(rows: &[&[f32]; MR], panel: *mut f32) -> usize {
        let k = rows[0].len();
        let zero = _mm256_setzero_ps();
        let mut p = 0;
        // The block's last store reaches two values into step p + 8, which must exist.
        while p + 9 <= k {
            let r: [__m256; 8] = std::array::from_fn(|l| match l {
                l if l < MR => _mm256_loadu_ps(rows[l].as_ptr().add(p)),
                _ => zero,
            });
            for (i, o) in transposed(r).iter().enumerate() {
                _mm256_storeu_ps(panel.add((p + i) * MR), *o);
            }
            p += 8;
        }
        p
    }

    /// The 8 × 8 transpose of eight registers: out[i] lane l = r[l] lane i.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transposed(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::ops::Range;

    use super::*;

    /// C (rows of `row_panels`, the strip's columns) (=|+=) A · B, in tiles of two row panels
    /// by two column panels (12 × 32): 24 accumulators, two B loads and twelve broadcasts of A
    /// per step of depth. The pair of A panels (15 KB) stays in L1 while the strip's panels
    /// stream from L2, as in BLIS's kernels for these CPUs.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out` is C as in `run`, whose tiles in these rows and the strip's
    /// columns only this task writes.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows_by_strip(
        a: &PackedRows,
        k0: usize,
        row_panels: Range<usize>,
        strip: Strip,
        out: SharedOut,
        ldc: usize,
        add: bool,
    ) {
        let Strip { b, kl, j0, j1 } = strip;
        let panels = (j1 - j0).div_ceil(NR);
        let end = row_panels.end;
        for ip in row_panels.step_by(2) {
            let two_rows = ip + 1 < end;
            let rows = (a.m - ip * MR).min(if two_rows { 2 * MR } else { MR });
            let a0 = a.panel(ip, k0).as_ptr();
            let a1 = if two_rows {
                a.panel(ip + 1, k0).as_ptr()
            } else {
                a0
            };
            for jp in (0..panels).step_by(2) {
                let two_cols = jp + 1 < panels;
                let col = j0 + jp * NR;
                let cols = (j1 - col).min(if two_cols { 2 * NR } else { NR });
                let b0 = b[jp * kl * NR..].as_ptr();
                let b1 = if two_cols { b0.add(kl * NR) } else { b0 };
                let c = out.get().add(ip * MR * ldc + col);
                let at = Tile {
                    c,
                    ldc,
                    rows,
                    cols,
                    add,
                };
                match (two_rows, two_cols) {
                    (true, true) => store(&pair_by_pair(kl, [a0, a1], [b0, b1]), at),
                    (true, false) => tile::<2, 1>(kl, [a0, a1], [b0], at),
                    (false, true) => tile::<1, 2>(kl, [a0], [b0, b1], at),
                    (false, false) => tile::<1, 1>(kl, [a0], [b0], at),
                }
            }
        }
    }

    /// Pair streams in step order: unpacklo holds steps 4L, 4L + 1 of 128-bit lane L as its
    /// qwords 2L, 2L + 1, unpackhi (indices 8..) steps 4L + 2, 4L + 3. Row h: steps 8h.. 8h + 8.
    const STEP_ORDER: [[i64; 8]; 2] = {
        let mut out = [[0; 8]; 2];
        let mut s = 0;
        while s < 16 {
            let (lane, j) = (s as i64 / 4, s as i64 % 4);
            out[s / 8][s % 8] = if j < 2 {
                2 * lane + j
            } else {
                8 + 2 * lane + j - 2
            };
            s += 1;
        }
        out
    };

    /// Output register o of a half (8 steps, 24 pairs) holds pairs q = 8o..8o + 8, pair q being
    /// step q / 3 of stream q % 3: streams 0 and 1 by one two-source permute (`FIRST_TWO`),
    /// stream 2 (`STEP_OF`, in the lanes of `THIRD`) merged over it.
    const FIRST_TWO: [[i64; 8]; 3] = pair_table(true);
    const STEP_OF: [[i64; 8]; 3] = pair_table(false);
    const THIRD: [u8; 3] = {
        let mut out = [0u8; 3];
        let mut q = 0;
        while q < 24 {
            if q % 3 == 2 {
                out[q / 8] |= 1 << (q % 8);
            }
            q += 1;
        }
        out
    };

    const fn pair_table(first_two: bool) -> [[i64; 8]; 3] {
        let mut out = [[0; 8]; 3];
        let mut q = 0;
        while q < 24 {
            let step = (q / 3) as i64;
            out[q / 8][q % 8] = match (first_two, q % 3) {
                (false, _) => step,
                (true, 0) => step,
                (true, 1) => 8 + step,
                (true, _) => 0,
            };
            q += 1;
        }
        out
    }

    /// `interleave_rows` sixteen steps at a time: each row pair interleaved into 64-bit pairs,
    /// each pair stream put in step order, then every output register picks its pairs from the
    /// three streams. The plain loop compiled to 128-bit shuffles: 3.0 % of a salience pass at
    /// 300 tokens in `perf`, against 2.3 % this way, where the rows' loads take most of it (A
    /// mostly comes from L3). Returns the steps written (a multiple of 16); the caller writes
    /// the rest.
    ///
    /// # Safety
    /// AVX-512F; the six rows have one length k, `panel` room for MR * k values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interleave_six(rows: &[&[f32]; MR], panel: *mut f32) -> usize {
        let load = |v: &[i64; 8]| _mm512_loadu_si512(v.as_ptr().cast());
        let (early, late) = (load(&STEP_ORDER[0]), load(&STEP_ORDER[1]));
        let pick: [(__m512i, __m512i, __mmask8); 3] =
            std::array::from_fn(|o| (load(&FIRST_TWO[o]), load(&STEP_OF[o]), THIRD[o]));
        let k = rows[0].len();
        let whole = k / 16 * 16;
        for p in (0..whole).step_by(16) {
            let r: [__m512; MR] = std::array::from_fn(|i| _mm512_loadu_ps(rows[i].as_ptr().add(p)));
            let lo: [__m512d; 3] = std::array::from_fn(|c| {
                _mm512_castps_pd(_mm512_unpacklo_ps(r[2 * c], r[2 * c + 1]))
            });
            let hi: [__m512d; 3] = std::array::from_fn(|c| {
                _mm512_castps_pd(_mm512_unpackhi_ps(r[2 * c], r[2 * c + 1]))
            });
            for (h, order) in [early, late].into_iter().enumerate() {
                let s: [__m512d; 3] =
                    std::array::from_fn(|c| _mm512_permutex2var_pd(lo[c], order, hi[c]));
                for (o, &(first_two, step, third)) in pick.iter().enumerate() {
                    let two = _mm512_permutex2var_pd(s[0], first_two, s[1]);
                    let all = _mm512_mask_permutexvar_pd(two, third, step, s[2]);
                    let at = panel.add(p * MR + h * 8 * MR + o * 16);
                    _mm512_storeu_ps(at, _mm512_castpd_ps(all));
                }
            }
        }
        whole
    }

    /// dst[i * NR + l] = src[l][p + i] for 16 lanes and 16 steps: four rounds of shuffles,
    /// pairs of rows, then of pairs, then 128-bit quarters twice.
    ///
    /// # Safety
    /// AVX-512F; each `src[l]` has 16 values from `p`, `dst` room for 16 rows of NR.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_16x16(src: &[*const f32; NR], p: usize, dst: *mut f32) {
        let r: [__m512; NR] = std::array::from_fn(|l| _mm512_loadu_ps(src[l].add(p)));
        // Rows 2j, 2j + 1 interleaved: t[2j] holds steps 0, 1 (of each quarter), t[2j + 1]
        // steps 2, 3.
        let t: [__m512; NR] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_ps(a, b)
            } else {
                _mm512_unpackhi_ps(a, b)
            }
        });
        // u[4g + c]: step c of each quarter (c, c + 4, c + 8, c + 12), rows 4g..4g + 4.
        let u: [__m512; NR] = std::array::from_fn(|i| {
            let (g, c) = (i / 4, i % 4);
            let (a, b) = (
                _mm512_castps_pd(t[4 * g + c / 2]),
                _mm512_castps_pd(t[4 * g + 2 + c / 2]),
            );
            _mm512_castpd_ps(if c % 2 == 0 {
                _mm512_unpacklo_pd(a, b)
            } else {
                _mm512_unpackhi_pd(a, b)
            })
        });
        for c in 0..4 {
            // Rows 0..8: steps c and c + 8 (0x88), c + 4 and c + 12 (0xDD); rows 8..16 alike.
            let v_lo = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let v_hi = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
            let w_lo = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let w_hi = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
            let out = [
                (c, _mm512_shuffle_f32x4::<0x88>(v_lo, w_lo)),
                (c + 8, _mm512_shuffle_f32x4::<0xDD>(v_lo, w_lo)),
                (c + 4, _mm512_shuffle_f32x4::<0x88>(v_hi, w_hi)),
                (c + 12, _mm512_shuffle_f32x4::<0xDD>(v_hi, w_hi)),
            ];
            for (step, v) in out {
                _mm512_storeu_ps(dst.add(step * NR), v);
            }
        }
    }

    /// One step of depth for the 12 × 32 kernel, its A values `$a` bytes and its B values `$b`
    /// bytes past the current pointers: two B vectors, then each of the twelve rows' A value
    /// broadcast (alternating two registers) and multiplied into that row's pair of sums
    /// (zmm0..zmm23, row r in zmm(2r) and zmm(2r + 1)).
    macro_rules! step_12x32 {
        ($a:literal, $b:literal) => {
            concat!(
                "vmovups zmm30, [{b0} + ",
                $b,
                "]\n",
                "vmovups zmm31, [{b1} + ",
                $b,
                "]\n",
                "vbroadcastss zmm28, dword ptr [{a0} + ",
                $a,
                "]\n",
                "vfmadd231ps zmm0, zmm28, zmm30\n",
                "vfmadd231ps zmm1, zmm28, zmm31\n",
                "vbroadcastss zmm29, dword ptr [{a0} + ",
                $a,
                " + 4]\n",
                "vfmadd231ps zmm2, zmm29, zmm30\n",
                "vfmadd231ps zmm3, zmm29, zmm31\n",
                "vbroadcastss zmm28, dword ptr [{a0} + ",
                $a,
                " + 8]\n",
                "vfmadd231ps zmm4, zmm28, zmm30\n",
                "vfmadd231ps zmm5, zmm28, zmm31\n",
                "vbroadcastss zmm29, dword ptr [{a0} + ",
                $a,
                " + 12]\n",
                "vfmadd231ps zmm6, zmm29, zmm30\n",
                "vfmadd231ps zmm7, zmm29, zmm31\n",
                "vbroadcastss zmm28, dword ptr [{a0} + ",
                $a,
                " + 16]\n",
                "vfmadd231ps zmm8, zmm28, zmm30\n",
                "vfmadd231ps zmm9, zmm28, zmm31\n",
                "vbroadcastss zmm29, dword ptr [{a0} + ",
                $a,
                " + 20]\n",
                "vfmadd231ps zmm10, zmm29, zmm30\n",
                "vfmadd231ps zmm11, zmm29, zmm31\n",
                "vbroadcastss zmm28, dword ptr [{a1} + ",
                $a,
                "]\n",
                "vfmadd231ps zmm12, zmm28, zmm30\n",
                "vfmadd231ps zmm13, zmm28, zmm31\n",
                "vbroadcastss zmm29, dword ptr [{a1} + ",
                $a,
                " + 4]\n",
                "vfmadd231ps zmm14, zmm29, zmm30\n",
                "vfmadd231ps zmm15, zmm29, zmm31\n",
                "vbroadcastss zmm28, dword ptr [{a1} + ",
                $a,
                " + 8]\n",
                "vfmadd231ps zmm16, zmm28, zmm30\n",
                "vfmadd231ps zmm17, zmm28, zmm31\n",
                "vbroadcastss zmm29, dword ptr [{a1} + ",
                $a,
                " + 12]\n",
                "vfmadd231ps zmm18, zmm29, zmm30\n",
                "vfmadd231ps zmm19, zmm29, zmm31\n",
                "vbroadcastss zmm28, dword ptr [{a1} + ",
                $a,
                " + 16]\n",
                "vfmadd231ps zmm20, zmm28, zmm30\n",
                "vfmadd231ps zmm21, zmm28, zmm31\n",
                "vbroadcastss zmm29, dword ptr [{a1} + ",
                $a,
                " + 20]\n",
                "vfmadd231ps zmm22, zmm29, zmm30\n",
                "vfmadd231ps zmm23, zmm29, zmm31\n",
            )
        };
    }

    /// The 12 × 32 tile of two row panels by two column panels, as `tile::<2, 2>` computes
    /// it (the same products summed in the same order, so the same bits), in assembly: the
    /// compiler's loop kept one step per iteration with its pointer updates and branch
    /// beside the 24 multiply-adds, while this one takes four steps per iteration. In place
    /// in a product it ran 268 → 281 GFLOP/s on two cores (620 × 576 · 576 × 3072).
    ///
    /// # Safety
    /// AVX-512F; each `a` panel holds `kl` steps of MR values, each `b` panel `kl` steps of
    /// NR.
    #[target_feature(enable = "avx512f")]
    unsafe fn pair_by_pair(
        kl: usize,
        a: [*const f32; 2],
        b: [*const f32; 2],
    ) -> [[[__m512; 2]; MR]; 2] {
        // Left uninitialized: the assembly writes all 24 registers here. Zeroed first, it was a
        // call to memset of 1.5 KB per tile (3–6 % of a salience pass in `perf`).
        let mut sums = std::mem::MaybeUninit::<[[[__m512; 2]; MR]; 2]>::uninit();
        std::arch::asm!(
            "vpxord zmm0, zmm0, zmm0",
            "vpxord zmm1, zmm1, zmm1",
            "vpxord zmm2, zmm2, zmm2",
            "vpxord zmm3, zmm3, zmm3",
            "vpxord zmm4, zmm4, zmm4",
            "vpxord zmm5, zmm5, zmm5",
            "vpxord zmm6, zmm6, zmm6",
            "vpxord zmm7, zmm7, zmm7",
            "vpxord zmm8, zmm8, zmm8",
            "vpxord zmm9, zmm9, zmm9",
            "vpxord zmm10, zmm10, zmm10",
            "vpxord zmm11, zmm11, zmm11",
            "vpxord zmm12, zmm12, zmm12",
            "vpxord zmm13, zmm13, zmm13",
            "vpxord zmm14, zmm14, zmm14",
            "vpxord zmm15, zmm15, zmm15",
            "vpxord zmm16, zmm16, zmm16",
            "vpxord zmm17, zmm17, zmm17",
            "vpxord zmm18, zmm18, zmm18",
            "vpxord zmm19, zmm19, zmm19",
            "vpxord zmm20, zmm20, zmm20",
            "vpxord zmm21, zmm21, zmm21",
            "vpxord zmm22, zmm22, zmm22",
            "vpxord zmm23, zmm23, zmm23",
            "test {fours}, {fours}",
            "jz 3f",
            "2:",
            step_12x32!("0", "0"),
            step_12x32!("24", "64"),
            step_12x32!("48", "128"),
            step_12x32!("72", "192"),
            "add {a0}, 96",
            "add {a1}, 96",
            "add {b0}, 256",
            "add {b1}, 256",
            "dec {fours}",
            "jnz 2b",
            "3:",
            "test {ones}, {ones}",
            "jz 5f",
            "4:",
            step_12x32!("0", "0"),
            "add {a0}, 24",
            "add {a1}, 24",
            "add {b0}, 64",
            "add {b1}, 64",
            "dec {ones}",
            "jnz 4b",
            "5:",
            "vmovups [{out}], zmm0",
            "vmovups [{out} + 64], zmm1",
            "vmovups [{out} + 128], zmm2",
            "vmovups [{out} + 192], zmm3",
            "vmovups [{out} + 256], zmm4",
            "vmovups [{out} + 320], zmm5",
            "vmovups [{out} + 384], zmm6",
            "vmovups [{out} + 448], zmm7",
            "vmovups [{out} + 512], zmm8",
            "vmovups [{out} + 576], zmm9",
            "vmovups [{out} + 640], zmm10",
            "vmovups [{out} + 704], zmm11",
            "vmovups [{out} + 768], zmm12",
            "vmovups [{out} + 832], zmm13",
            "vmovups [{out} + 896], zmm14",
            "vmovups [{out} + 960], zmm15",
            "vmovups [{out} + 1024], zmm16",
            "vmovups [{out} + 1088], zmm17",
            "vmovups [{out} + 1152], zmm18",
            "vmovups [{out} + 1216], zmm19",
            "vmovups [{out} + 1280], zmm20",
            "vmovups [{out} + 1344], zmm21",
            "vmovups [{out} + 1408], zmm22",
            "vmovups [{out} + 1472], zmm23",
            a0 = inout(reg) a[0] => _,
            a1 = inout(reg) a[1] => _,
            b0 = inout(reg) b[0] => _,
            b1 = inout(reg) b[1] => _,
            fours = inout(reg) kl / 4 => _,
            ones = inout(reg) kl % 4 => _,
            out = in(reg) sums.as_mut_ptr(),
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
            out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
            out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
            out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
            out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm28") _, out("zmm29") _, out("zmm30") _, out("zmm31") _,
            options(nostack),
        );
        // SAFETY: the stores above wrote every one of the 24 registers' 1536 bytes.
        unsafe { sums.assume_init() }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The assembly kernel against the compiled one, bit for bit, at depths with and
        /// without a remainder of the four-step loop (and none at all).
        #[test]
        fn the_assembly_tile_sums_as_the_compiled_one() {
            if !std::is_x86_feature_detected!("avx512f") {
                eprintln!("no AVX-512 on this CPU: the assembly tile cannot run here");
                return;
            }
            for kl in [0, 1, 3, 4, 5, 37, 320] {
                let a: Vec<f32> = (0..2 * kl * MR).map(|i| (i as f32 * 0.37).sin()).collect();
                let b: Vec<f32> = (0..2 * kl * NR).map(|i| (i as f32 * 0.11).cos()).collect();
                let (a0, a1) = (a.as_ptr(), a[kl * MR..].as_ptr());
                let (b0, b1) = (b.as_ptr(), b[kl * NR..].as_ptr());
                let mut want = vec![0f32; 12 * 32];
                let mut got = vec![0f32; 12 * 32];
                let at = |c: &mut Vec<f32>| Tile {
                    c: c.as_mut_ptr(),
                    ldc: 32,
                    rows: 12,
                    cols: 32,
                    add: false,
                };
                // SAFETY: AVX-512F is there; the panels hold kl steps; C is 12 × 32.
                unsafe {
                    tile::<2, 2>(kl, [a0, a1], [b0, b1], at(&mut want));
                    store(&pair_by_pair(kl, [a0, a1], [b0, b1]), at(&mut got));
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "depth {kl}, value {i}: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Where a tile's results go: the first `rows × cols` of it, from `c`, rows `ldc` apart.
    #[derive(Clone, Copy)]
    struct Tile {
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        add: bool,
    }

    /// `AP` row panels (`a`, `kl × MR` each) times `BP` column panels (`b`, `kl × NR` each).
    /// Edges are masked stores: padding rows of A are zeros, padding lanes of B are never
    /// stored.
    ///
    /// # Safety
    /// AVX-512F; the panels hold `kl` steps; the `rows × cols` block at `c` may be written.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const AP: usize, const BP: usize>(
        kl: usize,
        a: [*const f32; AP],
        b: [*const f32; BP],
        at: Tile,
    ) {
        let mut acc = [[[_mm512_setzero_ps(); BP]; MR]; AP];
        for p in 0..kl {
            let mut bv = [_mm512_setzero_ps(); BP];
            for (v, panel) in bv.iter_mut().zip(&b) {
                *v = _mm512_loadu_ps(panel.add(p * NR));
            }
            for (panel, rows) in a.iter().zip(acc.iter_mut()) {
                let ap = panel.add(p * MR);
                for (r, row) in rows.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*ap.add(r));
                    for (s, v) in row.iter_mut().zip(&bv) {
                        *s = _mm512_fmadd_ps(av, *v, *s);
                    }
                }
            }
        }
        store(&acc, at)
    }

    /// Writes (or adds) a tile's sums to its block of C, masking rows and columns past the
    /// edge.
    ///
    /// # Safety
    /// AVX-512F; the `rows × cols` block at `at.c` may be written (and read when adding).
    #[target_feature(enable = "avx512f")]
    unsafe fn store<const AP: usize, const BP: usize>(acc: &[[[__m512; BP]; MR]; AP], at: Tile) {
        for (i, rows) in acc.iter().enumerate() {
            for (r, sums) in rows.iter().enumerate() {
                let row = i * MR + r;
                if row >= at.rows {
                    return;
                }
                for (j, &sum) in sums.iter().enumerate() {
                    let col = j * NR;
                    if col >= at.cols {
                        break;
                    }
                    let lanes = (at.cols - col).min(NR);
                    let mask: __mmask16 = ((1u32 << lanes) - 1) as u16;
                    let dst = at.c.add(row * at.ldc + col);
                    let v = if at.add {
                        _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, dst))
                    } else {
                        sum
                    };
                    _mm512_mask_storeu_ps(dst, mask, v);
                }
            }
        }
    }
}

/// A matrix read from a slice: (data, row stride, column stride).
#[derive(Clone, Copy)]
pub(super) struct In<'a>(pub &'a [f32], pub usize, pub usize);
/// A matrix written to a slice with unit column stride: (data, row stride).
pub(super) struct Out<'a>(pub &'a mut [f32], pub usize);

/// dst (m × n) = lhs (m × k) · rhs (k × n), or dst += when `accumulate`. Single-threaded, for
/// products too small to split (attention's blocks, the head's chunks): their callers run in
/// parallel. The `gemm` crate packs these small operands well enough.
pub(super) fn small_product(
    dst: Out,
    lhs: In,
    rhs: In,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst.0[r * dst.1..r * dst.1 + n].fill(0.0);
            }
        }
        return;
    }
    // The last element each operand touches must lie inside its slice.
    assert!(
        (m - 1) * dst.1 + n <= dst.0.len(),
        "small product: dst out of range"
    );
    assert!(
        (m - 1) * lhs.1 + (k - 1) * lhs.2 < lhs.0.len(),
        "small product: lhs out of range"
    );
    assert!(
        (k - 1) * rhs.1 + (n - 1) * rhs.2 < rhs.0.len(),
        "small product: rhs out of range"
    );
    // SAFETY: the asserts above keep every access inside the slices, and `dst` is borrowed
    // mutably, so nothing else reads or writes it meanwhile.
    unsafe {
        gemm_f32::gemm::f32::get_gemm_fn()(
            m,
            n,
            k,
            dst.0.as_mut_ptr(),
            1,
            dst.1 as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm_common::Parallelism::None,
        )
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// A plain row-major matrix as a panel source.
    pub struct RowMajor<'a> {
        pub values: &'a [f32],
        pub cols: usize,
    }

    impl PanelSource for RowMajor<'_> {
        fn pack(&self, span: Span, dst: &mut [f32], _: &mut Vec<f32>) {
            let Span { k0, k1, j0, j1 } = span;
            let kl = k1 - k0;
            for kk in k0..k1 {
                let row = &self.values[kk * self.cols + j0..kk * self.cols + j1];
                row_into_panels(row, kk - k0, kl, dst);
            }
        }
    }

    /// `len` values spread over [-1, 1), the same for the same seed.
    pub(in crate::model) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The plain triple loop, in f64.
    fn plain(a: &[f32], lda: usize, m: usize, k: usize, b: &[f32], n: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                let av = a[i * lda + p] as f64;
                for j in 0..n {
                    c[i * n + j] += av * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    fn kernels() -> Vec<Kernel> {
        let kernels = Kernel::available();
        eprintln!("register tiles tested on this CPU: {kernels:?}");
        kernels
    }

    /// Every kernel's panel of A against the plain layout, with and without a tail of steps.
    #[test]
    fn panels_of_a_hold_the_rows_side_by_side() {
        for kernel in kernels() {
            for k in [0, 1, 8, 9, 10, 15, 16, 17, 24, 25, 32, 47, 576] {
                let values = random(MR * k, 3);
                let rows: [&[f32]; MR] = std::array::from_fn(|r| &values[r * k..(r + 1) * k]);
                // Values past the panel must stay as they are (vector stores spill lanes).
                let mut buffer = vec![MaybeUninit::new(f32::NAN); MR * k + 16];
                interleave_rows(kernel, &rows, &mut buffer[..MR * k]);
                for v in &buffer[MR * k..] {
                    // SAFETY: initialized above.
                    assert!(
                        unsafe { v.assume_init() }.is_nan(),
                        "{kernel:?} k {k}: past the panel"
                    );
                }
                let panel = &buffer[..MR * k];
                for p in 0..k {
                    for r in 0..MR {
                        // SAFETY: every value was initialized above.
                        let got = unsafe { panel[p * MR + r].assume_init() };
                        assert_eq!(
                            got.to_bits(),
                            rows[r][p].to_bits(),
                            "{kernel:?} k {k} p {p} r {r}"
                        );
                    }
                }
            }
        }
    }

    /// A row-major B whose packing asserts that spans start on multiples of its alignment.
    struct Aligned<'a>(RowMajor<'a>, usize);

    impl PanelSource for Aligned<'_> {
        fn column_align(&self) -> usize {
            self.1
        }
        fn depth_align(&self) -> usize {
            self.1
        }
        fn pack(&self, span: Span, dst: &mut [f32], s: &mut Vec<f32>) {
            assert_eq!(span.k0 % self.1, 0);
            assert_eq!(span.j0 % self.1, 0);
            self.0.pack(span, dst, s)
        }
    }

    /// Edges in every direction (m, n not multiples of the tile, k not of the chunk), several
    /// depth chunks, column alignment, strided A and C, and accumulation.
    #[test]
    fn products_match_the_plain_loop() {
        for kernel in kernels() {
            for &(m, k, n, align) in &[
                (1, 1, 1, 1),
                (6, 16, 16, 1),
                (7, 33, 17, 1),
                (13, 700, 70, 1),
                (50, 640, 96, 32),
                (130, 96, 300, 1),
                (155, 1000, 40, 1),
            ] {
                let lda = k + 3;
                let a = random(m * lda, 1);
                let b = random(k * n, 2);
                let want = plain(&a, lda, m, k, &b, n);
                let source = Aligned(
                    RowMajor {
                        values: &b,
                        cols: n,
                    },
                    align,
                );
                let packed = PackedRows::new(&a, lda, m, k);
                let ldc = n + 5;
                let base = random(m * ldc, 3);
                for accumulate in [false, true] {
                    let mut c = base.clone();
                    product(&packed, &source, n, &mut c, ldc, accumulate, kernel);
                    for i in 0..m {
                        for j in 0..n {
                            let prior = if accumulate {
                                base[i * ldc + j] as f64
                            } else {
                                0.0
                            };
                            let (got, want) = (c[i * ldc + j] as f64, want[i * n + j] + prior);
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + (k as f64).sqrt()),
                                "{kernel:?} m {m} k {k} n {n}: C[{i}][{j}] = {got}, want {want}"
                            );
                        }
                        // Columns past n are left alone.
                        assert_eq!(
                            &c[i * ldc + n..i * ldc + ldc],
                            &base[i * ldc + n..i * ldc + ldc]
                        );
                    }
                }
            }
        }
    }

    /// Parts side by side (different widths and alignments, as q, k and v stored in different
    /// types) give, bit for bit, each part's own product, and write every column.
    #[test]
    fn parts_side_by_side_equal_their_own_products() {
        for kernel in kernels() {
            for &(m, k) in &[(1, 32), (7, 64), (131, 640)] {
                let a = random(m * k, 11);
                let packed = PackedRows::new(&a, k, m, k);
                let widths = [(96, 32), (40, 1), (192, 32), (16, 16)];
                let values: Vec<Vec<f32>> = widths
                    .iter()
                    .enumerate()
                    .map(|(i, &(n, _))| random(k * n, 20 + i as u64))
                    .collect();
                let sources: Vec<Aligned> = widths
                    .iter()
                    .zip(&values)
                    .map(|(&(n, align), v)| Aligned(RowMajor { values: v, cols: n }, align))
                    .collect();
                let ldc: usize = widths.iter().map(|w| w.0).sum();
                let mut at = 0;
                let parts: Vec<ColumnPart> = widths
                    .iter()
                    .zip(&sources)
                    .map(|(&(n, _), source)| {
                        at += n;
                        ColumnPart {
                            source,
                            columns: n,
                            at: at - n,
                        }
                    })
                    .collect();
                let mut c = vec![MaybeUninit::new(f32::NAN); m * ldc];
                product_of_parts_uninit(&packed, &parts, &mut c, ldc, kernel);
                // SAFETY: every value was initialized (NaN or written).
                let c = unsafe { assume_init(c) };
                for part in &parts {
                    let mut own = vec![0f32; m * part.columns];
                    product(
                        &packed,
                        part.source,
                        part.columns,
                        &mut own,
                        part.columns,
                        false,
                        kernel,
                    );
                    for i in 0..m {
                        let got = &c[i * ldc + part.at..i * ldc + part.at + part.columns];
                        let want = &own[i * part.columns..(i + 1) * part.columns];
                        assert_eq!(got, want, "{kernel:?} m {m} k {k} part at {}", part.at);
                    }
                }
            }
        }
    }

    #[test]
    fn transposed_panels_match_the_plain_loop() {
        for kernel in kernels() {
            for (lanes, kl) in [(16, 288), (16, 21), (16, 37), (16, 5), (7, 40), (1, 3)] {
                let rows = random(lanes * kl, 4);
                let mut panel = vec![f32::NAN; kl * NR];
                transpose_into_panel(&rows, kl, &mut panel, kernel);
                for lane in 0..lanes {
                    for p in 0..kl {
                        assert_eq!(panel[p * NR + lane], rows[lane * kl + p], "{kernel:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn strips_cover_the_columns_in_aligned_even_shares() {
        for &(n, align, threads) in &[
            (576, 32, 2),
            (3072, 32, 2),
            (192, 1, 2),
            (4096, 256, 2),
            (17, 1, 4),
            (576, 1, 3),
        ] {
            let strips = column_strips(n, align, threads);
            assert_eq!(strips.first().unwrap().0, 0);
            assert_eq!(strips.last().unwrap().1, n);
            for w in strips.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
            for &(j0, j1) in &strips {
                assert_eq!(j0 % lcm(NR, align), 0, "n {n} align {align}");
                assert!(j1 - j0 <= STRIP_MAX.max(lcm(NR, align)));
            }
        }
        for &(k, align) in &[(576, 32), (1536, 32), (4096, 256), (100, 1), (5, 1)] {
            let chunks = depth_chunks(k, align);
            assert_eq!(chunks.last().unwrap().1, k);
            assert!(chunks.iter().all(|&(k0, k1)| k0 % align == 0 && k1 > k0));
        }
    }

    /// Not a test: GFLOP/s of each kernel's products at SmolLM2's shapes, on rayon's pool,
    /// best of 30 runs alternating between the kernels
    /// (`cargo test --release -p salience-engine product_timings -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn product_timings() {
        for &(m, k, n) in &[
            (300, 576, 1536),
            (300, 1536, 576),
            (300, 576, 576),
            (600, 576, 1536),
        ] {
            let a = random(m * k, 1);
            let b = random(k * n, 2);
            let packed = PackedRows::new(&a, k, m, k);
            let src = RowMajor {
                values: &b,
                cols: n,
            };
            let mut c = vec![0f32; m * n];
            let mut best = vec![f64::MAX; Kernel::available().len()];
            for _ in 0..30 {
                for (i, &kernel) in Kernel::available().iter().enumerate() {
                    let t = std::time::Instant::now();
                    product(&packed, &src, n, &mut c, n, false, kernel);
                    best[i] = best[i].min(t.elapsed().as_secs_f64());
                }
            }
            for (i, kernel) in Kernel::available().iter().enumerate() {
                let gflops = 2.0 * (m * k * n) as f64 / best[i] / 1e9;
                eprintln!("{m}x{k}x{n} {kernel:?}: {gflops:.0} GFLOP/s");
            }
        }
    }
}
