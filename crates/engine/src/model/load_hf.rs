//! Models from Hugging Face directories: `config.json` and safetensors weights (one file or
//! shards with `model.safetensors.index.json`), kept in their stored dtype. Pickle checkpoints
//! (`*.bin`, `*.pt`) are never loaded: they can run code.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::arch::{Arch, SUPPORTED_HF_MODEL_TYPES};
use super::ops::Activation;
use super::rope::{Rope, RopeScaling};
use super::weight::Weight;
use super::{Layer, Model, ModelConfig};
use crate::EngineError;

/// The files of a Hugging Face model directory.
pub struct HfDirectory {
    pub dir: PathBuf,
    pub config: Value,
    pub weight_files: Vec<PathBuf>,
    pub tokenizer_json: PathBuf,
    /// `tokenizer_config.json`, or an empty object.
    pub tokenizer_config: Value,
    /// The chat template: `chat_template.jinja`, else `tokenizer_config.json`'s.
    pub chat_template: Option<String>,
    /// `generation_config.json`'s EOS ids, if any.
    pub generation_eos: Vec<u32>,
}

impl HfDirectory {
    /// Whether `path` looks like a model directory (has a `config.json`).
    pub fn is_model_dir(path: &Path) -> bool {
        path.is_dir() && path.join("config.json").is_file()
    }

    pub fn open(dir: &Path) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::ModelFile {
            path: dir.to_owned(),
            reason,
        };
        let read_json = |name: &str| -> Result<Option<Value>, EngineError> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text =
                std::fs::read_to_string(&p).map_err(|e| bad(format!("cannot read {name}: {e}")))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| bad(format!("{name} is not valid JSON: {e}")))
        };
        let config = read_json("config.json")?
            .ok_or_else(|| bad("no config.json: not a Hugging Face model directory".into()))?;
        let weight_files = match read_json("model.safetensors.index.json")? {
            Some(index) => {
                let map = index
                    .get("weight_map")
                    .and_then(Value::as_object)
                    .ok_or_else(|| bad("model.safetensors.index.json has no weight_map".into()))?;
                let mut files: Vec<String> = map
                    .values()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                files.sort();
                files.dedup();
                files.into_iter().map(|f| dir.join(f)).collect()
            }
            None if dir.join("model.safetensors").is_file() => vec![dir.join("model.safetensors")],
            None => {
                let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                    .map_err(|e| bad(e.to_string()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                    .collect();
                found.sort();
                found
            }
        };
        if weight_files.is_empty() {
            let pickle = [
                "pytorch_model.bin",
                "model.pt",
                "pytorch_model.bin.index.json",
            ]
            .iter()
            .any(|f| dir.join(f).exists());
            return Err(bad(if pickle {
                "only pickle weights (pytorch_model.bin): these can run code and are never \
                 loaded; convert the model to safetensors"
                    .into()
            } else {
                "no *.safetensors weights".into()
            }));
        }
        for f in &weight_files {
            if !f.is_file() {
                return Err(bad(format!("missing weight file {}", f.display())));
            }
        }
        let tokenizer_json = dir.join("tokenizer.json");
        if !tokenizer_json.is_file() {
            return Err(bad(
                "no tokenizer.json (slow tokenizers such as tokenizer.model alone are not \
                 supported)"
                    .into(),
            ));
        }
        let tokenizer_config =
            read_json("tokenizer_config.json")?.unwrap_or(Value::Object(Default::default()));
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| bad(format!("cannot read chat_template.jinja: {e}")))?,
            )
        } else {
            match tokenizer_config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the default one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            }
        };
        let generation_eos = match read_json("generation_config.json")?
            .as_ref()
            .and_then(|g| g.get("eos_token_id"))
        {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).into_iter().collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|x| x as u32))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            dir: dir.to_owned(),
            config,
            weight_files,
            tokenizer_json,
            tokenizer_config,
            chat_template,
            generation_eos,
        })
    }

    fn bad(&self, reason: String) -> EngineError {
        EngineError::ModelFile {
            path: self.dir.clone(),
            reason,
        }
    }
}

/// Reads `config.json` values, accepting both the classic keys (`rope_theta`, `rope_scaling`)
/// and transformers 5's `rope_parameters`.
struct Config<'a> {
    v: &'a Value,
    dir: &'a HfDirectory,
}

impl Config<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize, EngineError> {
        self.opt_usize(key).ok_or_else(|| {
            self.dir
                .bad(format!("config.json: missing or non-integer `{key}`"))
        })
    }
    fn opt_usize(&self, key: &str) -> Option<usize> {
        self.get(key)?.as_u64().map(|x| x as usize)
    }
    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// The rope parameters for a layer type ("full_attention" or "sliding_attention"): the
    /// object holding `rope_type`/`rope_theta` and the scaling keys.
    fn rope_params(&self, layer_type: &str) -> Value {
        let mut out = serde_json::Map::new();
        if let Some(theta) = self.get("rope_theta") {
            out.insert("rope_theta".into(), theta.clone());
        }
        if let Some(Value::Object(s)) = self.get("rope_scaling") {
            out.extend(s.clone());
        }
        if let Some(Value::Object(p)) = self.get("rope_parameters") {
            // Per layer type (Gemma 3) or one set for all.
            let set = match p.get(layer_type) {
                Some(Value::Object(inner)) => inner.clone(),
                _ => p.clone(),
            };
            out.extend(set);
        }
        Value::Object(out)
    }

    fn rope(&self, layer_type: &str, dims: usize, default_base: f64) -> Result<Rope, EngineError> {
        let p = self.rope_params(layer_type);
        let base = p
            .get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(default_base);
        let rope = Rope::plain(dims, base);
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| p.get(k).and_then(Value::as_f64);
        let list = |k: &str| -> Option<Vec<f64>> {
            p.get(k)?.as_array()?.iter().map(Value::as_f64).collect()
        };
        let need = |k: &str| {
            num(k).ok_or_else(|| {
                self.dir
                    .bad(format!("config.json: rope scaling `{kind}` needs `{k}`"))
            })
        };
        let scaling = match kind {
            "default" => None,
            "linear" => Some(RopeScaling::Linear {
                factor: need("factor")?,
            }),
            "llama3" => Some(RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_context: need("original_max_position_embeddings")?,
            }),
            "longrope" | "su" => {
                let original = num("original_max_position_embeddings")
                    .or_else(|| self.opt_f64("original_max_position_embeddings"))
                    .ok_or_else(|| self.dir.bad("config.json: longrope needs original_max_position_embeddings".into()))?;
                let max = self.opt_f64("max_position_embeddings").unwrap_or(original);
                let factor = num("factor").unwrap_or(max / original);
                let attention_factor = num("attention_factor").unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / original.ln()).sqrt()
                });
                Some(RopeScaling::LongRope {
                    short_factor: list("short_factor").ok_or_else(|| self.dir.bad("config.json: longrope needs short_factor".into()))?,
                    long_factor: list("long_factor").ok_or_else(|| self.dir.bad("config.json: longrope needs long_factor".into()))?,
                    original_context: original as usize,
                    attention_factor,
                })
            }
            other => {
                return Err(self.dir.bad(format!(
                    "rope scaling `{other}` is not supported (supported: default, linear, llama3, longrope)"
                )))
            }
        };
        match scaling {
            Some(s) => rope.scaled(&s).map_err(|e| self.dir.bad(e)),
            None => Ok(rope),
        }
    }
}

impl Model {
    pub fn from_hf(dir: &HfDirectory) -> Result<Self, EngineError> {
        let c = Config {
            v: &dir.config,
            dir,
        };
        let model_type = c
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| dir.bad("config.json has no model_type".into()))?;
        let arch = Arch::from_hf_model_type(model_type).ok_or_else(|| {
            EngineError::UnsupportedArchitecture {
                found: model_type.to_string(),
                supported: SUPPORTED_HF_MODEL_TYPES,
            }
        })?;
        let t = arch.traits();
        let hidden = c.usize("hidden_size")?;
        let n_layer = c.usize("num_hidden_layers")?;
        let n_head = c.usize("num_attention_heads")?;
        let n_kv_head = c.opt_usize("num_key_value_heads").unwrap_or(n_head);
        let head_dim = c.opt_usize("head_dim").unwrap_or(hidden / n_head);
        let ffn = c.usize("intermediate_size")?;
        let activation = match c
            .get("hidden_activation")
            .or_else(|| c.get("hidden_act"))
            .and_then(Value::as_str)
        {
            None => t.activation,
            Some("silu" | "swish") => Activation::Silu,
            Some("gelu_pytorch_tanh" | "gelu_new" | "gelu_fast") => Activation::GeluTanh,
            Some(other) => {
                return Err(dir.bad(format!(
                    "config.json: activation `{other}` is not supported"
                )))
            }
        };
        let partial = c
            .opt_f64("partial_rotary_factor")
            .or_else(|| {
                c.rope_params("full_attention")
                    .get("partial_rotary_factor")
                    .and_then(Value::as_f64)
            })
            .unwrap_or(1.0);
        let rope_dims = ((head_dim as f64 * partial) as usize) / 2 * 2;
        let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
        let rope = c.rope("full_attention", rope_dims, 10_000.0)?;
        let rope_local = if arch == Arch::Gemma3 {
            match c.opt_f64("rope_local_base_freq") {
                Some(base) => Rope::plain(rope_dims, base),
                None => c.rope("sliding_attention", rope_dims, 10_000.0)?,
            }
        } else {
            rope.clone()
        };
        let uses_window = c
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(true);
        let sliding_window = c
            .opt_usize("sliding_window")
            .filter(|&w| uses_window && w > 0);
        let layer_types: Option<Vec<String>> = c.get("layer_types").and_then(|v| {
            v.as_array()?
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect()
        });
        let is_local = |i: usize| -> bool {
            if sliding_window.is_none() {
                return false;
            }
            if let Some(types) = &layer_types {
                return types.get(i).is_some_and(|t| t == "sliding_attention");
            }
            match arch {
                Arch::Gemma2 => i.is_multiple_of(2),
                Arch::Gemma3 => {
                    let pattern = c.opt_usize("sliding_window_pattern").unwrap_or(6);
                    !(i + 1).is_multiple_of(pattern)
                }
                _ => true,
            }
        };
        // SmolLM3: `no_rope_layers[i]` is 1 where layer i is rotated, 0 where not.
        let no_rope_layers: Option<Vec<bool>> = c.get("no_rope_layers").and_then(|v| {
            v.as_array()?
                .iter()
                .map(|x| x.as_u64().map(|b| b != 0))
                .collect()
        });
        let no_rope_interval = c.opt_usize("no_rope_layer_interval").unwrap_or(4);
        let rotary = |i: usize| -> bool {
            if arch != Arch::SmolLM3 {
                return true;
            }
            match &no_rope_layers {
                Some(list) => list.get(i).copied().unwrap_or(true),
                None => !(i + 1).is_multiple_of(no_rope_interval),
            }
        };
        let attn_scale = match c.opt_f64("query_pre_attn_scalar").filter(|_| gemma) {
            Some(s) => (1.0 / s.sqrt()) as f32,
            None => 1.0 / (head_dim as f32).sqrt(),
        };
        let cap = |k: &str| c.opt_f64(k).filter(|_| gemma).map(|x| x as f32);

        // SAFETY: the files are mapped read-only and copied out before the map is dropped;
        // a file changed meanwhile can give wrong numbers but not unsafety in practice, the
        // same contract as every safetensors loader.
        let files = unsafe { MmapedSafetensors::multi(&dir.weight_files) }
            .map_err(|e| dir.bad(format!("cannot read the safetensors weights: {e}")))?;
        let names: std::collections::HashSet<String> =
            files.tensors().into_iter().map(|(n, _)| n).collect();
        let prefix = ["model.", "model.language_model.", "language_model.model."]
            .into_iter()
            .find(|p| names.contains(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| {
                dir.bad("no embed_tokens.weight among the safetensors tensors".into())
            })?;
        let load = |name: &str| -> Result<Tensor, EngineError> {
            if !names.contains(name) {
                return Err(dir.bad(format!("missing tensor `{name}`")));
            }
            let t = files
                .load(name, &Device::Cpu)
                .map_err(|e| dir.bad(format!("cannot read tensor `{name}`: {e}")))?;
            match t.dtype() {
                DType::F32 | DType::F16 | DType::BF16 => Ok(t),
                other => Err(dir.bad(format!(
                    "tensor `{name}` has dtype {other:?} (supported: F32, F16, BF16)"
                ))),
            }
        };
        let matrix = |name: &str| -> Result<Weight, EngineError> {
            let w = Weight::from_tensor(load(name)?)
                .map_err(|e| dir.bad(format!("tensor `{name}`: {e}")))?;
            if !w.all_finite().map_err(EngineError::candle)? {
                return Err(dir.bad(format!(
                    "tensor `{name}` holds NaN or infinite values: the file is corrupt"
                )));
            }
            Ok(w)
        };
        let norm = |name: &str| -> Result<Tensor, EngineError> {
            let v = load(name)?
                .to_dtype(DType::F32)
                .map_err(EngineError::candle)?;
            if t.norm_plus_one {
                (v + 1.0).map_err(EngineError::candle)
            } else {
                Ok(v)
            }
        };
        let vector = |name: &str| -> Result<Tensor, EngineError> {
            load(name)?
                .to_dtype(DType::F32)
                .map_err(EngineError::candle)
        };
        let stack = |ws: Vec<Weight>| Weight::stack(ws).map_err(|e| dir.bad(e.to_string()));

        let embed = matrix(&format!("{prefix}embed_tokens.weight"))?;
        let vocab = embed.rows();
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = format!("{prefix}layers.{i}.");
            let w_qkv = if names.contains(&format!("{p}self_attn.qkv_proj.weight")) {
                matrix(&format!("{p}self_attn.qkv_proj.weight"))?
            } else {
                stack(vec![
                    matrix(&format!("{p}self_attn.q_proj.weight"))?,
                    matrix(&format!("{p}self_attn.k_proj.weight"))?,
                    matrix(&format!("{p}self_attn.v_proj.weight"))?,
                ])?
            };
            let w_gate_up = if names.contains(&format!("{p}mlp.gate_up_proj.weight")) {
                matrix(&format!("{p}mlp.gate_up_proj.weight"))?
            } else {
                stack(vec![
                    matrix(&format!("{p}mlp.gate_proj.weight"))?,
                    matrix(&format!("{p}mlp.up_proj.weight"))?,
                ])?
            };
            let qkv_bias = if t.qkv_bias {
                let b = |x: &str| vector(&format!("{p}self_attn.{x}_proj.bias"));
                Some(Tensor::cat(&[b("q")?, b("k")?, b("v")?], 0).map_err(EngineError::candle)?)
            } else {
                None
            };
            let (q_norm, k_norm) = if t.qk_norm {
                (
                    Some(norm(&format!("{p}self_attn.q_norm.weight"))?),
                    Some(norm(&format!("{p}self_attn.k_norm.weight"))?),
                )
            } else {
                (None, None)
            };
            // Gemma names its four norms differently; elsewhere the "post attention" norm is
            // the one before the MLP.
            let (ffn_norm, post_attn_norm, post_ffn_norm) = if t.sandwich_norms {
                (
                    norm(&format!("{p}pre_feedforward_layernorm.weight"))?,
                    Some(norm(&format!("{p}post_attention_layernorm.weight"))?),
                    Some(norm(&format!("{p}post_feedforward_layernorm.weight"))?),
                )
            } else {
                (
                    norm(&format!("{p}post_attention_layernorm.weight"))?,
                    None,
                    None,
                )
            };
            layers.push(Layer {
                attn_norm: norm(&format!("{p}input_layernorm.weight"))?,
                w_qkv,
                qkv_bias,
                wo: matrix(&format!("{p}self_attn.o_proj.weight"))?,
                ffn_norm,
                w_gate_up,
                w_down: matrix(&format!("{p}mlp.down_proj.weight"))?,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                is_local: is_local(i),
                rotary: rotary(i),
            });
        }
        let final_norm = norm(&format!("{prefix}norm.weight"))?;
        let lm_head = ["lm_head.weight", "language_model.lm_head.weight"]
            .into_iter()
            .find(|n| names.contains(*n))
            .map(matrix)
            .transpose()?;
        let cfg = ModelConfig {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            head_dim,
            ffn,
            vocab,
            eps: c.opt_f64("rms_norm_eps").unwrap_or(1e-6) as f32,
            rope,
            rope_local,
            sliding_window,
            embed_scale: t.embed_scale(hidden),
            attn_scale,
            attn_softcap: cap("attn_logit_softcapping"),
            final_softcap: cap("final_logit_softcapping"),
            context_length: c.opt_usize("max_position_embeddings").unwrap_or(4096),
            activation,
        };
        let model = Self {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
        };
        model.check_shapes().map_err(|e| dir.bad(e))?;
        Ok(model)
    }
}
