//! Causal attention computed block by block, forward and backward.
//!
//! A block of queries is multiplied only with the keys it can see, so the masked part of the
//! score matrix (half of it without a sliding window) is never computed, exponentiated or
//! differentiated. The probabilities are not kept for the backward pass: it recomputes them
//! one block at a time from each row's log-sum-exp, as FlashAttention does. At 600 tokens
//! they were half of the salience pass's memory (14 MB per layer), and writing and reading
//! them back cost more than one extra block matmul. Measured on SmolLM2 before this module:
//! attention took 36 % of a salience pass at 600 tokens.
//!
//! The heads that share a key head go through each block's products together (their rows of
//! the block stacked): one product of 3 × 64 rows instead of three of 64 packs the block's
//! keys once and runs the matrix kernel on taller tiles. At 620 tokens (SmolLM2's 9 heads on 3
//! key heads) forward 3.20–3.25 → 2.87–3.00 ms and backward 6.98–7.23 → 6.13–6.41 ms per
//! layer, alternating runs.
//!
//! Layouts (all contiguous f32): queries that share a key head are stacked along the sequence
//! axis, `q` and `o` as (batch, kv_heads, group * queries, head_dim), `k` and `v` as (batch,
//! kv_heads, keys, head_dim), the log-sum-exp as (batch, kv_heads, group * queries). The
//! queries are the last `queries` of the `keys` positions (earlier keys come from a cache).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Mutex, TryLockError};

use candle_core::{bail, Device, Result, Tensor};
use rayon::prelude::*;

use super::block_product::{block_product, Needs};
use super::decode_dot::{self, Kernel};
use super::kernels::with_slice;
use super::matmul::{self, small_product, In, Out, SharedOut};
use super::simd;
use crate::threads::costliest_first;

/// Queries per block: small enough to skip most of the masked triangle and keep a block's
/// scores in cache, large enough for the matrix kernel to run near its peak.
const BLOCK: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct Attention {
    pub batch: usize,
    pub kv_heads: usize,
    /// Query heads per key head.
    pub group: usize,
    pub queries: usize,
    pub keys: usize,
    /// Rows per head in the key and value buffers: `keys`, or more for a decoding cache
    /// whose capacity is not filled yet (only the first `keys` rows are read).
    pub key_rows: usize,
    pub head_dim: usize,
    /// Keys farther back than this are not seen (Gemma's local layers).
    pub window: Option<usize>,
    /// Scores are multiplied by this before the softmax.
    pub scale: f32,
    /// Gemma 2: scaled scores become cap * tanh(score / cap) before the softmax.
    pub softcap: Option<f32>,
}

/// One block of queries: see `Attention::block`. Ranges count rows of `head_dim` values.
struct Block {
    i0: usize,
    klo: usize,
    rows: Range<usize>,
    keys: Range<usize>,
}

impl Block {
    /// The rows `r` of a matrix whose rows hold `width` values.
    fn of<'a>(r: &Range<usize>, x: &'a [f32], width: usize) -> &'a [f32] {
        &x[r.start * width..r.end * width]
    }
}

/// What the backward pass returns: d q, d k, d v, in the layouts above.
pub struct AttentionGrads {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

/// The backward pass's inputs as slices, in the layouts above.
#[derive(Clone, Copy)]
struct BackwardInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    lse: &'a [f32],
    d_out: &'a [f32],
}

impl Attention {
    fn offset(&self) -> usize {
        self.keys - self.queries
    }

    /// The keys query `i` sees, as a half-open range.
    fn visible(&self, i: usize) -> (usize, usize) {
        let p = self.offset() + i;
        let lo = self.window.map_or(0, |w| (p + 1).saturating_sub(w));
        (lo, p + 1)
    }

    /// The keys that rows `rows` of a stacked block (queries `i0 + r % per_head`) see between
    /// them, counted from key `klo`.
    fn panel_keys(
        &self,
        rows: Range<usize>,
        per_head: usize,
        i0: usize,
        klo: usize,
    ) -> Range<usize> {
        let (mut lo, mut hi) = (usize::MAX, 0);
        for r in rows {
            let (l, h) = self.visible(i0 + r % per_head);
            (lo, hi) = (lo.min(l), hi.max(h));
        }
        lo - klo..hi - klo
    }

    /// The rows of a block of `heads` stacked heads (queries `i0..i0 + per_head` each) that
    /// see any of `keys` (counted from key `klo`), one stretch per head, pushed onto `out`.
    #[allow(clippy::too_many_arguments)]
    fn rows_seeing(
        &self,
        keys: Range<usize>,
        heads: usize,
        per_head: usize,
        i0: usize,
        klo: usize,
        out: &mut Vec<Range<usize>>,
    ) {
        let (first, end) = (klo + keys.start, klo + keys.end);
        // A query's visible range moves right with the query: both bounds are monotone.
        let from = first_where(per_head, |r| self.visible(i0 + r).1 > first);
        let to = first_where(per_head, |r| self.visible(i0 + r).0 >= end);
        if from < to {
            out.extend((0..heads).map(|h| h * per_head + from..h * per_head + to));
        }
    }

    /// Where queries `i0..i1` of stacked matrix `mi` live: their rows in `q` (and `o`, the
    /// log-sum-exp), and the rows of `k` and `v` they see, from key `klo` on.
    fn block(&self, mi: usize, i0: usize, i1: usize) -> Block {
        let (tq, tk) = (self.queries, self.key_rows);
        let (klo, khi) = (self.visible(i0).0, self.visible(i1 - 1).1);
        let head = mi / self.group;
        Block {
            i0,
            klo,
            rows: mi * tq + i0..mi * tq + i1,
            keys: head * tk + klo..head * tk + khi,
        }
    }

    fn check(&self, t: &Tensor, rows: usize, cols: usize, what: &str) -> Result<()> {
        let want = self.batch * self.kv_heads * rows * cols;
        if t.elem_count() != want {
            bail!(
                "attention: {what} has shape {:?}, expected {want} elements",
                t.shape()
            )
        }
        Ok(())
    }

    /// The scores of queries `i0..i0 + m` (rows of `q`, row-major) against the keys they see,
    /// `keys` rows from `klo`, as probabilities written to `p`: (m, nk) row-major, masked
    /// entries 0. With `lse`, the rows' log-sum-exp is used (backward); without, it is
    /// computed and returned.
    /// `q` may stack the same queries of several heads (`per_head` rows each): row r is
    /// query `i0 + r % per_head`.
    #[allow(clippy::too_many_arguments)]
    fn block_probs(
        &self,
        products: Products,
        q: &[f32],
        per_head: usize,
        keys: &[f32],
        i0: usize,
        klo: usize,
        lse: Option<&[f32]>,
        p: &mut [f32],
        mut cap_slope: Option<&mut [f32]>,
    ) -> Vec<f32> {
        let hd = self.head_dim;
        let (m, nk) = (q.len() / hd, keys.len() / hd);
        let columns = |rows: Range<usize>| self.panel_keys(rows, per_head, i0, klo);
        times_transposed(products, p, q, keys, hd, Needs::Columns(&columns));
        let mut lse_out = Vec::with_capacity(if lse.is_some() { 0 } else { m });
        for (r, row) in p.chunks_mut(nk).enumerate() {
            let (lo, hi) = self.visible(i0 + r % per_head);
            let (lo, hi) = (lo - klo, hi - klo);
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            let row = &mut row[lo..hi];
            if let Some(cap) = self.softcap {
                // Stored pre-scaled so that the exponent below, scale * v, is the capped score;
                // the slope d capped / d (scale * raw) is kept for the backward pass.
                let slopes = cap_slope
                    .as_deref_mut()
                    .map(|s| &mut s[r * nk + lo..r * nk + hi]);
                let scale = self.scale;
                match slopes {
                    Some(slopes) => {
                        for (v, s) in row.iter_mut().zip(slopes) {
                            let t = (*v * scale / cap).tanh();
                            *s = 1.0 - t * t;
                            *v = cap * t / scale;
                        }
                    }
                    None => self.cap_scores(cap, row),
                }
            }
            match lse {
                Some(lse) => {
                    simd::exp_affine_sum(row, self.scale, lse[r]);
                }
                None => {
                    let max = simd::max(row);
                    let sum = simd::exp_affine_sum(row, self.scale, max * self.scale);
                    let inv = 1.0 / sum;
                    for v in row.iter_mut() {
                        *v *= inv;
                    }
                    lse_out.push(max * self.scale + sum.ln());
                }
            }
        }
        lse_out
    }

    /// The query blocks `i0..i1` of every head that shares key matrix `mk`: the heads' rows
    /// of each block, and the block's keys (the same for every head of the group).
    fn unit_blocks(&self, u: Unit) -> (Vec<Range<usize>>, Block) {
        let g = self.group;
        let rows = (u.h0..u.h1)
            .map(|h| self.block(u.mk * g + h, u.i0, u.i1).rows)
            .collect();
        (rows, self.block(u.mk * g + u.h0, u.i0, u.i1))
    }

    /// One unit's share of the backward pass: writes its rows of d q, and its keys' d k and
    /// d v to `dk` and `dv` (the rows of the keys it sees; added to them with `accumulate`).
    /// The group's heads go through each product together.
    #[allow(clippy::too_many_arguments)]
    fn unit_backward(
        &self,
        products: Products,
        unit: Unit,
        (dk, dv): (&mut [f32], &mut [f32]),
        accumulate: bool,
        inputs: &BackwardInputs,
        dq: SharedOut,
    ) {
        let BackwardInputs {
            q,
            k,
            v,
            lse,
            d_out,
        } = *inputs;
        let hd = self.head_dim;
        let (heads, b) = self.unit_blocks(unit);
        let (per_head, m, nk) = (unit.queries(), unit.rows(), b.keys.len());
        let qs = stacked(&heads, q, hd);
        let d_o = stacked(&heads, d_out, hd);
        let lse = stacked(&heads, lse, 1);
        let keys = Block::of(&b.keys, k, hd);
        let values = Block::of(&b.keys, v, hd);
        let mut slopes = self.softcap.map(|_| vec![0f32; m * nk]);
        with_scratch(m * nk, |p, ds| {
            let lse = Some(&lse[..]);
            let slopes_out = slopes.as_deref_mut();
            let (i0, klo) = (b.i0, b.klo);
            self.block_probs(products, &qs, per_head, keys, i0, klo, lse, p, slopes_out);
            // d probs = d_o values^T (where p is not masked), then d scores in place, zero
            // where masked: the products below read whole panels' stretches of them.
            let columns = |rows: Range<usize>| self.panel_keys(rows, per_head, i0, klo);
            times_transposed(products, ds, &d_o, values, hd, Needs::Columns(&columns));
            for (r, (row, p)) in ds.chunks_mut(nk).zip(p.chunks(nk)).enumerate() {
                let (lo, hi) = self.visible(i0 + r % per_head);
                let (lo, hi) = (lo - klo, hi - klo);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
                let (row, p) = (&mut row[lo..hi], &p[lo..hi]);
                let inner = decode_dot::dot(row, p);
                for (d, &p) in row.iter_mut().zip(p) {
                    *d = self.scale * p * (*d - inner);
                }
                if let Some(slopes) = &slopes {
                    for (d, s) in row.iter_mut().zip(&slopes[r * nk + lo..r * nk + hi]) {
                        *d *= s;
                    }
                }
            }
            // d q = d scores keys; d k += d scores^T q; d v += p^T d_o.
            let mut dqs = vec![0f32; m * hd];
            let keys = In(keys, hd, 1);
            let seen = |rows: Range<usize>, out: &mut Vec<Range<usize>>| {
                out.push(self.panel_keys(rows, per_head, i0, klo))
            };
            let dims = (m, hd, nk);
            products.run(
                Out(&mut dqs, hd),
                In(ds, nk, 1),
                keys,
                dims,
                false,
                Needs::Depth(&seen),
            );
            // SAFETY: these rows of d q belong to this unit alone.
            unsafe { scatter(dq, &heads, &dqs, hd) };
            let seeing = |keys: Range<usize>, out: &mut Vec<Range<usize>>| {
                self.rows_seeing(keys, unit.h1 - unit.h0, per_head, i0, klo, out)
            };
            let dims = (nk, hd, m);
            let (dk, dv) = (Out(dk, hd), Out(dv, hd));
            let depth = Needs::Depth(&seeing);
            products.run(dk, In(ds, 1, nk), In(&qs, hd, 1), dims, accumulate, depth);
            let depth = Needs::Depth(&seeing);
            products.run(dv, In(p, 1, nk), In(&d_o, hd, 1), dims, accumulate, depth);
        });
    }

    /// Runs every unit's backward (writing d q) and returns d k and d v, whole. Each unit's
    /// keys get a slot of their own, and the slots are added up afterwards in the units'
    /// order: the sums do not depend on which thread ran which unit, and units can be handed
    /// out one at a time. Past `slot_budget` bytes of slots (`SLOT_BUDGET_BYTES`: about 1,600
    /// tokens on SmolLM2), parts of consecutive units share their sums instead.
    fn key_grads(
        &self,
        products: Products,
        slot_budget: usize,
        inputs: &BackwardInputs,
        dq: SharedOut,
    ) -> (Vec<f32>, Vec<f32>) {
        let hd = self.head_dim;
        let key_len = self.batch * self.kv_heads * self.keys * hd;
        let units = self.units();
        let keys: Vec<Range<usize>> = units.iter().map(|&u| self.unit_keys(u)).collect();
        let slot_len: usize = keys.iter().map(|r| r.len() * hd).sum();
        if 2 * slot_len * std::mem::size_of::<f32>() > slot_budget {
            return self.key_grads_by_parts(products, inputs, dq, units, key_len);
        }
        with_slots(slot_len, |slot_k, slot_v| {
            let (mut rest_k, mut rest_v) = (&mut *slot_k, &mut *slot_v);
            let mut jobs = Vec::with_capacity(units.len());
            for (&unit, keys) in units.iter().zip(&keys) {
                let len = keys.len() * hd;
                let (k, tail_k) = std::mem::take(&mut rest_k).split_at_mut(len);
                let (v, tail_v) = std::mem::take(&mut rest_v).split_at_mut(len);
                (rest_k, rest_v) = (tail_k, tail_v);
                jobs.push((unit, k, v));
            }
            costliest_first(
                jobs,
                |(unit, ..)| self.unit_cost(*unit),
                |(unit, k, v)| self.unit_backward(products, unit, (k, v), false, inputs, dq),
            );
            let mut at = 0;
            let slots: Vec<KeySums> = keys
                .iter()
                .map(|keys| {
                    let (from, len) = (at, keys.len() * hd);
                    at += len;
                    KeySums {
                        start: keys.start * hd,
                        k: &slot_k[from..from + len],
                        v: &slot_v[from..from + len],
                    }
                })
                .collect();
            KeySums::add_up(&slots, key_len)
        })
    }

    /// `key_grads` for long sequences: parts of consecutive units of about equal cost, four
    /// per thread, each summing its units' d k and d v; the parts added up in their order.
    fn key_grads_by_parts(
        &self,
        products: Products,
        inputs: &BackwardInputs,
        dq: SharedOut,
        units: Vec<Unit>,
        key_len: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let hd = self.head_dim;
        let matrix = self.keys * hd;
        let cost = |&unit: &Unit| self.unit_cost(unit);
        let parts = split_by_cost(units, 4 * rayon::current_num_threads(), cost);
        let sums = costliest_first(
            parts,
            |part| part.iter().map(cost).sum(),
            |part| {
                // Sums for the key matrices this part reads.
                let first = part.first().map_or(0, |u| u.mk);
                let last = part.last().map_or(0, |u| u.mk);
                let len = (last + 1 - first) * matrix;
                let (mut k, mut v) = (vec![0f32; len], vec![0f32; len]);
                for &unit in &part {
                    let keys = self.unit_keys(unit);
                    let rows = keys.start * hd - first * matrix..keys.end * hd - first * matrix;
                    let sums = (&mut k[rows.clone()], &mut v[rows]);
                    self.unit_backward(products, unit, sums, true, inputs, dq);
                }
                (first * matrix, k, v)
            },
        );
        let sums: Vec<KeySums> = sums
            .iter()
            .map(|(start, k, v)| KeySums {
                start: *start,
                k,
                v,
            })
            .collect();
        KeySums::add_up(&sums, key_len)
    }

    /// The rows of `k` and `v` (whole layout) that a unit's queries see.
    fn unit_keys(&self, unit: Unit) -> Range<usize> {
        self.block(unit.mk * self.group + unit.h0, unit.i0, unit.i1)
            .keys
    }

    /// A unit's share of the work: its rows times the keys they see between them.
    fn unit_cost(&self, unit: Unit) -> usize {
        unit.rows() * self.unit_keys(unit).len()
    }

    /// Every unit of work: each key matrix's query blocks, the group's heads together. With
    /// fewer queries than a block (decoding, short suffixes) each head is a unit of its own:
    /// one unit per key head left a thread idle (decoding measured 118 → 101 tokens/s).
    fn units(&self) -> Vec<Unit> {
        let (tq, g) = (self.queries, self.group);
        let heads: Vec<(usize, usize)> = if tq >= BLOCK {
            vec![(0, g)]
        } else {
            (0..g).map(|h| (h, h + 1)).collect()
        };
        let mut units = Vec::new();
        for mk in 0..self.batch * self.kv_heads {
            for i0 in (0..tq).step_by(BLOCK) {
                for &(h0, h1) in &heads {
                    let i1 = (i0 + BLOCK).min(tq);
                    units.push(Unit { mk, i0, i1, h0, h1 });
                }
            }
        }
        units
    }

    /// Returns the output (layout of `q`) and each query row's log-sum-exp of scaled scores.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_on(Products::best(), q, k, v)
    }

    fn forward_on(
        &self,
        products: Products,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (g, tq, hd) = (self.group, self.queries, self.head_dim);
        self.check(q, g * tq, hd, "q")?;
        self.check(k, self.key_rows, hd, "k")?;
        self.check(v, self.key_rows, hd, "v")?;
        let matrices = self.batch * self.kv_heads * g;
        if tq == 1 {
            let (out, lse) = with_slice(q, |q| {
                with_slice(k, |k| {
                    with_slice(v, |v| Ok(self.forward_one_query(q, k, v)))
                })
            })?;
            let (dev, (b, kv)) = (&Device::Cpu, (self.batch, self.kv_heads));
            return Ok((
                Tensor::from_vec(out, (b, kv, g, hd), dev)?,
                Tensor::from_vec(lse, (b, kv, g), dev)?,
            ));
        }
        // Written unit by unit: every row of every matrix belongs to one unit.
        let mut lse = matmul::uninit(matrices * tq);
        let mut out = matmul::uninit(matrices * tq * hd);
        let (lse_rows, out_rows) = (
            SharedOut::of_uninit(&mut lse),
            SharedOut::of_uninit(&mut out),
        );
        with_slice(q, |q| {
            with_slice(k, |k| {
                with_slice(v, |v| {
                    costliest_first(
                        self.units(),
                        |&u| self.unit_cost(u),
                        |unit| {
                            let (heads, b) = self.unit_blocks(unit);
                            let (per_head, m, nk) = (unit.queries(), unit.rows(), b.keys.len());
                            let qs = stacked(&heads, q, hd);
                            let values = Block::of(&b.keys, v, hd);
                            let keys = Block::of(&b.keys, k, hd);
                            with_scratch(m * nk.max(hd), |p, o| {
                                let p = &mut p[..m * nk];
                                let (i0, klo) = (b.i0, b.klo);
                                let block_lse = self.block_probs(
                                    products, &qs, per_head, keys, i0, klo, None, p, None,
                                );
                                let o = &mut o[..m * hd];
                                let seen = |rows: Range<usize>, out: &mut Vec<Range<usize>>| {
                                    out.push(self.panel_keys(rows, per_head, i0, klo))
                                };
                                products.run(
                                    Out(o, hd),
                                    In(p, nk, 1),
                                    In(values, hd, 1),
                                    (m, hd, nk),
                                    false,
                                    Needs::Depth(&seen),
                                );
                                // SAFETY: these rows belong to this unit alone.
                                unsafe {
                                    scatter(out_rows, &heads, o, hd);
                                    scatter(lse_rows, &heads, &block_lse, 1);
                                }
                            });
                        },
                    );
                    Ok(())
                })
            })
        })?;
        // SAFETY: the units cover every row of every matrix, and each wrote its rows.
        let (out, lse) = unsafe { (matmul::assume_init(out), matmul::assume_init(lse)) };
        let dev = &Device::Cpu;
        let (b, kv) = (self.batch, self.kv_heads);
        Ok((
            Tensor::from_vec(out, (b, kv, g * tq, hd), dev)?,
            Tensor::from_vec(lse, (b, kv, g * tq), dev)?,
        ))
    }

    /// `forward` for one query per head (decoding): the output and log-sum-exp as there.
    /// Each key head's keys and values are read once for its whole group of query heads (one
    /// unit per query head read them `group` times: at 356 keys, a tenth of a SmolLM2
    /// decoding step), split into ranges of keys so that every thread has work (three key
    /// heads as three units left one of two threads idle a third of the time). The ranges'
    /// softmaxes are merged by their maxima, as FlashDecoding does.
    fn forward_one_query(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (g, hd) = (self.group, self.head_dim);
        let (lo, hi) = self.visible(0);
        let matrices = self.batch * self.kv_heads;
        // Four units per thread where there are keys enough, ranges of at least 64 keys.
        let threads = rayon::current_num_threads().max(1);
        let splits = (4 * threads)
            .div_ceil(matrices)
            .clamp(1, (hi - lo).div_ceil(64).max(1));
        let len = (hi - lo).div_ceil(splits);
        let partials: Vec<RangeSoftmax> = (0..matrices * splits)
            .into_par_iter()
            .map(|unit| {
                let (mk, split) = (unit / splits, unit % splits);
                let start = (lo + split * len).min(hi);
                let keys = mk * self.key_rows + start..mk * self.key_rows + (start + len).min(hi);
                let queries = Block::of(&(mk * g..(mk + 1) * g), q, hd);
                self.range_softmax(queries, Block::of(&keys, k, hd), Block::of(&keys, v, hd))
            })
            .collect();
        let mut out = vec![0f32; matrices * g * hd];
        let mut lse = vec![0f32; matrices * g];
        for (mk, ranges) in partials.chunks(splits).enumerate() {
            for h in 0..g {
                let shift = ranges
                    .iter()
                    .map(|r| r.shift[h])
                    .fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f32> = ranges.iter().map(|r| (r.shift[h] - shift).exp()).collect();
                let sum: f32 = ranges.iter().zip(&weights).map(|(r, w)| r.sum[h] * w).sum();
                let row = mk * g + h;
                let o = &mut out[row * hd..(row + 1) * hd];
                for (r, w) in ranges.iter().zip(&weights) {
                    for (o, x) in o.iter_mut().zip(&r.out[h * hd..(h + 1) * hd]) {
                        *o += x * (w / sum);
                    }
                }
                lse[row] = shift + sum.ln();
            }
        }
        (out, lse)
    }

    /// Raw scores become capped ones, stored divided by the scale that the softmax's exponent
    /// multiplies them by again (so that the exponent is the capped score).
    fn cap_scores(&self, cap: f32, row: &mut [f32]) {
        let scale = self.scale;
        for v in row.iter_mut() {
            *v = cap * (*v * scale / cap).tanh() / scale;
        }
    }

    /// The softmax of `queries` (rows of `head_dim`) over one range of `keys`, unnormalized:
    /// see `RangeSoftmax`.
    fn range_softmax(&self, queries: &[f32], keys: &[f32], values: &[f32]) -> RangeSoftmax {
        let hd = self.head_dim;
        let (m, n) = (queries.len() / hd, keys.len() / hd);
        let mut part = RangeSoftmax {
            out: vec![0.0; m * hd],
            shift: vec![f32::NEG_INFINITY; m],
            sum: vec![0.0; m],
        };
        if n == 0 {
            return part;
        }
        let mut scores = vec![0f32; m * n];
        simd::dots_with_rows(queries, keys, hd, &mut scores);
        for (h, row) in scores.chunks_exact_mut(n).enumerate() {
            if let Some(cap) = self.softcap {
                self.cap_scores(cap, row);
            }
            part.shift[h] = simd::max(row) * self.scale;
            part.sum[h] = simd::exp_affine_sum(row, self.scale, part.shift[h]);
            simd::weighted_row_sum(row, values, &mut part.out[h * hd..(h + 1) * hd]);
        }
        part
    }

    /// Input gradients given the forward pass's inputs, its log-sum-exp and d output.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lse: &Tensor,
        d_out: &Tensor,
    ) -> Result<AttentionGrads> {
        self.backward_on(Products::best(), SLOT_BUDGET_BYTES, q, k, v, lse, d_out)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_on(
        &self,
        products: Products,
        slot_budget: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        lse: &Tensor,
        d_out: &Tensor,
    ) -> Result<AttentionGrads> {
        let (g, tq, tk, hd) = (self.group, self.queries, self.keys, self.head_dim);
        if self.key_rows != tk {
            bail!("attention backward: key buffers must hold exactly the keys");
        }
        self.check(q, g * tq, hd, "q")?;
        self.check(k, tk, hd, "k")?;
        self.check(v, tk, hd, "v")?;
        self.check(lse, g * tq, 1, "lse")?;
        self.check(d_out, g * tq, hd, "d_out")?;
        let matrices = self.batch * self.kv_heads * g;
        let mut dq = matmul::uninit(matrices * tq * hd);
        let dq_rows = SharedOut::of_uninit(&mut dq);
        let key_grads = with_slice(q, |q| {
            with_slice(k, |k| {
                with_slice(v, |v| {
                    with_slice(lse, |lse| {
                        with_slice(d_out, |d_out| {
                            let inputs = BackwardInputs {
                                q,
                                k,
                                v,
                                lse,
                                d_out,
                            };
                            Ok(self.key_grads(products, slot_budget, &inputs, dq_rows))
                        })
                    })
                })
            })
        })?;
        // SAFETY: the units cover every row of d q, and each wrote its rows.
        let dq = unsafe { matmul::assume_init(dq) };
        let dev = &Device::Cpu;
        let (b, kv) = (self.batch, self.kv_heads);
        Ok(AttentionGrads {
            q: Tensor::from_vec(dq, (b, kv, g * tq, hd), dev)?,
            k: Tensor::from_vec(key_grads.0, (b, kv, tk, hd), dev)?,
            v: Tensor::from_vec(key_grads.1, (b, kv, tk, hd), dev)?,
        })
    }
}

/// A unit of work: key matrix `mk` (batch element and key head), queries `i0..i1`, and the
/// heads `h0..h1` of those that share it.
#[derive(Clone, Copy)]
struct Unit {
    mk: usize,
    i0: usize,
    i1: usize,
    h0: usize,
    h1: usize,
}

impl Unit {
    /// Queries per head.
    fn queries(&self) -> usize {
        self.i1 - self.i0
    }

    /// Rows of the stack: the queries of every head.
    fn rows(&self) -> usize {
        (self.h1 - self.h0) * self.queries()
    }
}

/// One range of keys' share of a decoding step, per query row h: Σ_j e^(s_j - shift_h) v_j in
/// `out` (rows of `head_dim`), the shift (the largest scaled score) and Σ_j e^(s_j - shift_h).
struct RangeSoftmax {
    out: Vec<f32>,
    shift: Vec<f32>,
    sum: Vec<f32>,
}

/// The rows `heads` of a matrix whose rows hold `width` values, one after another.
fn stacked(heads: &[Range<usize>], x: &[f32], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads.iter().map(|r| r.len() * width).sum());
    for rows in heads {
        out.extend_from_slice(Block::of(rows, x, width));
    }
    out
}

/// Writes `values`, stacked as `stacked` reads them, back to the rows `heads` of `out`.
///
/// # Safety
/// No other thread reads or writes these rows meanwhile.
unsafe fn scatter(out: SharedOut, heads: &[Range<usize>], values: &[f32], width: usize) {
    let mut from = 0;
    for rows in heads {
        let len = rows.len() * width;
        // SAFETY: the caller owns these rows.
        unsafe { out.write(rows.start * width, &values[from..from + len]) };
        from += len;
    }
}

/// Some units' d k and d v sums: values `start..start + k.len()` of the whole layout.
struct KeySums<'a> {
    start: usize,
    k: &'a [f32],
    v: &'a [f32],
}

impl KeySums<'_> {
    /// The whole d k and d v (`len` values each): `sums` added up in their order, whatever
    /// thread made which, chunks of the output in parallel.
    fn add_up(sums: &[KeySums], len: usize) -> (Vec<f32>, Vec<f32>) {
        const CHUNK: usize = 4096;
        let mut total = (vec![0f32; len], vec![0f32; len]);
        total
            .0
            .par_chunks_mut(CHUNK)
            .zip(total.1.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(c, (k, v))| {
                let chunk = c * CHUNK..c * CHUNK + k.len();
                for sums in sums {
                    let lo = sums.start.max(chunk.start);
                    let hi = (sums.start + sums.k.len()).min(chunk.end);
                    if lo >= hi {
                        continue;
                    }
                    let (from, to) = (
                        lo - sums.start..hi - sums.start,
                        lo - chunk.start..hi - chunk.start,
                    );
                    for (a, b) in k[to.clone()].iter_mut().zip(&sums.k[from.clone()]) {
                        *a += b;
                    }
                    for (a, b) in v[to].iter_mut().zip(&sums.v[from]) {
                        *a += b;
                    }
                }
            });
        total
    }
}

/// Splits `items` into at most `parts` consecutive runs of about equal total `cost`.
fn split_by_cost<T>(items: Vec<T>, parts: usize, cost: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let total: usize = items.iter().map(&cost).sum();
    let share = total.div_ceil(parts.max(1)).max(1);
    let mut out = vec![Vec::new()];
    let mut run = 0;
    for item in items {
        let c = cost(&item);
        if run >= share {
            out.push(Vec::new());
            run = 0;
        }
        run += c;
        out.last_mut().expect("never empty").push(item);
    }
    out
}

thread_local! {
    /// Each thread's buffers for a block's probabilities and score gradients. They are reused
    /// across blocks and layers: a fresh zeroed allocation per block cost 4 % of a salience pass
    /// in memset and page faults. Every use overwrites what it reads.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The most memory the backward pass's per-unit d k / d v slots may take (both together).
const SLOT_BUDGET_BYTES: usize = 32 << 20;

/// The d k / d v slots, reused across layers and passes (fresh ones would be zeroed and
/// faulted in for every layer). One pair for the process, not one per thread: the thread that
/// runs a layer's backward changes from layer to layer, and each would have kept its own.
static SLOTS: Mutex<(Vec<f32>, Vec<f32>)> = Mutex::new((Vec::new(), Vec::new()));

/// Runs `f` on two slot slices of `len` values each, with stale contents (fresh ones while
/// another backward pass holds the shared pair).
fn with_slots<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    let mut own = (Vec::new(), Vec::new());
    // A panic inside `f` leaves the pair poisoned, but its contents are stale anyway.
    let mut guard = match SLOTS.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    let (a, b) = match guard.as_deref_mut() {
        Some(pair) => pair,
        None => &mut own,
    };
    for buf in [&mut *a, &mut *b] {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
    }
    f(&mut a[..len], &mut b[..len])
}

/// Runs `f` on two scratch slices of `len` values each, with stale contents.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let (a, b) = &mut *cell.borrow_mut();
        for buf in [&mut *a, &mut *b] {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
        }
        f(&mut a[..len], &mut b[..len])
    })
}

/// dst (m × n) = lhs (m × hd) · rhs^T for rhs (n × hd), both row-major: a block's scores
/// against its keys, or its d probs against its values.
fn times_transposed(
    products: Products,
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    hd: usize,
    needs: Needs,
) {
    let (m, n) = (lhs.len() / hd, rhs.len() / hd);
    products.run(
        Out(dst, n),
        In(lhs, hd, 1),
        In(rhs, 1, hd),
        (m, n, hd),
        false,
        needs,
    );
}

/// What runs the blocks' products.
#[derive(Debug, Clone, Copy)]
enum Products {
    /// The engine's register tile, skipping masked tiles (`block_product`).
    Tile(Kernel),
    /// The `gemm` crate, whole products.
    Gemm,
}

impl Products {
    /// The AVX2 tile where the 256-bit paths are taken (`decode_dot::takes_256_bit_paths`).
    /// Where AVX2 is the widest kernel: on Zen 3 the `gemm` crate ran these shapes at about 70
    /// GFLOP/s per thread where the tile runs 93. Where AVX-512's multiply-adds run no faster
    /// than AVX2's (AMD Zen 4), the tile skips the masked half that `gemm` computes: gradient
    /// passes of 600 tokens, alternating binaries, SmolLM2 1.74–1.83 → 1.59–1.82 s, Gemma 3
    /// (head_dim 256) 1.75–1.92 → 1.57–1.69 s. Elsewhere `gemm`, whose AVX-512 kernels the
    /// panel kernel did not beat on Xeons (not measured against the masked tiles), and whose
    /// portable ones are faster than the portable tile.
    fn best() -> Products {
        if super::decode_dot::takes_256_bit_paths(Kernel::best()) {
            Products::Tile(Kernel::Avx2)
        } else {
            Products::Gemm
        }
    }

    /// dst = lhs · rhs (+= with `accumulate`); `needs` says what may be skipped, and where it
    /// allows skipping only the tile skips.
    fn run(
        self,
        dst: Out,
        lhs: In,
        rhs: In,
        dims: (usize, usize, usize),
        accumulate: bool,
        needs: Needs,
    ) {
        match self {
            Products::Tile(kernel) => block_product(dst, lhs, rhs, dims, accumulate, needs, kernel),
            Products::Gemm => small_product(dst, lhs, rhs, dims, accumulate),
        }
    }
}

/// The first `i` in `0..n` where `past(i)` holds, for `past` false then true along `0..n`
/// (n when it never holds).
fn first_where(n: usize, past: impl Fn(usize) -> bool) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if past(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::tests::max_diff;
    use crate::model::ops;
    use candle_core::D;

    /// The plain computation: full matmuls with an additive mask. Returns the output and each
    /// row's log-sum-exp.
    fn reference(a: &Attention, q: &Tensor, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let offset = a.keys - a.queries;
        let mask = ops::attention_mask(a.group, a.queries, a.keys, offset, a.window).unwrap();
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * a.scale as f64).unwrap();
        if let Some(cap) = a.softcap {
            scores = ((scores / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap();
        }
        let masked = scores.broadcast_add(&mask).unwrap();
        let probs = candle_nn::ops::softmax(&masked, D::Minus1).unwrap();
        let lse = masked.exp().unwrap().sum(D::Minus1).unwrap().log().unwrap();
        (probs.matmul(v).unwrap(), lse)
    }

    fn cases() -> Vec<Attention> {
        let mut out = vec![];
        // Sizes straddle the block size; offsets stand for a cache; windows for Gemma.
        // One query after many keys is decoding (its own dot and weighted-sum path).
        for (queries, keys) in [
            (1, 1),
            (5, 5),
            (70, 70),
            (130, 130),
            (3, 70),
            (67, 200),
            (1, 70),
        ] {
            for (window, softcap) in [(None, None), (Some(4), None), (Some(100), Some(0.8))] {
                out.push(Attention {
                    batch: 2,
                    kv_heads: 2,
                    group: 3,
                    queries,
                    keys,
                    key_rows: keys,
                    head_dim: 8,
                    window,
                    scale: 0.3,
                    softcap,
                });
            }
        }
        // Decoding with SmolLM2's head size (the kernels' strips of 32 columns).
        out.push(Attention {
            head_dim: 64,
            ..out[out.len() - 3]
        });
        out
    }

    fn inputs(a: &Attention) -> (Tensor, Tensor, Tensor) {
        let dev = &Device::Cpu;
        let (b, kv, hd) = (a.batch, a.kv_heads, a.head_dim);
        let q = Tensor::randn(0f32, 1.0, (b, kv, a.group * a.queries, hd), dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, kv, a.keys, hd), dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, kv, a.keys, hd), dev).unwrap();
        (q, k, v)
    }

    /// Every way this CPU can run the blocks' products.
    fn every_products() -> Vec<Products> {
        let tiles = Kernel::available()
            .into_iter()
            .filter(|k| *k != Kernel::Avx512);
        std::iter::once(Products::Gemm)
            .chain(tiles.map(Products::Tile))
            .collect()
    }

    #[test]
    fn forward_matches_masked_full_attention() {
        for products in every_products() {
            for a in cases() {
                let (q, k, v) = inputs(&a);
                let (o, lse) = a.forward_on(products, &q, &k, &v).unwrap();
                let (want_o, want_lse) = reference(&a, &q, &k, &v);
                assert!(max_diff(&lse, &want_lse) < 1e-4, "{products:?} {a:?}");
                assert!(max_diff(&o, &want_o) < 1e-4, "{products:?} {a:?}");
            }
        }
    }

    #[test]
    fn the_masked_tiles_agree_with_whole_products() {
        // The tile skips what the mask zeroes; gemm multiplies everything. Both must give the
        // same gradients to rounding, on sizes past several blocks, with windows.
        let tiles: Vec<Products> = every_products().into_iter().skip(1).collect();
        let mut cases: Vec<Attention> = cases().into_iter().filter(|a| a.queries > 1).collect();
        // Real head sizes, past three blocks, a window that cuts into the blocks.
        for (head_dim, window, queries) in [(64, None, 200), (64, Some(150), 200), (256, None, 131)]
        {
            cases.push(Attention {
                batch: 1,
                kv_heads: 1,
                group: 3,
                queries,
                keys: 200,
                key_rows: 200,
                head_dim,
                window,
                scale: 0.125,
                softcap: None,
            });
        }
        for a in cases {
            let (q, k, v) = inputs(&a);
            let (o, lse) = a.forward_on(Products::Gemm, &q, &k, &v).unwrap();
            let w = o.randn_like(0.0, 1.0).unwrap();
            let want = a
                .backward_on(Products::Gemm, SLOT_BUDGET_BYTES, &q, &k, &v, &lse, &w)
                .unwrap();
            for &products in &tiles {
                let (o2, lse2) = a.forward_on(products, &q, &k, &v).unwrap();
                assert!(max_diff(&o, &o2) < 1e-5, "{products:?} {a:?}");
                assert!(max_diff(&lse, &lse2) < 1e-5, "{products:?} {a:?}");
                // Per-unit slots, and parts sharing sums (no room for slots).
                for budget in [SLOT_BUDGET_BYTES, 0] {
                    let got = a
                        .backward_on(products, budget, &q, &k, &v, &lse, &w)
                        .unwrap();
                    for (x, y) in [(&got.q, &want.q), (&got.k, &want.k), (&got.v, &want.v)] {
                        let scale = max_diff(y, &y.zeros_like().unwrap()).max(1.0);
                        assert!(max_diff(x, y) < 1e-5 * scale, "{products:?} {budget} {a:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn backward_gives_the_same_bits_every_time() {
        // Units go to whichever thread is free; the sums over them must not depend on it.
        let a = Attention {
            batch: 1,
            kv_heads: 2,
            group: 3,
            queries: 400,
            keys: 400,
            key_rows: 400,
            head_dim: 64,
            window: None,
            scale: 0.125,
            softcap: None,
        };
        let (q, k, v) = inputs(&a);
        let (o, lse) = a.forward(&q, &k, &v).unwrap();
        let w = o.randn_like(0.0, 1.0).unwrap();
        for budget in [SLOT_BUDGET_BYTES, 0] {
            let runs: Vec<AttentionGrads> = (0..6)
                .map(|_| {
                    a.backward_on(Products::best(), budget, &q, &k, &v, &lse, &w)
                        .unwrap()
                })
                .collect();
            for run in &runs[1..] {
                for (x, y) in [
                    (&run.q, &runs[0].q),
                    (&run.k, &runs[0].k),
                    (&run.v, &runs[0].v),
                ] {
                    assert_eq!(max_diff(x, y), 0.0, "budget {budget}");
                }
            }
        }
    }

    #[test]
    fn spare_rows_in_the_key_buffers_are_never_read() {
        // A decoding cache holds more rows per head than are filled: fill the spare rows
        // with NaN, and the output must equal the one from exact buffers.
        for a in cases() {
            let (q, k, v) = inputs(&a);
            let (want_o, want_lse) = a.forward(&q, &k, &v).unwrap();
            let spare = 7;
            let pad = |x: &Tensor| {
                let (b, kv, _, hd) = x.dims4().unwrap();
                let nan = Tensor::full(f32::NAN, (b, kv, spare, hd), &Device::Cpu).unwrap();
                Tensor::cat(&[x, &nan], 2).unwrap().contiguous().unwrap()
            };
            let mut padded = a;
            padded.key_rows = a.keys + spare;
            let (o, lse) = padded.forward(&q, &pad(&k), &pad(&v)).unwrap();
            assert_eq!(max_diff(&o, &want_o), 0.0, "{a:?}");
            assert_eq!(max_diff(&lse, &want_lse), 0.0, "{a:?}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // d/dx of sum(o * w) for a random w, against central differences of the forward pass.
        let cases = cases().into_iter().filter(|a| a.keys <= 70);
        for (a, products) in cases.flat_map(|a| every_products().into_iter().map(move |p| (a, p))) {
            let (q, k, v) = inputs(&a);
            let (o, lse) = a.forward_on(products, &q, &k, &v).unwrap();
            let w = o.randn_like(0.0, 1.0).unwrap();
            let grads = a
                .backward_on(products, SLOT_BUDGET_BYTES, &q, &k, &v, &lse, &w)
                .unwrap();
            let objective = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
                let (o, _) = a.forward(q, k, v).unwrap();
                let o = o.to_dtype(candle_core::DType::F64).unwrap();
                let w = w.to_dtype(candle_core::DType::F64).unwrap();
                (o * w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            for which in 0..3 {
                let (x, analytic) = match which {
                    0 => (&q, &grads.q),
                    1 => (&k, &grads.k),
                    _ => (&v, &grads.v),
                };
                let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let analytic: Vec<f32> = analytic.flatten_all().unwrap().to_vec1().unwrap();
                // A spread of probe positions, including the first and last.
                let n = base.len();
                for idx in [0, 1, n / 7, n / 3, n / 2, 2 * n / 3, n - 2, n - 1] {
                    let h = 1e-2f32;
                    let shifted = |d: f32| {
                        let mut x2 = base.clone();
                        x2[idx] += d;
                        Tensor::from_vec(x2, x.shape(), &Device::Cpu).unwrap()
                    };
                    let f = |d: f32| match which {
                        0 => objective(&shifted(d), &k, &v),
                        1 => objective(&q, &shifted(d), &v),
                        _ => objective(&q, &k, &shifted(d)),
                    };
                    let numeric = ((f(h) - f(-h)) / (2.0 * h as f64)) as f32;
                    let got = analytic[idx];
                    assert!(
                        (got - numeric).abs() <= 2e-2 * (1.0 + numeric.abs()),
                        "{products:?} {a:?} input {which} index {idx}: {got} vs {numeric}"
                    );
                }
            }
        }
    }
}
