//! Forward passes: one that records what the backward pass needs (salience), and one with a
//! KV cache (generation). Both share the layer code so they cannot drift apart.

use candle_core::{DType, Device, Result, Tensor};

use super::attention::Attention;
use super::decode_dot::Activations;
use super::kernels::{
    gated_into, merge_heads_into, rms_norm, rms_norm_backward, rms_norm_into, split_heads,
};
use super::ops::Activation;
use super::{Layer, Model};

/// What one layer's backward pass needs from its forward pass.
pub struct LayerTape {
    pub h: Tensor,
    pub q_pre_norm: Option<Tensor>,
    pub k_pre_norm: Option<Tensor>,
    /// Roped queries, grouped as (b, kv_heads, group * t, head_dim).
    pub q: Tensor,
    /// Roped keys (b, kv_heads, t, head_dim).
    pub k: Tensor,
    pub v: Tensor,
    /// Log-sum-exp of each query row's scaled scores (b, kv_heads, group * t): the backward
    /// pass recomputes the probabilities from it.
    pub lse: Tensor,
    pub attn_pre_norm: Option<Tensor>,
    pub h2: Tensor,
    /// The MLP's gate and up projections side by side (b * t, 2 * ffn); None where the
    /// budget left them out (the backward pass multiplies them again from `h2`: half the
    /// layer's flops, no attention, against a whole layer for an `Input` record).
    pub gate_up: Option<Tensor>,
    pub down_pre_norm: Option<Tensor>,
    /// The layer's outputs exist for positions from here on (see `Tape::outputs_from`); the
    /// query-side entries (`q`, `lse`, `h2`, `gate_up`, ...) hold only those positions,
    /// `h`, `k` and `v` every position.
    pub outputs_from: usize,
}

/// What the forward pass keeps of one layer (see `Model::tape_plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Whole,
    WithoutMlp,
    Input,
}

/// What the forward pass kept of one layer.
pub enum LayerRecord {
    /// What its backward pass needs, the MLP projections possibly left out.
    Full(LayerTape),
    /// Only its input: the backward pass runs the layer again first (checkpointing), which
    /// costs one more forward of the layer and saves its activations' memory.
    Input(Tensor),
}

/// Recorded activations beyond this many bytes are recomputed in the backward pass instead
/// of kept (see `Model::tape_plan`). Sized for SmolLM2's 600-token pass to keep every layer
/// (374 MiB) and peak under 600 MiB (the models issue's goal). That peak holds since large
/// blocks come from one glibc arena (the binary's `server/src/allocator.rs`): under mimalloc alone,
/// repeated passes placed their blocks differently and crept to 620-640 MiB, so the budget
/// was 288 MiB, and 12 layers multiplied their MLP projections again (7 % slower).
pub const TAPE_BUDGET_BYTES: usize = 384 << 20;

/// Everything the backward pass needs.
pub struct Tape {
    pub batch: usize,
    pub seq: usize,
    /// One record per layer; empty for a forward pass without backward.
    pub layers: Vec<LayerRecord>,
    /// The last layer computes its outputs only for positions `outputs_from..seq` of each
    /// sequence: the others feed no logit that is scored, and it is the one layer whose
    /// outputs no later layer reads.
    pub outputs_from: usize,
    /// Final hidden states (b * (seq - outputs_from), hidden), before the final norm.
    pub last_hidden: Tensor,
}

/// Keys and values of the tokens seen so far, per layer, for decoding.
///
/// Each layer's keys and values live in buffers of shape (1, kv_heads, capacity, head_dim)
/// that grow by doubling: a decoding step writes one position in place instead of copying the
/// whole cache into a new tensor (which cost a copy of every layer's cache and fresh pages
/// per token). A clone shares the buffers: extend only one of the clones, and only past the
/// positions the others read (perturbation reads a clone of its prefix; generation extends its
/// own cache).
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
}

impl KvCache {
    /// Keeps the first `len` positions (the buffers stay allocated for reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Layer `i`'s keys and values of the cached positions, (1, kv_heads, len, head_dim).
    pub fn layer(&self, i: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.layers.get(i) {
            Some(Some((k, v))) if self.len > 0 => {
                Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)))
            }
            _ => Ok(None),
        }
    }
}

/// Writes the new keys and values (1, kv_heads, t, hd) after the `len` cached positions of
/// one layer's buffers, growing them first when needed; returns the buffers.
fn append_kv(
    slot: &mut Option<(Tensor, Tensor)>,
    len: usize,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (_, heads, t, hd) = k.dims4()?;
    let capacity = slot.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0));
    if len + t > capacity {
        let grown = (len + t).max(2 * capacity).next_multiple_of(64);
        let fresh = || Tensor::zeros((1, heads, grown, hd), DType::F32, &Device::Cpu);
        let (nk, nv) = (fresh()?, fresh()?);
        if let Some((ok, ov)) = slot.as_ref().filter(|_| len > 0) {
            nk.slice_set(&ok.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            nv.slice_set(&ov.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        *slot = Some((nk, nv));
    }
    let (ck, cv) = slot.as_ref().expect("allocated above");
    ck.slice_set(&k.contiguous()?, 2, len)?;
    cv.slice_set(&v.contiguous()?, 2, len)?;
    Ok((ck.clone(), cv.clone()))
}

/// The keys and values a block sees before its new positions.
pub(super) enum Past<'a> {
    /// None: the block sees only its new positions.
    Nothing,
    /// Earlier positions (b, kv_heads, len, hd), read only.
    Fixed(&'a (Tensor, Tensor)),
    /// A decoding cache's buffers for this layer and the positions they hold; the new keys
    /// and values are written after them.
    Cache(&'a mut Option<(Tensor, Tensor)>, usize),
}

/// A block's output and, when asked for, its tape (salience).
type LayerOutput = (Tensor, Option<LayerTape>);

/// Rows of a block's input that attend together: `b` sequences of `t` new positions each, at
/// the positions of `rope`, after the earlier positions in `past`.
pub(super) struct Run<'a> {
    pub b: usize,
    pub t: usize,
    pub rope: &'a RopeTables,
    pub past: Past<'a>,
}

/// One run's attention: its output heads (b, kv_heads, group * tq, hd) for its `tq` query
/// positions per sequence, and what a tape keeps of it.
struct Attended {
    b: usize,
    t: usize,
    tq: usize,
    o: Tensor,
    lse: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pre_norm: Option<Tensor>,
    k_pre_norm: Option<Tensor>,
}

pub(super) struct RopeTables {
    pub global: (Tensor, Tensor),
    pub local: (Tensor, Tensor),
}

impl RopeTables {
    pub fn of(&self, layer: &Layer) -> &(Tensor, Tensor) {
        if layer.is_local {
            &self.local
        } else {
            &self.global
        }
    }
}

impl Model {
    pub(super) fn rope_tables(&self, offset: usize, len: usize) -> Result<RopeTables> {
        let c = &self.cfg;
        let global = c.rope.tables(offset, len)?;
        let local = if c.rope_local == c.rope {
            global.clone()
        } else {
            c.rope_local.tables(offset, len)?
        };
        Ok(RopeTables { global, local })
    }

    pub(super) fn rope_of(&self, layer: &Layer) -> &super::Rope {
        if layer.is_local {
            &self.cfg.rope_local
        } else {
            &self.cfg.rope
        }
    }

    /// What to keep of each layer within `budget` bytes. Dropping the MLP projections saves
    /// most bytes per recomputed flop, so every layer loses those first, then as many as fit
    /// get them back; only where even that does not fit are whole layers recomputed (the last
    /// layers are kept, the backward pass meets them first).
    fn tape_plan(&self, b: usize, t: usize, budget: usize) -> Vec<Keep> {
        let n = self.layers.len();
        let whole = self.layer_tape_bytes(b, t).max(1);
        let mlp = b * t * 2 * self.cfg.ffn * 4;
        let lean = whole - mlp;
        let (kept, rest) = if n * whole <= budget {
            (n, Keep::Input)
        } else if n * lean <= budget {
            (((budget - n * lean) / mlp.max(1)).min(n), Keep::WithoutMlp)
        } else {
            ((budget / whole).min(n), Keep::Input)
        };
        (0..n)
            .map(|i| if i >= n - kept { Keep::Whole } else { rest })
            .collect()
    }

    /// Bytes one layer's full record takes for `b` sequences of `t` positions.
    pub fn layer_tape_bytes(&self, b: usize, t: usize) -> usize {
        let c = &self.cfg;
        let (q, kv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let norms = if c.arch.traits().qk_norm { q + kv } else { 0 };
        let post = if c.arch.traits().sandwich_norms {
            2 * c.hidden
        } else {
            0
        };
        let per_position = 2 * c.hidden + q + 2 * kv + c.n_head + 2 * c.ffn + norms + post;
        b * t * per_position * 4
    }

    /// Runs the layers on input embeddings `x` of shape (b, t, hidden) — already scaled by
    /// `embed_scale` — and records what the backward pass needs within `TAPE_BUDGET_BYTES`
    /// (`Model::tape_plan`). `check` is called between layers and may abort.
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tape> {
        self.forward_embeds_within(x, TAPE_BUDGET_BYTES, check)
    }

    /// `forward_embeds` with the tape kept within `budget` bytes (0: every layer is
    /// recomputed in the backward pass).
    pub fn forward_embeds_within(
        &self,
        x: &Tensor,
        budget: usize,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tape> {
        self.forward_embeds_recording(x, Some(budget), 0, check)
    }

    /// The forward pass alone: the final hidden states, no record for a backward pass.
    pub fn forward_embeds_only(
        &self,
        x: &Tensor,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tape> {
        self.forward_embeds_recording(x, None, 0, check)
    }

    /// The forward pass for outputs at positions `outputs_from..` only (see
    /// `Tape::outputs_from`), recording a tape within `budget` bytes when there is one.
    pub fn forward_embeds_recording(
        &self,
        x: &Tensor,
        budget: Option<usize>,
        outputs_from: usize,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tape> {
        let record = budget.is_some();
        let (b, t, hidden) = x.dims3()?;
        if outputs_from >= t {
            candle_core::bail!("outputs from position {outputs_from} of {t}")
        }
        let rope = self.rope_tables(0, t)?;
        let mut h = x.reshape((b * t, hidden))?;
        let n = self.layers.len();
        let plan = budget.map(|budget| self.tape_plan(b, t, budget));
        let mut layers = Vec::with_capacity(if record { n } else { 0 });
        for (i, layer) in self.layers.iter().enumerate() {
            check()?;
            let keep = plan.as_ref().map(|p| p[i]);
            let whole = matches!(keep, Some(Keep::Whole | Keep::WithoutMlp));
            let from = if i + 1 == n { outputs_from } else { 0 };
            let past = Past::Nothing;
            let (next, tape) = self.layer_forward(layer, &h, (b, t), &rope, past, whole, from)?;
            match (keep, tape) {
                (Some(Keep::Whole), Some(tape)) => layers.push(LayerRecord::Full(tape)),
                (Some(Keep::WithoutMlp), Some(mut tape)) => {
                    tape.gate_up = None;
                    layers.push(LayerRecord::Full(tape));
                }
                (Some(_), _) => layers.push(LayerRecord::Input(h)),
                (None, _) => {}
            }
            h = next;
        }
        Ok(Tape {
            batch: b,
            seq: t,
            layers,
            outputs_from,
            last_hidden: h,
        })
    }

    /// Decodes `ids` after the cached positions; returns the final-normed hidden state of the
    /// last position and extends the cache. A generation step: products of a few rows may
    /// round the activations (`Activations::best()`, see `decode_dot::integer`); pair it with
    /// `decoding_logits`.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        // Only the last position's output is asked for: the last layer computes no other
        // (every position still gives its key and value), a layer's products less for the
        // other rows of a prompt.
        if ids.is_empty() {
            candle_core::bail!("forward_cached: no token to decode")
        }
        let last = self.forward_cached_with(ids, cache, Activations::best(), true)?;
        rms_norm(&last, &self.final_norm, self.cfg.eps)
    }

    /// Runs `ids` after the cached positions and extends the cache; returns the hidden states
    /// of every new position (t, hidden), before the final norm.
    pub fn forward_cached_hidden(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.forward_cached_with(ids, cache, Activations::Exact, false)
    }

    /// The hidden states of the new positions (with `last_only`, of the last one), before the
    /// final norm; extends the cache.
    fn forward_cached_with(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        activations: Activations,
        last_only: bool,
    ) -> Result<Tensor> {
        crate::threads::on_pool(|| {
            let t = ids.len();
            let offset = cache.len;
            let x = (self.embeddings(ids)? * self.cfg.embed_scale as f64)?;
            let rope = self.rope_tables(offset, t)?;
            let total = offset + t;
            let mut h = x;
            cache.layers.resize(self.layers.len(), None);
            let n_layers = self.layers.len();
            for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
                let past = Past::Cache(slot, offset);
                let outputs_from = if last_only && i + 1 == n_layers {
                    t - 1
                } else {
                    0
                };
                (h, _) = self.layer_forward_runs(
                    layer,
                    &h,
                    vec![Run {
                        b: 1,
                        t,
                        rope: &rope,
                        past,
                    }],
                    (false, outputs_from),
                    activations,
                )?;
            }
            cache.len = total;
            if last_only {
                // (A model without layers has every row still.)
                h = h.narrow(0, h.dim(0)? - 1, 1)?;
            }
            Ok(h)
        })
    }

    /// Sequences that each continue the cached context after some of its positions:
    /// `(prefix, ids)` runs `ids` after the first `prefix` cached positions. The cache is read,
    /// not extended. Returns the hidden states of the new positions, sequence after sequence
    /// (total length, hidden), before the final norm.
    ///
    /// The products take every sequence's rows at once, so each weight is unpacked once for
    /// all of them (perturbation's variants start at different positions); attention runs per
    /// sequence, over its own prefix.
    pub fn forward_continuations(
        &self,
        sequences: &[(usize, Vec<u32>)],
        cache: &KvCache,
    ) -> Result<Tensor> {
        if let Some((prefix, ids)) = sequences
            .iter()
            .find(|(prefix, ids)| *prefix > cache.len || ids.is_empty())
        {
            candle_core::bail!(
                "a continuation of {} tokens after {prefix} of {} cached positions",
                ids.len(),
                cache.len
            )
        }
        crate::threads::on_pool(|| {
            let ids: Vec<u32> = sequences
                .iter()
                .flat_map(|(_, ids)| ids.iter().copied())
                .collect();
            let h = (self.embeddings(&ids)? * self.cfg.embed_scale as f64)?;
            let runs: Vec<(usize, usize)> = sequences
                .iter()
                .map(|(prefix, ids)| (*prefix, ids.len()))
                .collect();
            self.layers_after_fixed(h, &runs, |i| cache.layer(i))
        })
    }

    /// Runs every layer on `h`, whose rows are runs of one sequence each: run `r` has
    /// `runs[r].1` new positions after the first `runs[r].0` of the earlier positions whose
    /// keys and values (1, kv_heads, len, head_dim) `past(i)` gives for layer `i` (None: no
    /// earlier positions); they are read, not extended.
    fn layers_after_fixed(
        &self,
        mut h: Tensor,
        runs: &[(usize, usize)],
        past: impl Fn(usize) -> Result<Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let ropes = runs
            .iter()
            .map(|&(offset, t)| self.rope_tables(offset, t))
            .collect::<Result<Vec<_>>>()?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_past = past(i)?;
            let prefixes = runs
                .iter()
                .map(|&(prefix, _)| match &layer_past {
                    Some((k, v)) if prefix > 0 => {
                        Ok(Some((k.narrow(2, 0, prefix)?, v.narrow(2, 0, prefix)?)))
                    }
                    _ => Ok(None),
                })
                .collect::<Result<Vec<_>>>()?;
            let layer_runs = runs
                .iter()
                .zip(&ropes)
                .zip(&prefixes)
                .map(|((&(_, t), rope), kv)| Run {
                    b: 1,
                    t,
                    rope,
                    past: kv.as_ref().map_or(Past::Nothing, Past::Fixed),
                })
                .collect();
            (h, _) =
                self.layer_forward_runs(layer, &h, layer_runs, (false, 0), Activations::Exact)?;
        }
        Ok(h)
    }

    /// Whether a zero input stays zero through every layer: then the hidden states of
    /// positions whose embeddings are zero are zero in every layer, and so are their keys and
    /// values (norms, projections, rotation and the MLPs map 0 to 0, and a zero query over
    /// zero values gives 0). Biases break it.
    pub fn keeps_zeros(&self) -> bool {
        self.layers.iter().all(|l| l.qkv_bias.is_none())
    }

    /// The hidden states (t, hidden), before the final norm, of the positions `x` (t, hidden;
    /// scaled by `embed_scale` already) after `zeros` positions whose embeddings are zero,
    /// without running those: their keys and values are zeros in every layer
    /// (`keeps_zeros`, which must hold). A prompt reduced to its zero baseline costs only
    /// its target's positions this way.
    pub fn forward_embeds_after_zeros(&self, x: &Tensor, zeros: usize) -> Result<Tensor> {
        if !self.keeps_zeros() {
            candle_core::bail!("a model with biases does not keep zero positions at zero")
        }
        crate::threads::on_pool(|| {
            let (t, _) = x.dims2()?;
            let c = &self.cfg;
            let shape = (1, c.n_kv_head, zeros, c.head_dim);
            let nothing = Tensor::zeros(shape, DType::F32, &Device::Cpu)?;
            let past = (nothing.clone(), nothing);
            self.layers_after_fixed(x.clone(), &[(zeros, t)], |_| Ok(Some(past.clone())))
        })
    }

    /// Logits of final-normed hidden states, soft-capped where the model caps them.
    pub fn logits(&self, normed: &Tensor) -> Result<Tensor> {
        self.logits_with(normed, Activations::Exact)
    }

    /// `logits` for a generation step (`forward_cached`): a few rows may take rounded
    /// activations, as there.
    pub fn decoding_logits(&self, normed: &Tensor) -> Result<Tensor> {
        self.logits_with(normed, Activations::best())
    }

    fn logits_with(&self, normed: &Tensor, activations: Activations) -> Result<Tensor> {
        let z = self.head().forward_with(normed, activations)?;
        match self.cfg.final_softcap {
            Some(cap) => (z / cap as f64)?.tanh()? * cap as f64,
            None => Ok(z),
        }
    }

    /// Attention of `layer` for `b` rows of `queries` new positions after `keys - queries`
    /// cached ones.
    pub(super) fn attention(
        &self,
        layer: &Layer,
        b: usize,
        queries: usize,
        keys: usize,
    ) -> Attention {
        let c = &self.cfg;
        Attention {
            batch: b,
            kv_heads: c.n_kv_head,
            group: self.group(),
            queries,
            keys,
            key_rows: keys,
            head_dim: c.head_dim,
            window: c.sliding_window.filter(|_| layer.is_local),
            scale: c.attn_scale,
            softcap: c.attn_softcap,
        }
    }

    pub(super) fn group(&self) -> usize {
        self.cfg.n_head / self.cfg.n_kv_head
    }

    /// One transformer block on `h` (b * t, hidden) after the positions in `past` (a decoding
    /// cache gets the new keys and values); with `want_tape` it records the tape. Outputs are
    /// computed for positions `outputs_from..t` of each sequence, (b * (t - outputs_from),
    /// hidden): every position still gives its key and value.
    /// Its products take the activations exactly (`Activations::Exact`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn layer_forward(
        &self,
        layer: &Layer,
        h: &Tensor,
        (b, t): (usize, usize),
        rope: &RopeTables,
        past: Past,
        want_tape: bool,
        outputs_from: usize,
    ) -> Result<LayerOutput> {
        let run = Run { b, t, rope, past };
        let exact = Activations::Exact;
        self.layer_forward_runs(layer, h, vec![run], (want_tape, outputs_from), exact)
    }

    /// `layer_forward` for rows of `h` that attend in separate runs, one run's rows after
    /// another's: the products take every run's rows at once, attention runs per run. A tape
    /// and outputs for some positions only need a single run.
    /// The products take the activations as `activations` says.
    fn layer_forward_runs(
        &self,
        layer: &Layer,
        h: &Tensor,
        runs: Vec<Run>,
        (want_tape, outputs_from): (bool, usize),
        activations: Activations,
    ) -> Result<LayerOutput> {
        let c = &self.cfg;
        let hd = c.head_dim;
        if runs.len() != 1 && (want_tape || outputs_from > 0) {
            candle_core::bail!("a tape, or outputs for some positions only, need one run")
        }
        let mut qkv = rms_norm_into(h, &layer.attn_norm, c.eps, &layer.w_qkv, activations)?;
        if let Some(bias) = &layer.qkv_bias {
            qkv = qkv.broadcast_add(bias)?;
        }
        let mut row = 0;
        let mut attended = Vec::with_capacity(runs.len());
        for run in runs {
            let rows = run.b * run.t;
            let run_qkv = qkv.narrow(0, row, rows)?;
            row += rows;
            attended.push(self.attend(layer, &run_qkv, run, outputs_from)?);
        }
        let outputs: Vec<_> = attended.iter().map(|a| (&a.o, a.b, a.tq)).collect();
        let mut attn = merge_heads_into(&outputs, hd, &layer.wo, activations)?;
        let mut attn_pre_norm = None;
        if let Some(n) = &layer.post_attn_norm {
            let normed = rms_norm(&attn, n, c.eps)?;
            attn_pre_norm = Some(std::mem::replace(&mut attn, normed));
        }
        let h_out = match &attended[..] {
            [one] if outputs_from > 0 => {
                let hidden = h.dim(1)?;
                let h = h.reshape((one.b, one.t, hidden))?;
                let h = h.narrow(1, outputs_from, one.tq)?;
                h.contiguous()?.reshape((one.b * one.tq, hidden))?
            }
            _ => h.clone(),
        };
        let h2 = (h_out + attn)?;
        let gate_up = rms_norm_into(&h2, &layer.ffn_norm, c.eps, &layer.w_gate_up, activations)?;
        let gelu = c.activation == Activation::GeluTanh;
        let mut down = gated_into(&gate_up, gelu, &layer.w_down, activations)?;
        let mut down_pre_norm = None;
        if let Some(n) = &layer.post_ffn_norm {
            let normed = rms_norm(&down, n, c.eps)?;
            down_pre_norm = Some(std::mem::replace(&mut down, normed));
        }
        let out = (&h2 + down)?;
        if !want_tape {
            return Ok((out, None));
        }
        let one = attended.pop().expect("one run");
        Ok((
            out,
            Some(LayerTape {
                h: h.clone(),
                q_pre_norm: one.q_pre_norm,
                k_pre_norm: one.k_pre_norm,
                q: one.q,
                k: one.k,
                v: one.v,
                lse: one.lse,
                attn_pre_norm,
                h2,
                gate_up: Some(gate_up),
                down_pre_norm,
                outputs_from,
            }),
        ))
    }

    /// The attention of one run: its heads from its rows of the q/k/v product, rotated to its
    /// positions, over its earlier positions and its own.
    fn attend(
        &self,
        layer: &Layer,
        qkv: &Tensor,
        run: Run,
        outputs_from: usize,
    ) -> Result<Attended> {
        let c = &self.cfg;
        let (nh, nkv, hd, g) = (c.n_head, c.n_kv_head, c.head_dim, self.group());
        let Run { b, t, rope, past } = run;
        let [mut q, mut k, v]: [Tensor; 3] = split_heads(qkv, (b, t, hd), &[nh, nkv, nkv])?
            .try_into()
            .expect("three groups of heads");
        let (mut q_pre_norm, mut k_pre_norm) = (None, None);
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            let qn_out = rms_norm(&q, qn, c.eps)?;
            let kn_out = rms_norm(&k, kn, c.eps)?;
            q_pre_norm = Some(std::mem::replace(&mut q, qn_out));
            k_pre_norm = Some(std::mem::replace(&mut k, kn_out));
        }
        let (q, k) = if layer.rotary {
            let (cos, sin) = rope.of(layer);
            (
                self.rope_of(layer).apply(&q, cos, sin)?,
                self.rope_of(layer).apply(&k, cos, sin)?,
            )
        } else {
            (q.contiguous()?, k.contiguous()?)
        };
        let tq = t - outputs_from;
        let (q, q_pre_norm) = if outputs_from > 0 {
            // The queries are the last tq positions of the keys, as in a decoding step.
            if matches!(past, Past::Fixed(_)) {
                candle_core::bail!("outputs for some positions only, after fixed ones")
            }
            let suffix = |x: Tensor| x.narrow(2, outputs_from, tq)?.contiguous();
            (suffix(q)?, q_pre_norm.map(suffix).transpose()?)
        } else {
            (q, q_pre_norm)
        };
        // Keys and values seen, in buffers with `key_rows` rows per head, of which the first
        // `keys` are filled.
        let (k_all, v_all, keys) = match past {
            Past::Nothing => (k.clone(), v.clone(), t),
            Past::Fixed((pk, pv)) => (
                Tensor::cat(&[pk, &k], 2)?.contiguous()?,
                Tensor::cat(&[pv, &v], 2)?.contiguous()?,
                pk.dim(2)? + t,
            ),
            Past::Cache(slot, len) => {
                let (ck, cv) = append_kv(slot, len, &k, &v)?;
                (ck, cv, len + t)
            }
        };
        // Queries that share a key head are stacked along the sequence axis, so grouped-query
        // attention needs no copies of the keys and values.
        let q = q.reshape((b, nkv, g * tq, hd))?;
        let mut attention = self.attention(layer, b, tq, keys);
        attention.key_rows = k_all.dim(2)?;
        let (o, lse) = attention.forward(&q, &k_all, &v_all)?;
        Ok(Attended {
            b,
            t,
            tq,
            o,
            lse,
            q,
            k,
            v,
            q_pre_norm,
            k_pre_norm,
        })
    }

    /// log p of each target token: rows of `hidden` (n, hidden), before the final norm,
    /// predict `targets` (n). Returns the per-token log-probs and, with `with_grad`,
    /// d sum(log p) / d hidden.
    pub fn target_log_probs(
        &self,
        hidden: &Tensor,
        targets: &[u32],
        with_grad: bool,
    ) -> Result<(Vec<f32>, Option<Tensor>)> {
        let normed = rms_norm(hidden, &self.final_norm, self.cfg.eps)?;
        let softcap = self.cfg.final_softcap;
        let (log_probs, g_normed) =
            super::head::target_log_probs(self.head(), &normed, targets, softcap, with_grad)?;
        let Some(g_normed) = g_normed else {
            return Ok((log_probs, None));
        };
        let g_hidden = rms_norm_backward(hidden, &self.final_norm, self.cfg.eps, &g_normed)?;
        Ok((log_probs, Some(g_hidden)))
    }
}
