//! Attention's block products on the engine's register tile, skipping what the causal mask
//! makes zero.
//!
//! Why not the `gemm` crate here, as before: on Zen 3 (AVX2) its kernels ran attention's
//! shapes (depth 64 or one block of keys) at about 70 GFLOP/s per thread where the register
//! tile of `matmul.rs` runs 93, and a product cannot tell it which tiles the mask zeroes: a
//! block of 64 queries was multiplied with every key up to its last query, a fifth more work
//! than the triangle at 600 tokens. Here each panel of six output rows says which columns it
//! needs (scores) or which stretches of depth hold its nonzero values (products with
//! probabilities), and only those tiles run.
//!
//! Single-threaded, like `matmul::small_product`: the callers run blocks in parallel.
//! Scheme: the right operand is packed whole into `NR`-column panels (at most a block of keys
//! by a head: 160 KB at 620 keys by 64, kept in L2); then for each panel of `MR` rows of the
//! left operand, packed into an L1 buffer, the tile runs over the column panels it needs.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::ops::Range;

use super::decode_dot::Kernel;
use super::matmul::{self, interleave_rows, transpose_into_panel, In, Out, MR, NR};

/// What a panel of `MR` output rows needs; `rows` is its range of rows (fewer than `MR` at
/// the bottom edge).
pub(super) enum Needs<'a> {
    /// Only these output columns: the rest of those rows may be left unwritten.
    Columns(&'a dyn Fn(Range<usize>) -> Range<usize>),
    /// The left operand's rows are zero outside these stretches of depth (ascending, disjoint,
    /// pushed onto the vector): only they are multiplied. Every column is written.
    Depth(&'a Stretches<'a>),
}

/// Pushes the stretches of depth where a panel's rows (the range) are nonzero.
pub(super) type Stretches<'a> = dyn Fn(Range<usize>, &mut Vec<Range<usize>>) + 'a;

/// A task's buffers, reused across products: see `BUFFERS`.
#[derive(Default)]
struct Buffers {
    /// The right operand, packed.
    packed_b: Vec<f32>,
    /// One panel of the left operand, packed.
    panel_a: Vec<MaybeUninit<f32>>,
    /// The stretches of depth of a row panel.
    stretches: Vec<Range<usize>>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// dst (m × n) = lhs (m × k) · rhs (k × n), or dst += with `accumulate`, computing what
/// `needs` says (see `Needs`). `kernel` picks the register tile (AVX2 or portable; an AVX-512
/// kernel runs the AVX2 tile).
pub(super) fn block_product(
    dst: Out,
    lhs: In,
    rhs: In,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    needs: Needs,
    kernel: Kernel,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst.1 + n <= dst.0.len(),
        "block product: dst out of range"
    );
    assert!(
        k == 0 || (m - 1) * lhs.1 + (k - 1) * lhs.2 < lhs.0.len(),
        "block product: lhs out of range"
    );
    assert!(
        k == 0 || (k - 1) * rhs.1 + (n - 1) * rhs.2 < rhs.0.len(),
        "block product: rhs out of range"
    );
    let kernel = match kernel {
        Kernel::Avx512 => Kernel::Avx2,
        other => other,
    };
    let ldc = dst.1;
    let c = dst.0;
    BUFFERS.with(|buffers| {
        let mut own = Buffers::default();
        let mut guard = buffers.try_borrow_mut();
        let Buffers {
            packed_b,
            panel_a,
            stretches,
        } = match guard.as_deref_mut() {
            Ok(b) => b,
            Err(_) => &mut own,
        };
        // The buffers only grow: products of a block alternate between depths (head_dim,
        // keys), and resizing down then up again would zero the regrown part every time.
        let b_len = n.div_ceil(NR) * k * NR;
        if packed_b.len() < b_len {
            packed_b.resize(b_len, 0.0);
        }
        let packed_b = &mut packed_b[..b_len];
        if k > 0 {
            pack_rhs(rhs, k, n, packed_b, kernel);
        }
        // Room for the two lanes that `six_wide_steps` stores past a panel's last step.
        let a_len = MR * k + SPARE_LANES;
        if panel_a.len() < a_len {
            panel_a.resize(a_len, MaybeUninit::new(0.0));
        }
        for first in (0..m).step_by(MR) {
            let rows = first..(first + MR).min(m);
            let cols = match &needs {
                Needs::Columns(columns) => columns(rows.clone()),
                _ => 0..n,
            };
            stretches.clear();
            match &needs {
                Needs::Depth(depth) => depth(rows.clone(), stretches),
                _ => stretches.push(0..k),
            }
            stretches.retain_mut(|s| {
                s.end = s.end.min(k);
                s.start < s.end
            });
            debug_assert!(stretches.windows(2).all(|w| w[0].end <= w[1].start));
            // Stretches that meet run as one: each tile's sums are stored once, not per
            // stretch (a key seen by every query of three stacked heads is one of 192).
            stretches.dedup_by(|next, last| {
                let meet = last.end == next.start;
                if meet {
                    last.end = next.end;
                }
                meet
            });
            let c_rows = &mut c[first * ldc..];
            if stretches.is_empty() {
                if !accumulate {
                    for r in 0..rows.len() {
                        c_rows[r * ldc..r * ldc + n].fill(0.0);
                    }
                }
                continue;
            }
            let (d0, d1) = (stretches[0].start, stretches.last().map_or(0, |s| s.end));
            pack_lhs_panel(lhs, rows.clone(), d0..d1, &mut panel_a[d0 * MR..], kernel);
            // SAFETY: every value of the buffer is initialized (by `resize`, then packing).
            let a: &[f32] =
                unsafe { &*(&panel_a[..] as *const [MaybeUninit<f32>] as *const [f32]) };
            let (jp0, jp1) = (cols.start / NR, cols.end.min(n).div_ceil(NR));
            for jp in jp0..jp1 {
                let col = jp * NR;
                let width = NR.min(n - col);
                let b = &packed_b[jp * k * NR..(jp + 1) * k * NR];
                for (si, s) in stretches.iter().enumerate() {
                    let (s0, s1) = (s.start, s.end);
                    // SAFETY: the tile (rows, col..col + width) lies inside dst (asserted
                    // above), which this call borrows mutably; a and b hold depth s0..s1.
                    unsafe {
                        matmul::tile(
                            kernel,
                            s1 - s0,
                            &a[s0 * MR..],
                            &b[s0 * NR..],
                            c_rows.as_mut_ptr().add(col),
                            ldc,
                            rows.len(),
                            width,
                            accumulate || si > 0,
                        )
                    }
                }
            }
        }
    })
}

/// Packs rhs (k × n) whole as `NR`-column panels: B[p][j] at `(j / NR) * k * NR + p * NR +
/// j % NR`, lanes past n zero.
fn pack_rhs(rhs: In, k: usize, n: usize, dst: &mut [f32], kernel: Kernel) {
    let In(values, rs, cs) = rhs;
    for (jp, panel) in dst.chunks_exact_mut(k * NR).enumerate() {
        let j0 = jp * NR;
        let lanes = NR.min(n - j0);
        if cs == 1 {
            for p in 0..k {
                let row = &values[p * rs + j0..][..lanes];
                panel[p * NR..p * NR + lanes].copy_from_slice(row);
                panel[p * NR + lanes..(p + 1) * NR].fill(0.0);
            }
        } else if rs == 1 && cs == k && lanes == NR {
            // Each column of B is a stored row of k values, one after another.
            transpose_into_panel(&values[j0 * k..(j0 + NR) * k], k, panel, kernel);
        } else {
            for p in 0..k {
                for lane in 0..NR {
                    panel[p * NR + lane] = if lane < lanes {
                        values[p * rs + (j0 + lane) * cs]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Values a packed panel of the left operand needs past its end (see `six_wide_steps`).
const SPARE_LANES: usize = 8 - MR;

/// Packs `rows` of lhs over `depth` into `panel` (the depth's part of an `MR`-row panel:
/// `panel[(p - depth.start) * MR + r] = A[rows.start + r][p]`), rows past the edge zero;
/// `panel` has `SPARE_LANES` values past that, which may be overwritten.
fn pack_lhs_panel(
    lhs: In,
    rows: Range<usize>,
    depth: Range<usize>,
    panel: &mut [MaybeUninit<f32>],
    kernel: Kernel,
) {
    let In(values, rs, cs) = lhs;
    if cs == 1 {
        // Rows past the edge read zeros (only the bottom panel has any).
        let empty = vec![0f32; if rows.len() < MR { depth.len() } else { 0 }];
        let sources: [&[f32]; MR] = std::array::from_fn(|r| {
            if r < rows.len() {
                &values[(rows.start + r) * rs + depth.start..][..depth.len()]
            } else {
                &empty[..]
            }
        });
        interleave_rows(kernel, &sources, &mut panel[..depth.len() * MR]);
    } else if rs == 1 {
        // Each step of depth holds the panel's rows side by side.
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if kernel.has_avx2() && rows.len() == MR {
            assert!(panel.len() >= depth.len() * MR + SPARE_LANES);
            // SAFETY: AVX2 is there; the panel has room (asserted), and the reads stay inside
            // `values` (the function checks each).
            done = unsafe { avx2::six_wide_steps(values, cs, rows.start, depth.clone(), panel) };
        }
        for (i, p) in depth.enumerate().skip(done) {
            let step = &mut panel[i * MR..(i + 1) * MR];
            let src = &values[p * cs + rows.start..][..rows.len()];
            for (v, &x) in step.iter_mut().zip(src) {
                v.write(x);
            }
            for v in &mut step[rows.len()..] {
                v.write(0.0);
            }
        }
    } else {
        for (i, p) in depth.enumerate() {
            for r in 0..MR {
                let x = if r < rows.len() {
                    values[(rows.start + r) * rs + p * cs]
                } else {
                    0.0
                };
                panel[i * MR + r].write(x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;
    use std::ops::Range;

    use super::super::matmul::MR;

    /// Steps of a left operand stored transposed: step p's six values are `values[p * cs +
    /// first..][..6]`, loaded eight at a time and stored with two lanes to spare, which the
    /// next step overwrites. Returns how many steps of `depth` it wrote (it stops before a
    /// load that would leave `values`).
    ///
    /// # Safety
    /// AVX2; `panel` has room for `depth.len() * MR + 2` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn six_wide_steps(
        values: &[f32],
        cs: usize,
        first: usize,
        depth: Range<usize>,
        panel: &mut [MaybeUninit<f32>],
    ) -> usize {
        let dst = panel.as_mut_ptr().cast::<f32>();
        let steps = depth.len();
        for (i, p) in depth.enumerate() {
            let at = p * cs + first;
            if at + 8 > values.len() {
                return i;
            }
            _mm256_storeu_ps(dst.add(i * MR), _mm256_loadu_ps(values.as_ptr().add(at)));
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::matmul::tests::random;

    /// Every kernel this CPU has (an AVX-512 one runs the AVX2 tile here).
    fn kernels() -> Vec<Kernel> {
        Kernel::available()
    }

    /// A (rows × cols) row-major stored either as it is or transposed, as an `In` reads it.
    fn stored(
        values: &[f32],
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> (Vec<f32>, usize, usize) {
        if !transposed {
            return (values.to_vec(), cols, 1);
        }
        let mut t = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                t[j * rows + i] = values[i * cols + j];
            }
        }
        (t, 1, rows)
    }

    fn plain(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    fn close(got: f32, want: f64, scale: f64) -> bool {
        (got as f64 - want).abs() <= 1e-5 * (1.0 + scale)
    }

    /// What a product should leave in a value of C that held `before`.
    fn expected(product: f64, before: f32, accumulate: bool) -> f64 {
        product + if accumulate { before as f64 } else { 0.0 }
    }

    #[test]
    fn products_match_the_plain_loop_in_every_layout() {
        for kernel in kernels() {
            for (m, n, k) in [
                (1, 1, 1),
                (7, 17, 5),
                (13, 64, 64),
                (192, 70, 64),
                (64, 64, 131),
                (6, 16, 300),
            ] {
                for (ta, tb, accumulate) in [
                    (false, false, false),
                    (false, true, false),
                    (true, false, true),
                    (true, true, false),
                ] {
                    let a = random(m * k, 1);
                    let b = random(k * n, 2);
                    let (sa, ra, ca) = stored(&a, m, k, ta);
                    let (sb, rb, cb) = stored(&b, k, n, tb);
                    let ldc = n + 3;
                    let before = random(m * ldc, 3);
                    let mut c = before.clone();
                    block_product(
                        Out(&mut c, ldc),
                        In(&sa, ra, ca),
                        In(&sb, rb, cb),
                        (m, n, k),
                        accumulate,
                        Needs::Columns(&|_| 0..n),
                        kernel,
                    );
                    let want = plain(&a, &b, m, n, k);
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= n {
                                assert_eq!(got, before[i * ldc + j], "padding written");
                                continue;
                            }
                            let w = expected(want[i * n + j], before[i * ldc + j], accumulate);
                            assert!(
                                close(got, w, k as f64),
                                "{kernel:?} {m}x{n}x{k} {ta} {tb}: ({i},{j}) {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A causal pattern: row i sees columns up to i + 1 (of n), shifted by `offset`.
    fn causal(row: usize, offset: usize) -> Range<usize> {
        0..row + offset + 1
    }

    #[test]
    fn needed_columns_are_computed_and_the_rest_of_the_rows_left_alone() {
        for kernel in kernels() {
            let (m, n, k, offset) = (70, 90, 64, 20);
            let a = random(m * k, 4);
            let b = random(k * n, 5);
            let (sb, rb, cb) = stored(&b, k, n, true);
            let sentinel = f32::NAN;
            let mut c = vec![sentinel; m * n];
            let columns = |rows: Range<usize>| 0..causal(rows.end - 1, offset).end.min(n);
            block_product(
                Out(&mut c, n),
                In(&a, k, 1),
                In(&sb, rb, cb),
                (m, n, k),
                false,
                Needs::Columns(&columns),
                kernel,
            );
            let want = plain(&a, &b, m, n, k);
            let mut skipped = 0;
            for i in 0..m {
                for j in 0..n {
                    let got = c[i * n + j];
                    if causal(i, offset).contains(&j) {
                        assert!(close(got, want[i * n + j], k as f64), "({i},{j})");
                    } else if got.is_nan() {
                        skipped += 1;
                    } else {
                        assert!(
                            close(got, want[i * n + j], k as f64),
                            "({i},{j}) written wrong"
                        );
                    }
                }
            }
            // Whole tiles past every row's columns were not run.
            assert!(skipped > m * n / 10, "{skipped} values skipped");
        }
    }

    #[test]
    fn zero_stretches_of_depth_are_skipped_without_changing_the_product() {
        for kernel in kernels() {
            for accumulate in [false, true] {
                let (m, n, k) = (50, 40, 192);
                // Row i is nonzero on two stretches (as a key's gradient over two stacked
                // heads), empty for the last rows.
                let stretches_of = |i: usize| -> Vec<Range<usize>> {
                    if i >= 44 {
                        vec![]
                    } else {
                        vec![i..64, 64 + i..128]
                    }
                };
                let mut a = random(m * k, 6);
                for i in 0..m {
                    for p in 0..k {
                        if !stretches_of(i).iter().any(|s| s.contains(&p)) {
                            // NaN would leak into any product that read it.
                            a[i * k + p] = 0.0;
                        }
                    }
                }
                let b = random(k * n, 7);
                let (sa, ra, ca) = stored(&a, m, k, true);
                let depth = |rows: Range<usize>, out: &mut Vec<Range<usize>>| {
                    let first = rows.start;
                    if first < 44 {
                        out.push(first..64);
                        out.push(64 + first..128);
                    }
                };
                let before = random(m * n, 8);
                let mut c = before.clone();
                block_product(
                    Out(&mut c, n),
                    In(&sa, ra, ca),
                    In(&b, n, 1),
                    (m, n, k),
                    accumulate,
                    Needs::Depth(&depth),
                    kernel,
                );
                let want = plain(&a, &b, m, n, k);
                for i in 0..m {
                    for j in 0..n {
                        let w = expected(want[i * n + j], before[i * n + j], accumulate);
                        assert!(
                            close(c[i * n + j], w, k as f64),
                            "{kernel:?} {accumulate} ({i},{j})"
                        );
                    }
                }
            }
        }
    }
}
