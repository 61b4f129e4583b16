//! The project's own f32 transformer: Llama (SmolLM2) and Gemma 3, loaded from GGUF.
//!
//! candle-transformers' models take token ids, not embeddings, and their fused kernels have no
//! backward; salience needs `forward_embeds(embeddings)` and input gradients, so the forward
//! and the backward live here.

mod attention;
mod backward;
mod forward;
pub mod kernels;
pub mod ops;
mod simd;
pub mod weight;

use candle_core::{DType, Device, Tensor};

pub use forward::{KvCache, Tape};
use ops::Activation;

use super::gguf::GgufFile;
use super::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
        }
    }
}

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
    pub rope_base: f32,
    pub rope_base_local: f32,
    pub sliding_window: Option<usize>,
    /// Input embeddings are multiplied by this (sqrt(hidden) for Gemma).
    pub embed_scale: f32,
    pub attn_scale: f32,
    pub context_length: usize,
    pub activation: Activation,
}

pub struct Layer {
    pub attn_norm: Tensor,
    /// q, k and v projections stacked by rows, so one matmul computes all three.
    pub w_qkv: Tensor,
    pub wo: Tensor,
    pub ffn_norm: Tensor,
    /// Gate and up projections stacked by rows (ffn gate rows, then ffn up rows).
    pub w_gate_up: Tensor,
    pub w_down: Tensor,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub post_attn_norm: Option<Tensor>,
    pub post_ffn_norm: Option<Tensor>,
    /// Sliding-window attention with the local rope base (Gemma 3's 5 of every 6 layers).
    pub is_local: bool,
}

pub struct Model {
    pub cfg: ModelConfig,
    /// (vocab, hidden): the embedding table, unscaled.
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub final_norm: Tensor,
    /// Untied output head, if the file has one.
    pub lm_head: Option<Tensor>,
}

/// The `general.architecture` values this engine runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "gemma3"];

impl Model {
    pub fn from_gguf(gguf: &mut GgufFile) -> Result<Self, EngineError> {
        let arch_name = gguf.string("general.architecture")?;
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(EngineError::UnsupportedArchitecture {
                    found: other.to_string(),
                    supported: SUPPORTED_ARCHITECTURES,
                })
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden = gguf.u32(&key("embedding_length"))? as usize;
        let n_head = gguf.u32(&key("attention.head_count"))? as usize;
        let n_kv_head = gguf
            .opt_u32(&key("attention.head_count_kv"))
            .map(|x| x as usize)
            .unwrap_or(n_head);
        let head_dim = gguf
            .opt_u32(&key("attention.key_length"))
            .map(|x| x as usize)
            .unwrap_or(hidden / n_head);
        let n_layer = gguf.u32(&key("block_count"))? as usize;
        let ffn = gguf.u32(&key("feed_forward_length"))? as usize;
        let eps = gguf
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-6);
        let context_length = gguf
            .opt_u32(&key("context_length"))
            .map(|x| x as usize)
            .unwrap_or(2048);
        let embed = gguf.f32_tensor("token_embd.weight")?;
        let vocab = embed.dim(0).map_err(|e| gguf.bad(e.to_string()))?;
        let cfg = match arch {
            Arch::Llama => ModelConfig {
                arch,
                n_layer,
                hidden,
                n_head,
                n_kv_head,
                head_dim,
                ffn,
                vocab,
                eps,
                rope_base: gguf.opt_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
                rope_base_local: gguf.opt_f32(&key("rope.freq_base")).unwrap_or(10_000.0),
                sliding_window: None,
                embed_scale: 1.0,
                attn_scale: 1.0 / (head_dim as f32).sqrt(),
                context_length,
                activation: Activation::Silu,
            },
            // Gemma 3's rope bases are not in its GGUF: 10k for local layers, 1M for global.
            Arch::Gemma3 => ModelConfig {
                arch,
                n_layer,
                hidden,
                n_head,
                n_kv_head,
                head_dim,
                ffn,
                vocab,
                eps,
                rope_base: gguf.opt_f32(&key("rope.freq_base")).unwrap_or(1_000_000.0),
                rope_base_local: 10_000.0,
                sliding_window: Some(
                    gguf.opt_u32(&key("attention.sliding_window"))
                        .unwrap_or(512) as usize,
                ),
                embed_scale: (hidden as f32).sqrt(),
                attn_scale: 1.0 / (head_dim as f32).sqrt(),
                context_length,
                activation: Activation::GeluTanh,
            },
        };
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let mut t = |name: &str| gguf.f32_tensor(&format!("blk.{i}.{name}.weight"));
            let mut wq = t("attn_q")?;
            let mut wk = t("attn_k")?;
            if arch == Arch::Llama {
                // llama.cpp interleaves the rotary halves of Llama's q/k rows; undo it so the
                // rope is the usual rotate-half form for every architecture.
                wq = unpermute_rotary(&wq, n_head, head_dim)?;
                wk = unpermute_rotary(&wk, n_kv_head, head_dim)?;
            }
            let gemma = arch == Arch::Gemma3;
            let mut opt = |name: &str| -> Result<Option<Tensor>, EngineError> {
                if gemma {
                    Ok(Some(gguf.f32_tensor(&format!("blk.{i}.{name}.weight"))?))
                } else {
                    Ok(None)
                }
            };
            let q_norm = opt("attn_q_norm")?;
            let k_norm = opt("attn_k_norm")?;
            let post_attn_norm = opt("post_attention_norm")?;
            let post_ffn_norm = opt("post_ffw_norm")?;
            let mut t = |name: &str| gguf.f32_tensor(&format!("blk.{i}.{name}.weight"));
            layers.push(Layer {
                attn_norm: t("attn_norm")?,
                w_qkv: Tensor::cat(&[&wq, &wk, &t("attn_v")?], 0).map_err(EngineError::candle)?,
                wo: t("attn_output")?,
                ffn_norm: t("ffn_norm")?,
                w_gate_up: Tensor::cat(&[&t("ffn_gate")?, &t("ffn_up")?], 0)
                    .map_err(EngineError::candle)?,
                w_down: t("ffn_down")?,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                is_local: gemma && (i + 1) % 6 != 0,
            });
        }
        let final_norm = gguf.f32_tensor("output_norm.weight")?;
        let lm_head = if gguf.has_tensor("output.weight") {
            Some(gguf.f32_tensor("output.weight")?)
        } else {
            None
        };
        let model = Self {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
        };
        model.check_shapes().map_err(|e| gguf.bad(e))?;
        Ok(model)
    }

    fn check_shapes(&self) -> Result<(), String> {
        let c = &self.cfg;
        let expect = |t: &Tensor, dims: &[usize], what: &str| {
            if t.dims() == dims {
                Ok(())
            } else {
                Err(format!(
                    "tensor {what} has shape {:?}, expected {dims:?}",
                    t.dims()
                ))
            }
        };
        expect(&self.embed, &[c.vocab, c.hidden], "token_embd")?;
        for l in &self.layers {
            let qkv = (c.n_head + 2 * c.n_kv_head) * c.head_dim;
            expect(&l.w_qkv, &[qkv, c.hidden], "attn_q/k/v")?;
            expect(&l.wo, &[c.hidden, c.n_head * c.head_dim], "attn_output")?;
            expect(&l.w_gate_up, &[2 * c.ffn, c.hidden], "ffn_gate/up")?;
            expect(&l.w_down, &[c.hidden, c.ffn], "ffn_down")?;
        }
        Ok(())
    }

    /// The output projection (vocab, hidden).
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Rows of the embedding table for `ids`, unscaled: the e_i that salience differentiates.
    pub fn embeddings(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        let idx = Tensor::new(ids, &Device::Cpu)?;
        self.embed.index_select(&idx, 0)
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
        let gemma = cfg.arch == Arch::Gemma3;
        let mut layers = Vec::new();
        for i in 0..cfg.n_layer {
            let norm =
                |r: &mut dyn FnMut(&[usize], f32) -> candle_core::Result<Tensor>,
                 n: usize|
                 -> candle_core::Result<Tensor> { r(&[n], 0.3)?.affine(1.0, 1.0) };
            layers.push(Layer {
                attn_norm: norm(&mut rand, h)?,
                w_qkv: rand(&[q + 2 * kv, h], ws(h))?,
                wo: rand(&[h, q], ws(q))?,
                ffn_norm: norm(&mut rand, h)?,
                w_gate_up: rand(&[2 * f, h], ws(h))?,
                w_down: rand(&[h, f], ws(f))?,
                q_norm: if gemma {
                    Some(norm(&mut rand, cfg.head_dim)?)
                } else {
                    None
                },
                k_norm: if gemma {
                    Some(norm(&mut rand, cfg.head_dim)?)
                } else {
                    None
                },
                post_attn_norm: if gemma {
                    Some(norm(&mut rand, h)?)
                } else {
                    None
                },
                post_ffn_norm: if gemma {
                    Some(norm(&mut rand, h)?)
                } else {
                    None
                },
                is_local: gemma && (i + 1) % 2 != 0,
            });
        }
        let embed = rand(&[cfg.vocab, h], 1.0)?;
        let final_norm = rand(&[h], 0.3)?.affine(1.0, 1.0)?;
        let _ = DType::F32;
        Ok(Self {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head: None,
        })
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: within each head, row 2i + j goes back to
/// row j * (head_dim / 2) + i.
fn unpermute_rotary(w: &Tensor, n_head: usize, head_dim: usize) -> Result<Tensor, EngineError> {
    let cols = w.dim(1).map_err(EngineError::candle)?;
    w.reshape((n_head, head_dim / 2, 2, cols))
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.reshape((n_head * head_dim, cols)))
        .map_err(EngineError::candle)
}
