//! The project's own transformer: one decoder skeleton for Llama (SmolLM2, Mistral), Qwen 2/3,
//! Phi-3, Gemma 2/3, loaded from GGUF files or Hugging Face directories, with the weights kept
//! in their stored precision (see `weight.rs`).
//!
//! candle-transformers' models take token ids, not embeddings, and their fused kernels have no
//! backward; salience needs `forward_embeds(embeddings)` and input gradients, so the forward
//! and the backward live here. What differs between architectures is the table in `arch.rs`.

pub mod arch;
mod attention;
mod backward;
mod block_product;
mod decode_dot;
mod dequantize;
mod flops;
mod forward;
mod head;
pub mod kernels;
mod load_gguf;
mod load_hf;
mod matmul;
pub mod ops;
pub mod rope;
mod simd;
mod table_products;
pub mod weight;

use candle_core::{Device, Tensor};

pub use arch::{Arch, SUPPORTED_ARCHITECTURES};
pub use decode_dot::Kernel;
pub use flops::{Flops, LayerPass};
pub use forward::{KvCache, Tape, TAPE_BUDGET_BYTES};
pub use load_hf::HfDirectory;
use ops::Activation;
pub use rope::Rope;
use weight::Weight;

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub eps: f32,
    /// Rotary embedding of the global-attention layers.
    pub rope: Rope,
    /// Rotary embedding of the sliding-window layers (Gemma's local base).
    pub rope_local: Rope,
    pub sliding_window: Option<usize>,
    /// Input embeddings are multiplied by this (sqrt(hidden) for Gemma).
    pub embed_scale: f32,
    pub attn_scale: f32,
    /// Gemma 2: scores become cap * tanh(scores / cap) before the softmax.
    pub attn_softcap: Option<f32>,
    /// Gemma 2: logits become cap * tanh(logits / cap).
    pub final_softcap: Option<f32>,
    pub context_length: usize,
    pub activation: Activation,
}

impl ModelConfig {
    /// A configuration with plain rotary embeddings and no soft-capping, for models built in
    /// code (tests).
    #[allow(clippy::too_many_arguments)]
    pub fn plain(
        arch: Arch,
        n_layer: usize,
        hidden: usize,
        (n_head, n_kv_head, head_dim): (usize, usize, usize),
        ffn: usize,
        vocab: usize,
        rope_base: f32,
        context_length: usize,
    ) -> Self {
        Self {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            eps: 1e-5,
            rope: Rope::plain(head_dim, rope_base as f64),
            rope_local: Rope::plain(head_dim, rope_base as f64),
            sliding_window: None,
            embed_scale: arch.traits().embed_scale(hidden),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            context_length,
            activation: arch.traits().activation,
        }
    }
}

pub struct Layer {
    pub attn_norm: Tensor,
    /// q, k and v projections stacked by rows, so one product computes all three.
    pub w_qkv: Weight,
    /// Qwen 2's q, k and v biases, stacked the same way.
    pub qkv_bias: Option<Tensor>,
    pub wo: Weight,
    pub ffn_norm: Tensor,
    /// Gate and up projections stacked by rows (ffn gate rows, then ffn up rows).
    pub w_gate_up: Weight,
    pub w_down: Weight,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub post_attn_norm: Option<Tensor>,
    pub post_ffn_norm: Option<Tensor>,
    /// Sliding-window attention (and, for Gemma 3, the local rope base).
    pub is_local: bool,
    /// Whether queries and keys are rotated (SmolLM3 leaves every fourth layer without).
    pub rotary: bool,
}

pub struct Model {
    pub cfg: ModelConfig,
    /// (vocab, hidden): the embedding table, unscaled.
    pub embed: Weight,
    pub layers: Vec<Layer>,
    pub final_norm: Tensor,
    /// Untied output head, if the model has one.
    pub lm_head: Option<Weight>,
}

impl Model {
    pub(crate) fn check_shapes(&self) -> Result<(), String> {
        let c = &self.cfg;
        let expect = |dims: (usize, usize), want: (usize, usize), what: &str| {
            if dims == want {
                Ok(())
            } else {
                Err(format!(
                    "tensor {what} has shape {dims:?}, expected {want:?}"
                ))
            }
        };
        let vector = |t: &Tensor, n: usize, what: &str| {
            if t.dims() == [n] {
                Ok(())
            } else {
                Err(format!(
                    "tensor {what} has shape {:?}, expected [{n}]",
                    t.dims()
                ))
            }
        };
        expect(self.embed.dims(), (c.vocab, c.hidden), "token embeddings")?;
        if let Some(head) = &self.lm_head {
            expect(head.dims(), (c.vocab, c.hidden), "output head")?;
        }
        vector(&self.final_norm, c.hidden, "final norm")?;
        let (q, kv) = (c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        for l in &self.layers {
            expect(l.w_qkv.dims(), (q + 2 * kv, c.hidden), "attention q/k/v")?;
            expect(l.wo.dims(), (c.hidden, q), "attention output")?;
            expect(l.w_gate_up.dims(), (2 * c.ffn, c.hidden), "ffn gate/up")?;
            expect(l.w_down.dims(), (c.hidden, c.ffn), "ffn down")?;
            vector(&l.attn_norm, c.hidden, "attention norm")?;
            vector(&l.ffn_norm, c.hidden, "ffn norm")?;
            if let Some(b) = &l.qkv_bias {
                vector(b, q + 2 * kv, "q/k/v bias")?;
            }
            for n in [&l.q_norm, &l.k_norm].into_iter().flatten() {
                vector(n, c.head_dim, "q/k norm")?;
            }
            for n in [&l.post_attn_norm, &l.post_ffn_norm].into_iter().flatten() {
                vector(n, c.hidden, "post norm")?;
            }
        }
        if c.rope.dims > c.head_dim || !c.rope.dims.is_multiple_of(2) {
            return Err(format!(
                "rotary dimensions {} do not fit heads of {}",
                c.rope.dims, c.head_dim
            ));
        }
        Ok(())
    }

    /// The output projection (vocab, hidden).
    pub fn head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Rows of the embedding table for `ids`, unscaled: the e_i that salience differentiates.
    pub fn embeddings(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        self.embed.select_rows(ids)
    }

    /// Bytes the weights take in memory, as stored.
    pub fn weight_bytes(&self) -> usize {
        let mut total =
            self.embed.stored_bytes() + self.lm_head.as_ref().map_or(0, |h| h.stored_bytes());
        for l in &self.layers {
            total += l.w_qkv.stored_bytes() + l.wo.stored_bytes();
            total += l.w_gate_up.stored_bytes() + l.w_down.stored_bytes();
        }
        total
    }

    /// The stored precisions of the big matrices, e.g. "q4_1" or "q4k+q6k".
    pub fn precision(&self) -> String {
        let mut names: Vec<String> = Vec::new();
        let mut add = |w: &Weight| {
            for n in w.precision().split('+') {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_string());
                }
            }
        };
        add(&self.embed);
        for l in &self.layers {
            for w in [&l.w_qkv, &l.wo, &l.w_gate_up, &l.w_down] {
                add(w);
            }
        }
        names.join("+")
    }

    /// The same model with every matrix converted to f32: the plain reference that tests
    /// compare the quantized products with.
    pub fn dequantized(&self) -> candle_core::Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: l.attn_norm.clone(),
                    w_qkv: l.w_qkv.dequantized()?,
                    qkv_bias: l.qkv_bias.clone(),
                    wo: l.wo.dequantized()?,
                    ffn_norm: l.ffn_norm.clone(),
                    w_gate_up: l.w_gate_up.dequantized()?,
                    w_down: l.w_down.dequantized()?,
                    q_norm: l.q_norm.clone(),
                    k_norm: l.k_norm.clone(),
                    post_attn_norm: l.post_attn_norm.clone(),
                    post_ffn_norm: l.post_ffn_norm.clone(),
                    is_local: l.is_local,
                    rotary: l.rotary,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            cfg: self.cfg.clone(),
            embed: self.embed.dequantized()?,
            layers,
            final_norm: self.final_norm.clone(),
            lm_head: match &self.lm_head {
                Some(h) => Some(h.dequantized()?),
                None => None,
            },
        })
    }

    /// A small model with random weights, for tests that check gradients numerically.
    pub fn random(cfg: ModelConfig, seed: u64) -> candle_core::Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut rand = |dims: &[usize], scale: f32| -> candle_core::Result<Tensor> {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect();
            Tensor::from_vec(v, dims, &Device::Cpu)
        };
        let (h, q, kv, f) = (
            cfg.hidden,
            cfg.n_head * cfg.head_dim,
            cfg.n_kv_head * cfg.head_dim,
            cfg.ffn,
        );
        let ws = |fan_in: usize| 1.5 / (fan_in as f32).sqrt();
        let t = cfg.arch.traits();
        let mut layers = Vec::new();
        for i in 0..cfg.n_layer {
            // Drawn in the order of the first version of this function, so that the tests'
            // models stay the same.
            let attn_norm = rand(&[h], 0.3)?.affine(1.0, 1.0)?;
            let w_qkv = Weight::dense(rand(&[q + 2 * kv, h], ws(h))?)?;
            let wo = Weight::dense(rand(&[h, q], ws(q))?)?;
            let ffn_norm = rand(&[h], 0.3)?.affine(1.0, 1.0)?;
            let w_gate_up = Weight::dense(rand(&[2 * f, h], ws(h))?)?;
            let w_down = Weight::dense(rand(&[h, f], ws(f))?)?;
            let q_norm = if t.qk_norm {
                Some(rand(&[cfg.head_dim], 0.3)?.affine(1.0, 1.0)?)
            } else {
                None
            };
            let k_norm = if t.qk_norm {
                Some(rand(&[cfg.head_dim], 0.3)?.affine(1.0, 1.0)?)
            } else {
                None
            };
            let post_attn_norm = if t.sandwich_norms {
                Some(rand(&[h], 0.3)?.affine(1.0, 1.0)?)
            } else {
                None
            };
            let post_ffn_norm = if t.sandwich_norms {
                Some(rand(&[h], 0.3)?.affine(1.0, 1.0)?)
            } else {
                None
            };
            let qkv_bias = if t.qkv_bias {
                Some(rand(&[q + 2 * kv], 0.5)?)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm,
                w_qkv,
                qkv_bias,
                wo,
                ffn_norm,
                w_gate_up,
                w_down,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                is_local: cfg.sliding_window.is_some() && (i + 1) % 2 != 0,
                rotary: cfg.arch != Arch::SmolLM3 || (i + 1) % 2 != 0,
            });
        }
        let embed = Weight::dense(rand(&[cfg.vocab, h], 1.0)?)?;
        let final_norm = rand(&[h], 0.3)?.affine(1.0, 1.0)?;
        Ok(Self {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head: None,
        })
    }
}
