//! Models from GGUF files (llama.cpp's layout), weights kept as stored.

use candle_core::Tensor;

use super::arch::{Arch, SUPPORTED_ARCHITECTURES};
use super::rope::{Rope, RopeScaling};
use super::weight::Weight;
use super::{Layer, Model, ModelConfig};
use crate::gguf::GgufFile;
use crate::EngineError;

impl Model {
    pub fn from_gguf(gguf: &mut GgufFile) -> Result<Self, EngineError> {
        let arch_name = gguf.string("general.architecture")?;
        let arch = Arch::from_gguf_name(&arch_name).ok_or_else(|| {
            EngineError::UnsupportedArchitecture {
                found: arch_name.clone(),
                supported: SUPPORTED_ARCHITECTURES,
            }
        })?;
        let traits = arch.traits();
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
        let rope_dims = gguf
            .opt_u32(&key("rope.dimension_count"))
            .map(|x| x as usize)
            .unwrap_or(head_dim);
        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        // Gemma 3's rope bases are not in its GGUF: 10k for local layers, 1M for global.
        let default_base = if arch == Arch::Gemma3 {
            1_000_000.0
        } else {
            10_000.0
        };
        let base = gguf.opt_f32(&key("rope.freq_base")).unwrap_or(default_base) as f64;
        let plain = Rope::plain(rope_dims, base);
        let rope = match rope_scaling(gguf, &arch_name)? {
            Some(s) => plain.scaled(&s).map_err(|e| gguf.bad(e))?,
            None => plain,
        };
        let rope_local = if arch == Arch::Gemma3 {
            let base = gguf.opt_f32(&key("rope.freq_base_swa")).unwrap_or(10_000.0);
            Rope::plain(rope_dims, base as f64)
        } else {
            rope.clone()
        };
        let sliding_window = match arch {
            Arch::Gemma3 => Some(
                gguf.opt_u32(&key("attention.sliding_window"))
                    .unwrap_or(512) as usize,
            ),
            // llama.cpp's converter writes 0 for "no window".
            _ => gguf
                .opt_u32(&key("attention.sliding_window"))
                .map(|x| x as usize)
                .filter(|&w| w > 0),
        };
        let embed = weight(gguf, "token_embd.weight")?;
        let vocab = embed.rows();
        let cfg = ModelConfig {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            eps,
            rope,
            rope_local,
            sliding_window,
            embed_scale: traits.embed_scale(hidden),
            attn_scale: gguf
                .opt_f32(&key("attention.scale"))
                .unwrap_or(1.0 / (head_dim as f32).sqrt()),
            attn_softcap: gguf
                .opt_f32(&key("attn_logit_softcapping"))
                .filter(|_| gemma),
            final_softcap: gguf
                .opt_f32(&key("final_logit_softcapping"))
                .filter(|_| gemma),
            context_length,
            activation: traits.activation,
        };
        // SmolLM3: every `step`-th layer has no rotary embedding (llama.cpp's default, 4).
        let no_rope_step = (arch == Arch::SmolLM3).then(|| {
            gguf.opt_u32(&key("no_rope_layer_step"))
                .map(|x| x as usize)
                .unwrap_or(4)
        });
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let w_qkv = if arch == Arch::Phi3 {
                weight(gguf, &name("attn_qkv"))?
            } else {
                let mut wq = weight(gguf, &name("attn_q"))?;
                let mut wk = weight(gguf, &name("attn_k"))?;
                if traits.gguf_interleaved_rope {
                    // llama.cpp interleaves the rotary halves of Llama's q/k rows; undo it so
                    // the rope is the usual rotate-half form for every architecture.
                    wq = unpermute_rotary(&wq, n_head, head_dim).map_err(EngineError::candle)?;
                    wk = unpermute_rotary(&wk, n_kv_head, head_dim).map_err(EngineError::candle)?;
                }
                let wv = weight(gguf, &name("attn_v"))?;
                Weight::stack(vec![wq, wk, wv]).map_err(|e| gguf.bad(e.to_string()))?
            };
            let w_gate_up = if arch == Arch::Phi3 {
                // Phi-3 keeps gate and up in one tensor, gate rows first.
                weight(gguf, &name("ffn_up"))?
            } else {
                let gate = weight(gguf, &name("ffn_gate"))?;
                let up = weight(gguf, &name("ffn_up"))?;
                Weight::stack(vec![gate, up]).map_err(|e| gguf.bad(e.to_string()))?
            };
            let qkv_bias = if traits.qkv_bias {
                let mut bias = |t: &str| gguf.f32_tensor(&format!("blk.{i}.{t}.bias"));
                let parts = [bias("attn_q")?, bias("attn_k")?, bias("attn_v")?];
                Some(Tensor::cat(&parts, 0).map_err(EngineError::candle)?)
            } else {
                None
            };
            let mut vector = |t: &str, on: bool| -> Result<Option<Tensor>, EngineError> {
                if on {
                    Ok(Some(gguf.f32_tensor(&name(t))?))
                } else {
                    Ok(None)
                }
            };
            let q_norm = vector("attn_q_norm", traits.qk_norm)?;
            let k_norm = vector("attn_k_norm", traits.qk_norm)?;
            let post_attn_norm = vector("post_attention_norm", traits.sandwich_norms)?;
            let post_ffn_norm = vector("post_ffw_norm", traits.sandwich_norms)?;
            let attn_norm = gguf.f32_tensor(&name("attn_norm"))?;
            let ffn_norm = gguf.f32_tensor(&name("ffn_norm"))?;
            layers.push(Layer {
                attn_norm,
                w_qkv,
                qkv_bias,
                wo: weight(gguf, &name("attn_output"))?,
                ffn_norm,
                w_gate_up,
                w_down: weight(gguf, &name("ffn_down"))?,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                is_local: match arch {
                    Arch::Gemma3 => (i + 1) % 6 != 0,
                    Arch::Gemma2 => i.is_multiple_of(2),
                    _ => sliding_window.is_some(),
                },
                rotary: no_rope_step.is_none_or(|step| !(i + 1).is_multiple_of(step)),
            });
        }
        let final_norm = gguf.f32_tensor("output_norm.weight")?;
        let lm_head = if gguf.has_tensor("output.weight") {
            Some(weight(gguf, "output.weight")?)
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
}

/// A weight matrix as stored, refused if it holds NaN or infinite values (a corrupt file),
/// naming the tensor, rather than letting it turn every score into NaN.
fn weight(gguf: &mut GgufFile, name: &str) -> Result<Weight, EngineError> {
    let q = gguf.qtensor(name)?;
    let w = Weight::from_qtensor(q).map_err(|e| gguf.bad(format!("tensor `{name}`: {e}")))?;
    match w.all_finite() {
        Ok(true) => Ok(w),
        Ok(false) => Err(gguf.bad(format!(
            "tensor `{name}` holds NaN or infinite values: the file is corrupt"
        ))),
        Err(e) => Err(gguf.bad(format!("cannot read tensor `{name}`: {e}"))),
    }
}

/// The rope scaling a GGUF file describes, if any.
fn rope_scaling(gguf: &mut GgufFile, arch: &str) -> Result<Option<RopeScaling>, EngineError> {
    let factors = |gguf: &mut GgufFile, name: &str| -> Result<Option<Vec<f64>>, EngineError> {
        if !gguf.has_tensor(name) {
            return Ok(None);
        }
        let t = gguf.f32_tensor(name)?;
        let v: Vec<f32> = t
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .map_err(EngineError::candle)?;
        Ok(Some(v.into_iter().map(f64::from).collect()))
    };
    // Llama 3: one factor per frequency, written by llama.cpp's converter.
    if let Some(f) = factors(gguf, "rope_freqs.weight")? {
        return Ok(Some(RopeScaling::FreqFactors(f)));
    }
    if let (Some(short), Some(long)) = (
        factors(gguf, "rope_factors_short.weight")?,
        factors(gguf, "rope_factors_long.weight")?,
    ) {
        let original = gguf
            .opt_u32(&format!("{arch}.rope.scaling.original_context_length"))
            .ok_or_else(|| {
                gguf.bad("longrope factors without an original context length".into())
            })?;
        let attention_factor = gguf
            .opt_f32(&format!("{arch}.rope.scaling.attn_factor"))
            .unwrap_or(1.0) as f64;
        return Ok(Some(RopeScaling::LongRope {
            short_factor: short,
            long_factor: long,
            original_context: original as usize,
            attention_factor,
        }));
    }
    match gguf.opt_string(&format!("{arch}.rope.scaling.type")).as_deref() {
        None | Some("none") => Ok(None),
        Some("linear") => {
            let factor = gguf
                .opt_f32(&format!("{arch}.rope.scaling.factor"))
                .unwrap_or(1.0) as f64;
            Ok((factor != 1.0).then_some(RopeScaling::Linear { factor }))
        }
        Some(other) => Err(gguf.bad(format!(
            "rope scaling `{other}` is not supported (supported: linear, llama3 frequency factors, longrope)"
        ))),
    }
}

/// Inverse of llama.cpp's `permute(w, n_head)`: within each head, row 2i + j goes back to
/// row j * (head_dim / 2) + i.
fn unpermute_rotary(w: &Weight, n_head: usize, head_dim: usize) -> candle_core::Result<Weight> {
    let mut order = Vec::with_capacity(n_head * head_dim);
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..head_dim / 2 {
                order.push(h * head_dim + 2 * i + j);
            }
        }
    }
    w.permute_rows(&order)
}
