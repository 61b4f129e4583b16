//! Fused CPU kernels for the salience pass. Each replaces a chain of candle element-wise ops
//! (one allocation and one memory pass each) with a single pass over rows, in parallel.

use std::mem::MaybeUninit;

use candle_core::{bail, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use super::decode_dot::Activations;
use super::matmul::RowMaker;
use super::simd;
use super::Weight;

/// Runs `f` on the contiguous f32 data of `t`.
pub(super) fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_slices(&[t], |s| f(s[0]))
}

/// Runs `f` on the contiguous f32 data of each tensor in `ts`.
fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("fused kernels run on the CPU only")
        };
        let data = cpu.as_slice::<f32>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("tensor is not contiguous")
        };
        slices.push(&data[start..end]);
    }
    f(&slices)
}

/// `len` values made by `fill(i, chunk)` over consecutive chunks of `chunk` values (the last
/// may be shorter), in parallel. Each task zeroes its chunk just before filling it: with
/// `vec![0.0; len]` one thread zeroed the whole buffer first (a memory pass the other threads
/// waited on, 3 % of a salience pass), and the values were then evicted before being written.
pub(super) fn par_filled(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    // SAFETY: each chunk is zeroed before `fill` sees it: every value is written.
    unsafe { par_written(len, chunk, |i, values| fill(i, zeroed(values))) }
}

/// `par_filled` for fills that write every value of their chunk themselves (copies): no
/// zeroing pass first.
///
/// # Safety
/// `fill` writes every value of each chunk it is given.
unsafe fn par_written(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out = super::matmul::uninit(len);
    let chunk = chunk.max(1);
    if len <= chunk * SERIAL_CHUNKS {
        // A few rows (decoding): waking the pool would cost more than the work.
        for (i, values) in out.chunks_mut(chunk).enumerate() {
            fill(i, values);
        }
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, values)| fill(i, values));
    }
    // SAFETY: the chunks cover the buffer, and `fill` wrote each (the caller's promise).
    unsafe { super::matmul::assume_init(out) }
}

/// `par_filled` runs up to this many chunks on the calling thread (candle's `rms_norm` draws
/// the same line).
const SERIAL_CHUNKS: usize = 32;

/// Zeroes values not yet written and returns them as plain values.
pub(super) fn zeroed(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in values.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every value was just written.
    unsafe { assume_written(values) }
}

/// The values as plain values.
///
/// # Safety
/// Every one of them has been written.
unsafe fn assume_written(values: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: written (the caller's promise); same layout (MaybeUninit<f32> is
    // repr(transparent)), same borrow.
    unsafe { &mut *(values as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Rows handled by one task of the head layout kernels.
const HEAD_ROWS_PER_TASK: usize = 64;

/// Splits the rows of `x` (b * t, sum of `heads` * hd), whose columns hold one group of heads
/// after another, into one (b, heads[i], t, hd) tensor per group. A parallel gather: candle's
/// transpose-and-copy is single-threaded, and it ran several times per layer.
pub fn split_heads(
    x: &Tensor,
    (b, t, hd): (usize, usize, usize),
    heads: &[usize],
) -> Result<Vec<Tensor>> {
    let width: usize = heads.iter().sum::<usize>() * hd;
    if x.elem_count() != b * t * width {
        bail!("split_heads: {:?} is not ({b} * {t}, {width})", x.shape())
    }
    with_slice(x, |x| {
        let mut offset = 0;
        let mut out = Vec::with_capacity(heads.len());
        for &h in heads {
            let rows = HEAD_ROWS_PER_TASK;
            let fill = |c: usize, d: &mut [MaybeUninit<f32>]| {
                for (i, d) in d.chunks_mut(hd).enumerate() {
                    let row = c * rows + i;
                    let (bh, r) = (row / t, row % t);
                    let (bi, head) = (bh / h, bh % h);
                    let src = (bi * t + r) * width + offset + head * hd;
                    copy_short(d, &x[src..src + hd]);
                }
            };
            // SAFETY: the chunk's rows of hd values are each copied whole.
            let dst = unsafe { par_written(b * h * t * hd, rows * hd, fill) };
            out.push(Tensor::from_vec(dst, (b, h, t, hd), &Device::Cpu)?);
            offset += h * hd;
        }
        Ok(out)
    })
}

/// The inverse of `split_heads`: (b, heads_i, t, hd) tensors side by side as rows
/// (b * t, sum of heads_i * hd).
pub fn merge_heads(parts: &[&Tensor], (b, t, hd): (usize, usize, usize)) -> Result<Tensor> {
    let heads = head_counts(parts, (b, t, hd), "merge_heads")?;
    let width: usize = heads.iter().sum::<usize>() * hd;
    let out = with_slices(parts, |parts| {
        // SAFETY: each row's heads, hd values each, add up to its width: every value is
        // copied.
        Ok(unsafe {
            par_written(b * t * width, HEAD_ROWS_PER_TASK * width, |c, rows| {
                for (i, row) in rows.chunks_mut(width).enumerate() {
                    merged_row(parts, &heads, (t, hd), c * HEAD_ROWS_PER_TASK + i, row);
                }
            })
        })
    })?;
    Tensor::from_vec(out, (b * t, width), &Device::Cpu)
}

/// `weight.forward` of the merged heads of runs of rows, one run's rows after another's: run
/// `(o, b, t)` holds `o` (b, heads, t, hd), and its rows are `merge_heads(&[o], (b, t, hd))`'s.
/// The same values as merging and multiplying: each position's heads are copied straight into
/// the product's packed operand.
pub fn merge_heads_into(
    runs: &[(&Tensor, usize, usize)],
    hd: usize,
    weight: &Weight,
    activations: Activations,
) -> Result<Tensor> {
    let mut starts = Vec::with_capacity(runs.len());
    let mut rows = 0;
    for &(o, b, t) in runs {
        let heads = head_counts(&[o], (b, t, hd), "merge_heads_into")?;
        if heads[0] * hd != weight.cols() {
            bail!("merge_heads_into: {heads:?} heads for {:?}", weight.dims())
        }
        starts.push(rows);
        rows += b * t;
    }
    let heads = [weight.cols() / hd.max(1)];
    let outputs: Vec<&Tensor> = runs.iter().map(|&(o, _, _)| o).collect();
    with_slices(&outputs, |outputs| {
        weight.forward_rows(
            rows,
            &|i, row| {
                let r = starts.partition_point(|&start| start <= i) - 1;
                let t = runs[r].2;
                merged_row(&outputs[r..=r], &heads, (t, hd), i - starts[r], row)
            },
            activations,
        )
    })
}

/// `weight.backward(&merge_heads(parts, (b, t, hd)))`, the same values: each position's
/// heads go straight into the product's packed operands.
pub fn merge_heads_backward_into(
    parts: &[&Tensor],
    (b, t, hd): (usize, usize, usize),
    weight: &Weight,
) -> Result<Tensor> {
    let heads = head_counts(parts, (b, t, hd), "merge_heads_backward_into")?;
    if heads.iter().sum::<usize>() * hd != weight.rows() {
        bail!(
            "merge_heads_backward_into: {heads:?} heads for {:?}",
            weight.dims()
        )
    }
    with_slices(parts, |parts| {
        weight.backward_rows(b * t, &|i, row| merged_row(parts, &heads, (t, hd), i, row))
    })
}

/// How many heads each of `parts`, (b, heads, t, hd) tensors, holds.
fn head_counts(
    parts: &[&Tensor],
    (b, t, hd): (usize, usize, usize),
    what: &str,
) -> Result<Vec<usize>> {
    let heads: Vec<usize> = parts
        .iter()
        .map(|p| p.elem_count() / (b * t * hd).max(1))
        .collect();
    for (p, h) in parts.iter().zip(&heads) {
        if p.elem_count() != b * h * t * hd {
            bail!("{what}: {:?} is not ({b}, heads, {t}, {hd})", p.shape())
        }
    }
    Ok(heads)
}

/// Row `position` of the merged heads (sequence `position / t`, position `position % t` in
/// it): each part's heads side by side, in order, into `row`, every value.
fn merged_row(
    parts: &[&[f32]],
    heads: &[usize],
    (t, hd): (usize, usize),
    position: usize,
    row: &mut [MaybeUninit<f32>],
) {
    let (bi, r) = (position / t, position % t);
    let mut dst = row.chunks_exact_mut(hd);
    for (p, &h) in parts.iter().zip(heads) {
        for head in 0..h {
            let src = ((bi * h + head) * t + r) * hd;
            copy_short(dst.next().expect("a run per head"), &p[src..src + hd]);
        }
    }
}

/// dst = src for a short run (a head's row, 64 values in most models): whole blocks of 16
/// values as fixed-size copies, which compile to vector moves, where a copy of unknown length
/// is a call to memmove (4,500 of them per layer at 300 tokens).
#[inline]
fn copy_short(dst: &mut [MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "copy_short: lengths differ");
    let mut to = dst.chunks_exact_mut(16);
    let mut from = src.chunks_exact(16);
    for (d, s) in (&mut to).zip(&mut from) {
        let d: &mut [MaybeUninit<f32>; 16] = d.try_into().expect("a chunk of 16");
        let s: &[f32; 16] = s.try_into().expect("a chunk of 16");
        *d = s.map(MaybeUninit::new);
    }
    for (d, &s) in to.into_remainder().iter_mut().zip(from.remainder()) {
        d.write(s);
    }
}

fn rows_of(t: &Tensor) -> Result<(usize, usize)> {
    let n = t.dim(candle_core::D::Minus1)?;
    Ok((t.elem_count() / n.max(1), n))
}

/// y = x / rms(x) * w over the last dimension, as candle's `rms_norm` computes it but for the
/// order of the sum of squares (sixteen running sums: `simd::sum_of_squares`), without its
/// serial zeroing of the output.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    let (rows, n) = rows_of(x)?;
    if w.elem_count() != n {
        bail!("rms_norm: shapes {:?} {:?}", x.shape(), w.shape())
    }
    let out = with_slice(x, |x| {
        with_slice(w, |w| {
            // SAFETY: `rms_norm_row` writes the whole row.
            Ok(unsafe { par_written(rows * n, n, |i, o| rms_norm_row(x, w, eps, i, o)) })
        })
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

/// Row `i` of `rms_norm` of the rows `x` (each `w.len()` values) into `o`, every value.
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, i: usize, o: &mut [MaybeUninit<f32>]) {
    let n = w.len();
    let x = &x[i * n..(i + 1) * n];
    let m = (simd::sum_of_squares(x) / n as f32 + eps).sqrt();
    for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
        o.write(x / m * w);
    }
}

/// `weight.forward(&rms_norm(x, w, eps))` for x (rows, cols), the same values: each row is
/// normalized straight into the product's packed operand instead of into a matrix that the
/// product then reads back.
pub fn rms_norm_into(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    weight: &Weight,
    activations: Activations,
) -> Result<Tensor> {
    let (rows, n) = rows_of(x)?;
    if w.elem_count() != n || weight.cols() != n {
        bail!(
            "rms_norm_into: shapes {:?} {:?} {:?}",
            x.shape(),
            w.shape(),
            weight.dims()
        )
    }
    let y = with_slice(x, |x| {
        with_slice(w, |w| {
            weight.forward_rows(rows, &|i, o| rms_norm_row(x, w, eps, i, o), activations)
        })
    })?;
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last dimension") = weight.rows();
    y.reshape(dims)
}

/// `weight.forward(&gated(gate_up, gelu))` for gate_up (rows, 2 f), the same values, the
/// activations made straight into the product's packed operand.
pub fn gated_into(
    gate_up: &Tensor,
    gelu: bool,
    weight: &Weight,
    activations: Activations,
) -> Result<Tensor> {
    let (rows, two_f) = rows_of(gate_up)?;
    if weight.cols() * 2 != two_f {
        bail!(
            "gated_into: shapes {:?} {:?}",
            gate_up.shape(),
            weight.dims()
        )
    }
    with_slice(gate_up, |gu| {
        weight.forward_rows(rows, &|i, o| gated_row(gu, gelu, i, o), activations)
    })
}

/// The rows that `make(i, row)` writes (every value of each), (rows × cols) row-major.
pub(super) fn made_rows(rows: usize, cols: usize, make: &RowMaker<'_>) -> Vec<f32> {
    // SAFETY: a row maker writes its whole row.
    unsafe { par_written(rows * cols, cols, make) }
}

/// dx for y = x / rms(x) * w over the last dimension.
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, eps: f32, dy: &Tensor) -> Result<Tensor> {
    rms_norm_backward_onto(x, w, eps, dy, None)
}

/// `residual + rms_norm_backward(x, w, eps, dy)` in the same pass: the gradient a residual
/// block passes back (the separate add was one more pass over the rows, twice per layer).
pub fn rms_norm_backward_plus(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    dy: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    rms_norm_backward_onto(x, w, eps, dy, Some(residual))
}

fn rms_norm_backward_onto(
    x: &Tensor,
    w: &Tensor,
    eps: f32,
    dy: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, n) = rows_of(x)?;
    let residual_len = residual.map_or(rows * n, Tensor::elem_count);
    if w.elem_count() != n || dy.elem_count() != rows * n || residual_len != rows * n {
        bail!(
            "rms_norm_backward: shapes {:?} {:?} {:?}",
            x.shape(),
            w.shape(),
            dy.shape()
        )
    }
    let rows_of_dx = |x: &[f32], w: &[f32], dy: &[f32], residual: Option<&[f32]>| {
        par_filled(rows * n, n, |i, o| {
            let (x, dy) = (&x[i * n..(i + 1) * n], &dy[i * n..(i + 1) * n]);
            let (squares, products) = simd::squares_and_products(x, dy, w);
            let ms = squares / n as f32;
            let r = 1.0 / (ms + eps).sqrt();
            let gx = products / n as f32;
            let c = r * r * r * gx;
            for (((o, &x), &dy), &w) in o.iter_mut().zip(x).zip(dy).zip(w) {
                *o = r * dy * w - x * c;
            }
            if let Some(residual) = residual {
                for (o, &v) in o.iter_mut().zip(&residual[i * n..(i + 1) * n]) {
                    *o += v;
                }
            }
        })
    };
    let out = with_slice(x, |x| {
        with_slice(w, |w| {
            with_slice(dy, |dy| match residual {
                Some(res) => with_slice(res, |res| Ok(rows_of_dx(x, w, dy, Some(res)))),
                None => Ok(rows_of_dx(x, w, dy, None)),
            })
        })
    })?;
    Tensor::from_vec(out, x.shape(), &Device::Cpu)
}

/// act(gate) * up, from rows holding [gate | up]. The passes fuse it into the down projection
/// (`gated_into`); this is the plain composition that is tested against.
#[cfg(test)]
pub fn gated(gate_up: &Tensor, gelu: bool) -> Result<Tensor> {
    let (rows, two_f) = rows_of(gate_up)?;
    let f = two_f / 2;
    let out = with_slice(gate_up, |gu| {
        // SAFETY: `gated_row` writes the whole row.
        Ok(unsafe { par_written(rows * f, f, |i, o| gated_row(gu, gelu, i, o)) })
    })?;
    Tensor::from_vec(out, (rows, f), &Device::Cpu)
}

/// Row `i` of `gated` of the rows `gate_up` (each 2 × `o.len()` values) into `o`, every value.
fn gated_row(gate_up: &[f32], gelu: bool, i: usize, o: &mut [MaybeUninit<f32>]) {
    let f = o.len();
    let (g, u) = gate_up[i * 2 * f..(i + 1) * 2 * f].split_at(f);
    // Both activations are x * sigmoid(z): SiLU with z = x, GELU-tanh with
    // z = 2 c (x + k x^3), since (1 + tanh(y)) / 2 = sigmoid(2 y).
    let o = sigmoid_of_gate(g, o, gelu);
    for ((o, &x), &u) in o.iter_mut().zip(g).zip(u) {
        *o *= x * u;
    }
}

/// Gradient of act(gate) * up with respect to [gate | up], given d out. The backward pass fuses
/// it into the gate/up product (`gated_backward_into`); this is the plain composition that is
/// tested against.
#[cfg(test)]
pub fn gated_backward(gate_up: &Tensor, d_out: &Tensor, gelu: bool) -> Result<Tensor> {
    let (rows, two_f) = rows_of(gate_up)?;
    let f = two_f / 2;
    if d_out.elem_count() != rows * f {
        bail!(
            "gated_backward: shapes {:?} {:?}",
            gate_up.shape(),
            d_out.shape()
        )
    }
    let out = with_slice(gate_up, |gu| {
        with_slice(d_out, |d| {
            // SAFETY: `gated_backward_row` writes the whole row.
            Ok(unsafe {
                par_written(rows * two_f, two_f, |i, o| {
                    gated_backward_row(gu, d, gelu, i, o)
                })
            })
        })
    })?;
    Tensor::from_vec(out, (rows, two_f), &Device::Cpu)
}

/// `weight.backward(&gated_backward(gate_up, d_out, gelu))`, the same values: each row's
/// gradient goes straight into the product's packed operands.
pub fn gated_backward_into(
    gate_up: &Tensor,
    d_out: &Tensor,
    gelu: bool,
    weight: &Weight,
) -> Result<Tensor> {
    let (rows, two_f) = rows_of(gate_up)?;
    if d_out.elem_count() * 2 != rows * two_f || weight.rows() != two_f {
        bail!(
            "gated_backward_into: shapes {:?} {:?} {:?}",
            gate_up.shape(),
            d_out.shape(),
            weight.dims()
        )
    }
    with_slice(gate_up, |gu| {
        with_slice(d_out, |d| {
            weight.backward_rows(rows, &|i, o| gated_backward_row(gu, d, gelu, i, o))
        })
    })
}

/// Row `i` of `gated_backward` (d gate, then d up: `o.len()` values) into `o`, every value.
fn gated_backward_row(
    gate_up: &[f32],
    d_out: &[f32],
    gelu: bool,
    i: usize,
    o: &mut [MaybeUninit<f32>],
) {
    let two_f = o.len();
    let f = two_f / 2;
    let (g, u) = gate_up[i * two_f..(i + 1) * two_f].split_at(f);
    let d = &d_out[i * f..(i + 1) * f];
    let (dg, du) = o.split_at_mut(f);
    // The sigmoid goes into d gate first, then each entry is finished.
    let dg = sigmoid_of_gate(g, dg, gelu);
    for i in 0..f {
        let (x, s) = (g[i], dg[i]);
        // d/dx x s(z) = s + x s (1 - s) dz/dx.
        let dz = if gelu {
            2.0 * simd::GELU_C * (1.0 + 3.0 * simd::GELU_K * x * x)
        } else {
            1.0
        };
        dg[i] = d[i] * u[i] * (s + x * s * (1.0 - s) * dz);
        du[i].write(d[i] * x * s);
    }
}

/// out = sigmoid(z(x)) with z = x (SiLU) or 2 c (x + k x^3) (GELU-tanh), written whole;
/// returns it as plain values.
fn sigmoid_of_gate<'a>(x: &[f32], out: &'a mut [MaybeUninit<f32>], gelu: bool) -> &'a mut [f32] {
    simd::sigmoid_of(x, out, gelu);
    // SAFETY: `sigmoid_of` writes every value.
    unsafe { assume_written(out) }
}

/// ln softmax of each row of `logits` (rows, vocab) at `targets[row]`, and, with `want_grad`,
/// its gradient with respect to the logits: onehot(target) - softmax, one row at a time with
/// glibc's `exp`. The model's head fuses this with both products (`head.rs`); this is the
/// plain composition it is tested against.
#[cfg(test)]
pub fn target_log_softmax(
    logits: &Tensor,
    targets: &[u32],
    want_grad: bool,
) -> Result<(Vec<f32>, Option<Tensor>)> {
    let (rows, vocab) = rows_of(logits)?;
    if targets.len() != rows {
        bail!(
            "target_log_softmax: {rows} rows but {} targets",
            targets.len()
        )
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("target_log_softmax: token {t} is outside the vocabulary of {vocab}")
    }
    let mut log_probs = vec![0f32; rows];
    let mut grad = vec![0f32; if want_grad { rows * vocab } else { 0 }];
    with_slice(logits, |x| {
        let row_pass = |(r, lp): (usize, &mut f32), g: Option<&mut [f32]>| {
            let x = &x[r * vocab..(r + 1) * vocab];
            let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            // Summed in f64: 49,152 small terms added one by one to an f32 total lost up to
            // 1e-3 of the log-probability (measured against the float64 reference).
            let sum64: f64 = x.iter().map(|&v| (v - max).exp() as f64).sum();
            let sum = sum64 as f32;
            let t = targets[r] as usize;
            *lp = ((x[t] - max) as f64 - sum64.ln()) as f32;
            if let Some(g) = g {
                let inv = 1.0 / sum;
                for (g, &v) in g.iter_mut().zip(x) {
                    *g = -(v - max).exp() * inv;
                }
                g[t] += 1.0;
            }
        };
        if want_grad {
            log_probs
                .par_iter_mut()
                .enumerate()
                .zip(grad.par_chunks_mut(vocab))
                .for_each(|(lp, g)| row_pass(lp, Some(g)));
        } else {
            log_probs
                .par_iter_mut()
                .enumerate()
                .for_each(|lp| row_pass(lp, None));
        }
        Ok(())
    })?;
    let grad = if want_grad {
        Some(Tensor::from_vec(grad, (rows, vocab), &Device::Cpu)?)
    } else {
        None
    };
    Ok((log_probs, grad))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::ops;
    use candle_core::DType;

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// Whether two tensors hold the same f32 bits, value for value.
    pub(crate) fn same_bits(a: &Tensor, b: &Tensor) -> bool {
        let bits = |t: &Tensor| -> Vec<u32> {
            let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            values.iter().map(|v| v.to_bits()).collect()
        };
        a.dims() == b.dims() && bits(a) == bits(b)
    }

    pub(crate) fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn fused_backwards_match_the_composed_ops() {
        // 40 columns: two blocks of the 16-lane sums and a tail.
        let x = Tensor::randn(0f32, 1.0, (4, 40), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, 40, &Device::Cpu).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (4, 40), &Device::Cpu).unwrap();
        let want = ops::rms_norm_backward(&x, &w, 1e-5, &dy).unwrap();
        let got = rms_norm_backward(&x, &w, 1e-5, &dy).unwrap();
        assert!(max_diff(&want, &got) < 1e-4);
        let residual = Tensor::randn(0f32, 1.0, (4, 40), &Device::Cpu).unwrap();
        let plus = rms_norm_backward_plus(&x, &w, 1e-5, &dy, &residual).unwrap();
        assert_eq!(max_diff(&plus, &(&residual + &got).unwrap()), 0.0);
        assert!(rms_norm_backward_plus(&x, &w, 1e-5, &dy, &w).is_err());
        let (x, dy) = (x.narrow(1, 0, 8).unwrap(), dy.narrow(1, 0, 8).unwrap());
        let (x, dy) = (x.contiguous().unwrap(), dy.contiguous().unwrap());
        let up = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
        for (act, gelu) in [
            (ops::Activation::Silu, false),
            (ops::Activation::GeluTanh, true),
        ] {
            let gate_up = Tensor::cat(&[&x, &up], 1).unwrap();
            let g = gated_backward(&gate_up, &dy, gelu).unwrap();
            let (dg, du) = (g.narrow(1, 0, 8).unwrap(), g.narrow(1, 8, 8).unwrap());
            let want_dg = dy
                .mul(&up)
                .unwrap()
                .mul(&act.derivative(&x).unwrap())
                .unwrap();
            let want_du = dy.mul(&act.forward(&x).unwrap()).unwrap();
            let want_out = act.forward(&x).unwrap().mul(&up).unwrap();
            assert!(max_diff(&want_out, &gated(&gate_up, gelu).unwrap()) < 1e-5);
            assert!(max_diff(&want_dg, &dg) < 1e-4);
            assert!(max_diff(&want_du, &du) < 1e-4);
        }
    }

    #[test]
    fn rms_norm_gives_candles_values() {
        // The sum of squares is added in another order than candle's, so the values may
        // differ in the last bits: both are held to the float64 norm instead (a wrong mean or
        // a lost row would be off by far more than these few rounding errors).
        for (rows, n) in [(1, 8), (40, 576), (33, 20), (3, 2048)] {
            let x = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
            let exact = {
                let (x, w) = (
                    x.to_dtype(DType::F64).unwrap(),
                    w.to_dtype(DType::F64).unwrap(),
                );
                let mean = x.sqr().unwrap().mean_keepdim(1).unwrap();
                let rms = (mean + 1e-5).unwrap().sqrt().unwrap();
                x.broadcast_div(&rms).unwrap().broadcast_mul(&w).unwrap()
            };
            let largest = exact
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let bound = 8.0 * f64::from(f32::EPSILON) * largest;
            for (who, y) in [
                ("candle", candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap()),
                ("ours", rms_norm(&x, &w, 1e-5).unwrap()),
            ] {
                let y = y.to_dtype(DType::F64).unwrap();
                let off = (y - &exact).unwrap().abs().unwrap().max_all().unwrap();
                let off = off.to_scalar::<f64>().unwrap();
                assert!(off <= bound, "{who}, {rows} × {n}: {off:e} > {bound:e}");
            }
        }
    }

    /// The normalized rows made straight into a product's packed operand give the product of
    /// the normalized matrix, bit for bit; so do the gated activations. Enough rows for the
    /// panel kernel, and a row count that leaves a partial panel.
    #[test]
    fn rows_made_into_a_product_give_the_product_of_the_rows() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (rows, n, f) = (67, 96, 64);
        let stored = |dims: (usize, usize), dtype: GgmlDType| {
            let t = Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
            Weight::from_qtensor(QTensor::quantize(&t, dtype).unwrap()).unwrap()
        };
        let x = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, n, &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q4_1, GgmlDType::F16] {
            let gate_up = stored((2 * f, n), dtype);
            let want = gate_up.forward(&rms_norm(&x, &w, 1e-5).unwrap()).unwrap();
            let got = rms_norm_into(&x, &w, 1e-5, &gate_up, Activations::Exact).unwrap();
            assert_eq!(max_diff(&want, &got), 0.0, "{dtype:?}");
            let down = stored((n, f), dtype);
            for gelu in [false, true] {
                let want = down.forward(&gated(&got, gelu).unwrap()).unwrap();
                let fused = gated_into(&got, gelu, &down, Activations::Exact).unwrap();
                assert_eq!(max_diff(&want, &fused), 0.0, "{dtype:?}, gelu {gelu}");
            }
            // Attention's output heads, (b, heads, t, hd), into the output projection.
            let (b, t, hd) = (2, rows, 32);
            let o = Tensor::randn(0f32, 1.0, (b, n / hd, t, hd), &Device::Cpu).unwrap();
            let wo = stored((f, n), dtype);
            let want = wo
                .forward(&merge_heads(&[&o], (b, t, hd)).unwrap())
                .unwrap();
            let got = merge_heads_into(&[(&o, b, t)], hd, &wo, Activations::Exact).unwrap();
            assert_eq!(max_diff(&want, &got), 0.0, "{dtype:?}, heads");
            // Runs of other lengths after it, as perturbation's batches have them.
            let short = Tensor::randn(0f32, 1.0, (1, n / hd, 5, hd), &Device::Cpu).unwrap();
            let runs = [(&o, b, t), (&short, 1, 5), (&o, b, t)];
            let merged: Vec<Tensor> = runs
                .iter()
                .map(|&(o, b, t)| merge_heads(&[o], (b, t, hd)).unwrap())
                .collect();
            let want = wo.forward(&Tensor::cat(&merged, 0).unwrap()).unwrap();
            let got = merge_heads_into(&runs, hd, &wo, Activations::Exact).unwrap();
            assert_eq!(max_diff(&want, &got), 0.0, "{dtype:?}, runs of heads");
        }
    }

    /// The backward products fed by their producers give the products of the materialized
    /// gradients bit for bit: for weights stacked from parts of different storage (each part
    /// packs its own columns of the made rows) and for f32 weights (rows made into a matrix).
    #[test]
    fn gradients_made_into_a_product_give_the_product_of_the_gradients() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let randn = |dims: (usize, usize)| Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
        let stored = |dims: (usize, usize), dtype: GgmlDType| {
            Weight::from_qtensor(QTensor::quantize(&randn(dims), dtype).unwrap()).unwrap()
        };
        let (rows, n, f) = (67, 96, 64);
        let gate_up = randn((rows, 2 * f));
        let d_out = randn((rows, f));
        let stacked = Weight::stack(vec![
            stored((f, n), GgmlDType::Q4_1),
            stored((f, n), GgmlDType::F16),
        ])
        .unwrap();
        let dense = Weight::dense(randn((2 * f, n))).unwrap();
        for weight in [&stacked, &dense] {
            for gelu in [false, true] {
                let g = gated_backward(&gate_up, &d_out, gelu).unwrap();
                let want = weight.backward(&g).unwrap();
                let got = gated_backward_into(&gate_up, &d_out, gelu, weight).unwrap();
                assert_eq!(max_diff(&want, &got), 0.0, "gelu {gelu}");
            }
        }

        // q, k and v heads (b, heads, t, hd) into a q | k | v weight of three storages.
        let (b, t, hd) = (2, 40, 32);
        let heads = [3, 1, 1];
        let grads: Vec<Tensor> = heads
            .iter()
            .map(|&h| Tensor::randn(0f32, 1.0, (b, h, t, hd), &Device::Cpu).unwrap())
            .collect();
        let grads: Vec<&Tensor> = grads.iter().collect();
        let qkv = Weight::stack(vec![
            stored((3 * hd, n), GgmlDType::Q8_0),
            stored((hd, n), GgmlDType::Q4_1),
            stored((hd, n), GgmlDType::F16),
        ])
        .unwrap();
        let want = qkv
            .backward(&merge_heads(&grads, (b, t, hd)).unwrap())
            .unwrap();
        let got = merge_heads_backward_into(&grads, (b, t, hd), &qkv).unwrap();
        assert_eq!(max_diff(&want, &got), 0.0, "heads");
    }

    #[test]
    fn head_layouts_match_candle_transposes() {
        // Head sizes below, at and past one block of 16 copied values; 70 rows per sequence
        // make a short last task.
        for hd in [4, 16, 20] {
            let (b, t) = (2, 70);
            let heads = [3, 1, 2];
            let width = 6 * hd;
            let x = Tensor::randn(0f32, 1.0, (b * t, width), &Device::Cpu).unwrap();
            let parts = split_heads(&x, (b, t, hd), &heads).unwrap();
            let mut offset = 0;
            for (p, &h) in parts.iter().zip(&heads) {
                let want = x
                    .narrow(1, offset, h * hd)
                    .unwrap()
                    .reshape((b, t, h, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap();
                assert_eq!(p.dims(), want.dims());
                assert_eq!(max_diff(p, &want), 0.0, "head size {hd}");
                offset += h * hd;
            }
            let refs: Vec<&Tensor> = parts.iter().collect();
            let back = merge_heads(&refs, (b, t, hd)).unwrap();
            assert_eq!(max_diff(&back, &x), 0.0, "head size {hd}");
            assert!(split_heads(&x, (b, t, hd), &[3, 2]).is_err());
        }
    }

    #[test]
    fn target_log_softmax_matches_the_composed_ops() {
        let logits = (Tensor::randn(0f32, 3.0, (5, 40), &Device::Cpu).unwrap() + 7.0).unwrap();
        let targets = [0u32, 39, 7, 7, 21];
        let (lp, grad) = target_log_softmax(&logits, &targets, true).unwrap();
        let want = ops::log_softmax(&logits).unwrap();
        let want_rows: Vec<Vec<f32>> = want.to_vec2().unwrap();
        for (r, &t) in targets.iter().enumerate() {
            assert!((lp[r] - want_rows[r][t as usize]).abs() < 1e-5);
        }
        let mut onehot = vec![0f32; 5 * 40];
        for (r, &t) in targets.iter().enumerate() {
            onehot[r * 40 + t as usize] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (5, 40), &Device::Cpu).unwrap();
        let want_grad = (onehot - want.exp().unwrap()).unwrap();
        assert!(max_diff(&want_grad, &grad.unwrap()) < 1e-6);
        let (lp2, none) = target_log_softmax(&logits, &targets, false).unwrap();
        assert_eq!(lp, lp2);
        assert!(none.is_none());
        assert!(target_log_softmax(&logits, &[0, 1, 2, 3, 40], false).is_err());
    }
}
