//! How much arithmetic a pass asks for: floating-point operations, 2 per multiply-add, of the
//! products a pass runs, counted from the weights' shapes and the positions each query sees.
//! `bench` divides them by its times and by the machine's multiply-add limit
//! (`crate::machine`), so a speed reads against what the hardware allows and not only
//! against another program's.
//!
//! Counted as this engine runs a pass: every layer's q/k/v product over every position, the
//! last layer's other products only over the rows it outputs (`Tape::outputs_from`);
//! attention over the keys each query sees (the causal triangle, cut by a sliding window),
//! two products forward (scores, then values), five backward (the scores again, the
//! probabilities' and values' gradients, the queries' and keys'); the head over the scored
//! rows and the whole vocabulary, once forward and once for its gradient; a backward pass's
//! weight products once more as the forward's (input gradients only: weights are frozen).
//! Element-wise work (norms, rotary, activations, the softmax's exponentials) is left out:
//! it is a few flops per value against hundreds per row in a product. So is what a pass runs
//! again to stay within its memory budget (`TAPE_BUDGET_BYTES`: past it, the backward pass
//! multiplies some activations again): the count is what the result needs, and a pass that
//! recomputes shows as a lower share of the machine's limit.

use std::ops::{Add, Mul};

use super::Model;

/// Floating-point operations, by where they go.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Flops {
    /// The layers' weight products (q/k/v, o, gate/up, down).
    pub weights: f64,
    /// Scores against keys and sums of values, and their gradients.
    pub attention: f64,
    /// The output head against the vocabulary.
    pub head: f64,
}

impl Flops {
    pub fn total(&self) -> f64 {
        self.weights + self.attention + self.head
    }
}

impl Add for Flops {
    type Output = Flops;
    fn add(self, o: Flops) -> Flops {
        Flops {
            weights: self.weights + o.weights,
            attention: self.attention + o.attention,
            head: self.head + o.head,
        }
    }
}

impl Mul<f64> for Flops {
    type Output = Flops;
    fn mul(self, k: f64) -> Flops {
        Flops {
            weights: self.weights * k,
            attention: self.attention * k,
            head: self.head * k,
        }
    }
}

/// The positions a pass runs through the layers.
#[derive(Debug, Clone, Copy)]
pub struct LayerPass {
    /// Sequences run together.
    pub batch: usize,
    /// Positions of each sequence the pass computes.
    pub positions: usize,
    /// Positions before them whose keys are read but not computed (a zero context, a cache).
    pub past: usize,
    /// The last layer outputs positions from here on (counted within `positions`).
    pub outputs_from: usize,
    /// With the backward pass (input gradients).
    pub backward: bool,
}

/// Products of a backward pass per product of the forward: attention's five against two.
const ATTENTION_BACKWARD: f64 = 5.0 / 2.0;

impl Model {
    /// The layers' share of a pass (weights and attention; the head is `head_flops`).
    pub fn layer_flops(&self, pass: &LayerPass) -> Flops {
        let c = &self.cfg;
        let n = self.layers.len();
        let b = pass.batch as f64;
        let product = |rows: f64, w: &super::weight::Weight| {
            let (out, inp) = w.dims();
            2.0 * rows * out as f64 * inp as f64
        };
        let mut f = Flops::default();
        for (i, layer) in self.layers.iter().enumerate() {
            let from = if i + 1 == n { pass.outputs_from } else { 0 };
            let all = b * pass.positions as f64;
            let out = b * (pass.positions - from) as f64;
            f.weights += product(all, &layer.w_qkv)
                + product(out, &layer.wo)
                + product(out, &layer.w_gate_up)
                + product(out, &layer.w_down);
            let window = c.sliding_window.filter(|_| layer.is_local);
            let seen = keys_seen(pass.past + from, pass.past + pass.positions, window);
            // Scores (q · k) and the values' sum: head_dim multiply-adds each per pair.
            f.attention += b * c.n_head as f64 * seen as f64 * 2.0 * 2.0 * c.head_dim as f64;
        }
        if pass.backward {
            f.weights *= 2.0;
            f.attention *= 1.0 + ATTENTION_BACKWARD;
        }
        f
    }

    /// The head's share: `rows` scored rows against the vocabulary, with their gradient when
    /// `backward`.
    pub fn head_flops(&self, rows: usize, backward: bool) -> Flops {
        let (vocab, hidden) = self.head().dims();
        let once = 2.0 * rows as f64 * vocab as f64 * hidden as f64;
        Flops {
            head: if backward { 2.0 * once } else { once },
            ..Flops::default()
        }
    }
}

/// Σ over the queries at positions `first..end` of the keys each sees: every position up to
/// its own, or the last `window` of them.
fn keys_seen(first: usize, end: usize, window: Option<usize>) -> u64 {
    (first..end)
        .map(|p| {
            let causal = p as u64 + 1;
            window.map_or(causal, |w| causal.min(w as u64))
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Arch;
    use crate::model::ops::attention_mask;
    use crate::model::ModelConfig;

    /// Visible (query, key) pairs counted from the mask the reference attention uses.
    fn pairs_from_mask(queries: usize, keys: usize, window: Option<usize>) -> u64 {
        let mask = attention_mask(1, queries, keys, keys - queries, window).unwrap();
        let values: Vec<f32> = mask.flatten_all().unwrap().to_vec1().unwrap();
        values.iter().filter(|v| v.is_finite()).count() as u64
    }

    #[test]
    fn keys_seen_counts_the_pairs_the_mask_leaves_visible() {
        for (queries, keys) in [(1, 1), (7, 7), (5, 12), (64, 200), (130, 130)] {
            for window in [None, Some(1), Some(4), Some(100), Some(512)] {
                assert_eq!(
                    keys_seen(keys - queries, keys, window),
                    pairs_from_mask(queries, keys, window),
                    "{queries} queries, {keys} keys, window {window:?}"
                );
            }
        }
    }

    fn small_model(window: Option<usize>) -> Model {
        // 3 layers, hidden 32, 4 query heads and 2 key heads of 8, ffn 48, vocabulary 50.
        let mut cfg = ModelConfig::plain(Arch::Llama, 3, 32, (4, 2, 8), 48, 50, 10000.0, 256);
        cfg.sliding_window = window;
        let mut model = Model::random(cfg, 7).unwrap();
        if window.is_some() {
            // The first and last layers local, as Gemma's pattern mixes them.
            model.layers[0].is_local = true;
            model.layers[2].is_local = true;
        }
        model
    }

    #[test]
    fn a_pass_counts_each_product_from_the_configuration() {
        // Written out from the configuration, not the weights: q 32×32, k and v 32×16 each,
        // o 32×32, gate and up 32×48 each, down 48×32.
        let per_row_qkv = 2.0 * 32.0 * (32.0 + 16.0 + 16.0);
        let per_row_rest = 2.0 * (32.0 * 32.0 + 2.0 * 32.0 * 48.0 + 48.0 * 32.0);
        let (t, from, b) = (20usize, 15usize, 2usize);
        let model = small_model(None);
        let pass = LayerPass {
            batch: b,
            positions: t,
            past: 0,
            outputs_from: from,
            backward: false,
        };
        let f = model.layer_flops(&pass);
        let rows = (b * t) as f64;
        let last_rows = (b * (t - from)) as f64;
        let want_weights = 3.0 * rows * per_row_qkv + (2.0 * rows + last_rows) * per_row_rest;
        assert_eq!(f.weights, want_weights);
        // Two layers see the triangle 1 + 2 + ... + 20, the last one 16 + ... + 20.
        let pairs = 2.0 * 210.0 + (16..=20).sum::<usize>() as f64;
        assert_eq!(f.attention, b as f64 * 4.0 * pairs * 2.0 * 2.0 * 8.0);
        assert_eq!(f.head, 0.0);

        let back = model.layer_flops(&LayerPass {
            backward: true,
            ..pass
        });
        assert_eq!(back.weights, 2.0 * f.weights);
        assert_eq!(back.attention, 3.5 * f.attention);

        // A sliding window of 4 on layers 0 and 2: each query sees at most 4 keys.
        let windowed = small_model(Some(4)).layer_flops(&pass);
        let local = |first: usize| (first..t).map(|p| (p + 1).min(4)).sum::<usize>() as f64;
        let pairs = local(0) + 210.0 + local(from);
        assert_eq!(windowed.attention, b as f64 * 4.0 * pairs * 2.0 * 2.0 * 8.0);

        // Positions after a past of 10: the keys before them count, their rows do not.
        let after = model.layer_flops(&LayerPass {
            batch: 1,
            positions: 3,
            past: 10,
            outputs_from: 0,
            backward: false,
        });
        assert_eq!(after.weights, 3.0 * 3.0 * (per_row_qkv + per_row_rest));
        assert_eq!(
            after.attention,
            3.0 * 4.0 * (11.0 + 12.0 + 13.0) * 2.0 * 2.0 * 8.0
        );

        let head = model.head_flops(5, true);
        assert_eq!(head.head, 2.0 * 2.0 * 5.0 * 50.0 * 32.0);
        assert_eq!(model.head_flops(5, false).head, head.head / 2.0);
    }
}
