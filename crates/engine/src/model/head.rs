//! The output head: log-probabilities of target tokens and their gradient with respect to the
//! final normed hidden states, in one pass over the vocabulary.
//!
//! Logits, then a log-softmax, then d logits · W read the table twice (SmolLM2's is 49,152 ×
//! 576 in Q8_0, 30 MB: 8 % of a 100-token salience pass) and wrote and read back every
//! logit and its gradient. Here each chunk of the table is dequantized once and used for both
//! products, with a running maximum and sum per row (the online softmax FlashAttention uses
//! over keys): d x = slope_t W[t] - Σ_v p_v slope_v W[v], where the sum over v accumulates
//! chunk by chunk, rescaled whenever a row's maximum grows (slope is the soft-cap's
//! derivative, 1 without one). For 20 target rows on two threads: 25–28 ms → 19–21 ms.
//! The chunk's two products read it in place (`table_products.rs`): the `gemm` crate packed
//! the chunk again for each (Gemma 3's 262,144-row head: 89–98 ms → 67–80 ms for 20 rows), and
//! the panel kernel of `matmul.rs` needs it packed twice too, transposed and not.

use candle_core::{bail, Device, Result, Tensor};
use rayon::prelude::*;

use super::decode_dot::Kernel;
use super::kernels::with_slice;
use super::simd;
use super::table_products;
use super::weight::Weight;

/// Vocabulary rows per step. Each tile of scored rows reads the chunk's f32 copy again (7 times
/// for 20 rows in `dots`, 4 in `add_weighted_rows` on AVX2), so it must stay in L2: 64 rows are
/// 147 KB at SmolLM2's 576 columns, 164 KB at Gemma 3's 640. 256 rows (655 KB at 640) spilled
/// out of Zen 3's 512 KiB L2: in `perf` of 100-token Gemma 3 passes the head took 0.41–0.42 of
/// the register tile's time with 256, 0.36–0.38 with 128, 0.34–0.35 with 64 (alternating
/// binaries), from about 67 % of the multiply-add limit to 81 %.
const CHUNK: usize = 64;

/// Chunks one task sums before its partial result is merged: 2,048 vocabulary rows, 24 tasks
/// for SmolLM2's 49,152 rows.
const CHUNKS_PER_RUN: usize = 32;

/// A chunk's rows as f32, its logits, and their soft-cap slopes.
#[derive(Default)]
struct Scratch {
    rows: Vec<f32>,
    logits: Vec<f32>,
    slopes: Vec<f32>,
}

thread_local! {
    /// Each thread's chunk scratch, kept from one run to the next: a fresh one per run zeroed
    /// 0.6 MB for values that are all overwritten (128 runs for Gemma 3's vocabulary, 0.4 % of
    /// a 300-token salience pass in `perf`).
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// What one run of chunks knows about each row.
struct Partial {
    /// The largest logit seen (after the soft-cap).
    max: Vec<f32>,
    /// Σ exp(logit - max) over the logits seen, in f64 (49,152 terms).
    sum: Vec<f64>,
    /// Σ exp(logit - max) slope W[v] over the rows v seen: (n, hidden), empty without grad.
    acc: Vec<f32>,
    /// The target's logit and slope, once its chunk has been seen.
    target: Vec<Option<(f32, f32)>>,
}

impl Partial {
    fn new(n: usize, hidden: usize, grad: bool) -> Partial {
        Partial {
            max: vec![f32::NEG_INFINITY; n],
            sum: vec![0.0; n],
            acc: vec![0.0; if grad { n * hidden } else { 0 }],
            target: vec![None; n],
        }
    }

    /// Row `r`'s running values rescaled to the maximum `to` (>= its own).
    fn rescale(&mut self, r: usize, to: f32, hidden: usize) {
        let from = self.max[r];
        if from == to {
            return;
        }
        let f = if from == f32::NEG_INFINITY {
            0.0
        } else {
            (from - to).exp()
        };
        self.sum[r] *= f as f64;
        if !self.acc.is_empty() {
            for a in &mut self.acc[r * hidden..(r + 1) * hidden] {
                *a *= f;
            }
        }
        self.max[r] = to;
    }

    fn merge(mut self, mut other: Partial, hidden: usize) -> Partial {
        for r in 0..self.max.len() {
            let to = self.max[r].max(other.max[r]);
            self.rescale(r, to, hidden);
            other.rescale(r, to, hidden);
            self.sum[r] += other.sum[r];
            self.target[r] = self.target[r].or(other.target[r]);
        }
        for (a, b) in self.acc.iter_mut().zip(&other.acc) {
            *a += b;
        }
        self
    }
}

/// log p(targets[r]) for each row of `x` (n, hidden), the final-normed hidden states, under
/// logits x Wᵀ (soft-capped as cap tanh(z / cap) with `softcap`); with `grad`, also
/// d Σ_r log p / d x.
pub fn target_log_probs(
    head: &Weight,
    x: &Tensor,
    targets: &[u32],
    softcap: Option<f32>,
    grad: bool,
) -> Result<(Vec<f32>, Option<Tensor>)> {
    let (vocab, hidden) = head.dims();
    let (n, width) = x.dims2()?;
    if width != hidden || targets.len() != n {
        bail!(
            "head: {n} rows of {width} values and {} targets for a {vocab} × {hidden} table",
            targets.len()
        )
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("head: token {t} is outside the vocabulary of {vocab}")
    }
    let x = x.contiguous()?;
    let chunks = vocab.div_ceil(CHUNK);
    // Fixed runs of chunks, each summed on one thread and merged in order: the result does
    // not depend on how the pool splits the work (rayon's adaptive fold had made scores
    // differ in the last bits from one run to the next).
    let runs: Vec<std::ops::Range<usize>> = (0..chunks)
        .step_by(CHUNKS_PER_RUN)
        .map(|c| c..(c + CHUNKS_PER_RUN).min(chunks))
        .collect();
    let parts = with_slice(&x, |x| {
        runs.into_par_iter()
            .map(|run| {
                let mut part = Partial::new(n, hidden, grad);
                SCRATCH.with_borrow_mut(|scratch| {
                    for c in run {
                        let (v0, v1) = (c * CHUNK, ((c + 1) * CHUNK).min(vocab));
                        absorb(&mut part, scratch, head, x, targets, softcap, v0..v1)?;
                    }
                    Ok(part)
                })
            })
            .collect::<Result<Vec<Partial>>>()
    })?;
    let done = parts
        .into_iter()
        .reduce(|a, b| a.merge(b, hidden))
        .expect("a vocabulary has rows");
    let mut log_probs = Vec::with_capacity(n);
    for r in 0..n {
        let (z, _) = done.target[r].expect("every chunk was seen");
        log_probs.push(((z - done.max[r]) as f64 - done.sum[r].ln()) as f32);
    }
    if !grad {
        return Ok((log_probs, None));
    }
    // d x_r = slope_t W[t] - acc_r / sum_r.
    let mut dx = head.select_rows(targets)?.flatten_all()?.to_vec1::<f32>()?;
    for r in 0..n {
        let (_, slope) = done.target[r].expect("every chunk was seen");
        let inv = (1.0 / done.sum[r]) as f32;
        let row = &mut dx[r * hidden..(r + 1) * hidden];
        for (d, &a) in row.iter_mut().zip(&done.acc[r * hidden..(r + 1) * hidden]) {
            *d = slope * *d - a * inv;
        }
    }
    Ok((
        log_probs,
        Some(Tensor::from_vec(dx, (n, hidden), &Device::Cpu)?),
    ))
}

/// Adds vocabulary rows `v0..v1` to `part`.
fn absorb(
    part: &mut Partial,
    scratch: &mut Scratch,
    head: &Weight,
    x: &[f32],
    targets: &[u32],
    softcap: Option<f32>,
    std::ops::Range { start: v0, end: v1 }: std::ops::Range<usize>,
) -> Result<()> {
    let hidden = head.cols();
    let (n, rows) = (targets.len(), v1 - v0);
    let grad = !part.acc.is_empty();
    scratch.rows.resize(rows * hidden, 0.0);
    scratch.logits.resize(n * rows, 0.0);
    let Scratch {
        rows: w,
        logits: z,
        slopes,
    } = scratch;
    head.rows_into(v0, v1, w)?;
    // z (n × rows) = x (n × hidden) · wᵀ.
    let kernel = Kernel::best();
    table_products::dots(z, rows, x, w, (n, rows, hidden), kernel);
    // d capped / d z = 1 - (capped / cap)^2.
    let slope_of = |capped: f32, cap: f32| {
        let t = capped / cap;
        1.0 - t * t
    };
    for (r, zr) in z.chunks_mut(rows).enumerate() {
        let t = targets[r] as usize;
        if let Some(cap) = softcap {
            for v in zr.iter_mut() {
                *v = cap * (*v / cap).tanh();
            }
            if grad {
                slopes.clear();
                slopes.extend(zr.iter().map(|&c| slope_of(c, cap)));
            }
        }
        if (v0..v1).contains(&t) {
            let z_t = zr[t - v0];
            part.target[r] = Some((z_t, softcap.map_or(1.0, |cap| slope_of(z_t, cap))));
        }
        let to = part.max[r].max(simd::max(zr));
        part.rescale(r, to, hidden);
        simd::exp_affine_sum(zr, 1.0, to);
        part.sum[r] += simd::sum_f64(zr);
        if softcap.is_some() && grad {
            for (p, &s) in zr.iter_mut().zip(slopes.iter()) {
                *p *= s;
            }
        }
    }
    if grad {
        // acc (n × hidden) += p (n × rows) · w (rows × hidden).
        table_products::add_weighted_rows(&mut part.acc, z, rows, w, (n, rows, hidden), kernel);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::target_log_softmax;
    use crate::model::kernels::tests::{max_abs, max_diff, same_bits};
    use candle_core::quantized::{GgmlDType, QTensor};

    /// The plain composition: every logit, a log-softmax, then d logits · W.
    fn plain(
        head: &Weight,
        x: &Tensor,
        targets: &[u32],
        softcap: Option<f32>,
    ) -> (Vec<f32>, Tensor) {
        let mut logits = head.forward(x).unwrap();
        if let Some(cap) = softcap {
            logits = ((logits / cap as f64).unwrap().tanh().unwrap() * cap as f64).unwrap();
        }
        let (lp, g) = target_log_softmax(&logits, targets, true).unwrap();
        let mut g = g.unwrap();
        if let Some(cap) = softcap {
            let t = (&logits / cap as f64).unwrap();
            g = g.mul(&t.sqr().unwrap().affine(-1.0, 1.0).unwrap()).unwrap();
        }
        (lp, head.backward(&g).unwrap())
    }

    #[test]
    fn one_pass_matches_the_plain_composition() {
        // 600 rows: nine whole chunks and a short one; targets at both ends of the table and
        // of chunks (255 ends one, 256 starts the next).
        let (vocab, hidden) = (600, 64);
        let dev = &Device::Cpu;
        let table = (Tensor::randn(0f32, 1.0, (vocab, hidden), dev).unwrap() * 0.5).unwrap();
        let quantized = QTensor::quantize(&table, GgmlDType::Q8_0).unwrap();
        let heads = [
            Weight::dense(table.clone()).unwrap(),
            Weight::from_qtensor(quantized).unwrap(),
        ];
        let x = Tensor::randn(0f32, 1.0, (5, hidden), dev).unwrap();
        let targets = [0u32, 599, 300, 255, 256];
        for head in &heads {
            for softcap in [None, Some(3.0)] {
                let (want_lp, want_dx) = plain(head, &x, &targets, softcap);
                let (lp, dx) = target_log_probs(head, &x, &targets, softcap, true).unwrap();
                for (a, b) in lp.iter().zip(&want_lp) {
                    assert!((a - b).abs() < 2e-5 * (1.0 + b.abs()), "{a} vs {b}");
                }
                let dx = dx.unwrap();
                let scale = max_abs(&want_dx);
                let err = max_diff(&dx, &want_dx);
                assert!(err < 1e-5 * scale, "{err} against {scale}, cap {softcap:?}");
                let (lp_only, none) = target_log_probs(head, &x, &targets, softcap, false).unwrap();
                assert_eq!(lp_only, lp);
                assert!(none.is_none());
            }
        }
        assert!(target_log_probs(&heads[0], &x, &[0, 1, 2, 3, 600], None, false).is_err());
    }

    #[test]
    fn the_same_bits_every_run() {
        // Several runs of chunks, merged: the result must not follow the pool's splitting.
        let (vocab, hidden) = (6000, 32);
        let dev = &Device::Cpu;
        let head = Weight::dense(Tensor::randn(0f32, 1.0, (vocab, hidden), dev).unwrap()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, hidden), dev).unwrap();
        let targets = [5u32, 2500, 5999];
        let run = || {
            crate::threads::on_pool(|| target_log_probs(&head, &x, &targets, None, true)).unwrap()
        };
        let (lp, dx) = run();
        let dx = dx.unwrap();
        // The old adaptive fold failed this about one time in three with 10 repeats.
        for _ in 0..50 {
            let (lp2, dx2) = run();
            assert_eq!(lp, lp2);
            assert!(same_bits(&dx, &dx2.unwrap()));
        }
    }
}
