//! Random-weight GGUF files of real models' shapes, for measuring speed and memory of models
//! whose weights this machine cannot download (`bench --synthetic llama-8b-q4_k`).
//!
//! Each matrix is one quantized tile of random values repeated down its rows: the products
//! cost exactly what real weights cost, and the file is written without holding an f32 copy.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::model::weight::qtensor_from_bytes;
use crate::model::Arch;
use crate::EngineError;

/// The shape of a model family member.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub name: &'static str,
    pub arch: Arch,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub tied: bool,
}

const fn shape(
    name: &'static str,
    arch: Arch,
    (hidden, layers, heads, kv_heads, head_dim): (usize, usize, usize, usize, usize),
    ffn: usize,
    vocab: usize,
    tied: bool,
) -> Shape {
    Shape {
        name,
        arch,
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        tied,
    }
}

/// The shapes `--synthetic` knows, from the models' published configurations.
pub const SHAPES: &[Shape] = &[
    shape(
        "smollm2-135m",
        Arch::Llama,
        (576, 30, 9, 3, 64),
        1536,
        49152,
        true,
    ),
    shape(
        "llama-1b",
        Arch::Llama,
        (2048, 16, 32, 8, 64),
        8192,
        128256,
        true,
    ),
    shape(
        "llama-3b",
        Arch::Llama,
        (3072, 28, 24, 8, 128),
        8192,
        128256,
        true,
    ),
    shape(
        "llama-8b",
        Arch::Llama,
        (4096, 32, 32, 8, 128),
        14336,
        128256,
        false,
    ),
    shape(
        "qwen2-0.5b",
        Arch::Qwen2,
        (896, 24, 14, 2, 64),
        4864,
        151936,
        true,
    ),
    shape(
        "qwen2-1.5b",
        Arch::Qwen2,
        (1536, 28, 12, 2, 128),
        8960,
        151936,
        true,
    ),
    shape(
        "qwen2-7b",
        Arch::Qwen2,
        (3584, 28, 28, 4, 128),
        18944,
        152064,
        false,
    ),
    shape(
        "qwen3-0.6b",
        Arch::Qwen3,
        (1024, 28, 16, 8, 128),
        3072,
        151936,
        true,
    ),
    shape(
        "qwen3-4b",
        Arch::Qwen3,
        (2560, 36, 32, 8, 128),
        9728,
        151936,
        true,
    ),
    shape(
        "phi3-mini",
        Arch::Phi3,
        (3072, 32, 32, 32, 96),
        8192,
        32064,
        false,
    ),
    shape(
        "gemma2-2b",
        Arch::Gemma2,
        (2304, 26, 8, 4, 256),
        9216,
        256000,
        true,
    ),
    shape(
        "gemma3-1b",
        Arch::Gemma3,
        (1152, 26, 4, 1, 256),
        6912,
        262144,
        true,
    ),
];

/// The weight types a synthetic model can be written in, by the names `parse` takes.
const WEIGHT_TYPES: [(&str, GgmlDType); 12] = [
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q8_0", GgmlDType::Q8_0),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
];

/// Parses `ARCH-SIZE-TYPE`, e.g. `llama-8b-q4_k`, `qwen2-1.5b-q8_0`.
pub fn parse(spec: &str) -> Result<(Shape, GgmlDType), EngineError> {
    let known = || SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ");
    let (name, dtype) = spec.rsplit_once('-').ok_or_else(|| {
        EngineError::InvalidInput(format!(
            "synthetic model `{spec}`: expected SHAPE-TYPE such as llama-8b-q4_k (shapes: {})",
            known()
        ))
    })?;
    let shape = SHAPES.iter().find(|s| s.name == name).ok_or_else(|| {
        EngineError::InvalidInput(format!(
            "unknown synthetic shape `{name}` (known: {})",
            known()
        ))
    })?;
    let dtype = WEIGHT_TYPES
        .iter()
        .find(|(name, _)| *name == dtype)
        .map(|&(_, t)| t)
        .ok_or_else(|| {
            let known: Vec<&str> = WEIGHT_TYPES.iter().map(|(name, _)| *name).collect();
            EngineError::InvalidInput(format!(
                "unknown weight type `{dtype}` ({})",
                known.join(", ")
            ))
        })?;
    Ok((*shape, dtype))
}

fn candle(e: candle_core::Error) -> EngineError {
    EngineError::candle(e)
}

/// A (rows, cols) matrix of `dtype`: one random tile, quantized, repeated down the rows.
/// Types whose blocks do not divide `cols` fall back to q8_0, as llama.cpp's quantizer does.
fn matrix(rows: usize, cols: usize, dtype: GgmlDType, seed: u64) -> Result<QTensor, EngineError> {
    let dtype = if cols.is_multiple_of(dtype.block_size()) {
        dtype
    } else {
        GgmlDType::Q8_0
    };
    let tile_rows = rows.min(64);
    let scale = 1.0 / (cols as f32).sqrt();
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..tile_rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect();
    let tile = Tensor::from_vec(values, (tile_rows, cols), &Device::Cpu).map_err(candle)?;
    let q = QTensor::quantize(&tile, dtype).map_err(candle)?;
    let tile_bytes = q.data().map_err(candle)?.into_owned();
    let row_bytes = tile_bytes.len() / tile_rows;
    let mut bytes = Vec::with_capacity(rows * row_bytes);
    while bytes.len() < rows * row_bytes {
        let take = (rows * row_bytes - bytes.len()).min(tile_bytes.len());
        bytes.extend_from_slice(&tile_bytes[..take]);
    }
    qtensor_from_bytes(bytes, dtype, (rows, cols)).map_err(candle)
}

fn vector(values: Vec<f32>) -> Result<QTensor, EngineError> {
    let n = values.len();
    let t = Tensor::from_vec(values, n, &Device::Cpu).map_err(candle)?;
    QTensor::quantize(&t, GgmlDType::F32).map_err(candle)
}

/// GPT-2's byte-level alphabet: a printable character for every byte.
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut out = vec![String::new(); 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out[b as usize] = char::from_u32(c).expect("valid").to_string();
    }
    printable.clear();
    out
}

/// Writes a random-weight GGUF of `shape` with matrices in `dtype` to `path`.
pub fn write_gguf(shape: &Shape, dtype: GgmlDType, path: &Path) -> Result<(), EngineError> {
    let s = shape;
    let arch = s.arch.traits().gguf_name;
    let (q, kv) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut owned: Vec<(String, usize)> = Vec::new();
    let mut store: Vec<QTensor> = Vec::new();
    let mut add = |name: String, t: QTensor, owned: &mut Vec<(String, usize)>| {
        store.push(t);
        owned.push((name, store.len() - 1));
    };
    add(
        "token_embd.weight".into(),
        matrix(s.vocab, s.hidden, dtype, 1)?,
        &mut owned,
    );
    add(
        "output_norm.weight".into(),
        vector(vec![1.0; s.hidden])?,
        &mut owned,
    );
    if !s.tied {
        add(
            "output.weight".into(),
            matrix(s.vocab, s.hidden, dtype, 2)?,
            &mut owned,
        );
    }
    // One layer's tensors, named once per layer: every layer costs the same as a real one.
    let t = s.arch.traits();
    let mut layer: Vec<(&str, QTensor)> = vec![
        ("attn_norm", vector(vec![1.0; s.hidden])?),
        ("ffn_norm", vector(vec![1.0; s.hidden])?),
        ("attn_output", matrix(s.hidden, q, dtype, 3)?),
        ("ffn_down", matrix(s.hidden, s.ffn, dtype, 4)?),
    ];
    if s.arch == Arch::Phi3 {
        layer.push(("attn_qkv", matrix(q + 2 * kv, s.hidden, dtype, 5)?));
        layer.push(("ffn_up", matrix(2 * s.ffn, s.hidden, dtype, 6)?));
    } else {
        layer.push(("attn_q", matrix(q, s.hidden, dtype, 5)?));
        layer.push(("attn_k", matrix(kv, s.hidden, dtype, 7)?));
        layer.push(("attn_v", matrix(kv, s.hidden, dtype, 8)?));
        layer.push(("ffn_gate", matrix(s.ffn, s.hidden, dtype, 6)?));
        layer.push(("ffn_up", matrix(s.ffn, s.hidden, dtype, 9)?));
    }
    if t.qk_norm {
        layer.push(("attn_q_norm", vector(vec![1.0; s.head_dim])?));
        layer.push(("attn_k_norm", vector(vec![1.0; s.head_dim])?));
    }
    if t.sandwich_norms {
        layer.push(("post_attention_norm", vector(vec![1.0; s.hidden])?));
        layer.push(("post_ffw_norm", vector(vec![1.0; s.hidden])?));
    }
    let mut biases: Vec<(&str, QTensor)> = Vec::new();
    if t.qkv_bias {
        biases.push(("attn_q", vector(vec![0.01; q])?));
        biases.push(("attn_k", vector(vec![0.01; kv])?));
        biases.push(("attn_v", vector(vec![0.01; kv])?));
    }
    let mut names: Vec<String> = owned.iter().map(|(n, _)| n.clone()).collect();
    let mut refs: Vec<&QTensor> = owned.iter().map(|(_, i)| &store[*i]).collect();
    for i in 0..s.layers {
        for (n, tensor) in &layer {
            names.push(format!("blk.{i}.{n}.weight"));
            refs.push(tensor);
        }
        for (n, tensor) in &biases {
            names.push(format!("blk.{i}.{n}.bias"));
            refs.push(tensor);
        }
    }
    let tensors: Vec<(&str, &QTensor)> = names.iter().map(|n| n.as_str()).zip(refs).collect();

    let mut tokens = byte_tokens();
    tokens.extend((tokens.len()..s.vocab).map(|i| format!("<synthetic {i}>")));
    // One merge, of the bytes 0 and 1 (never in a prompt), so that the merges are a list of
    // strings: llama.cpp refuses the file when they are not (an empty list is written as
    // one of u32), and the same file then runs in both for same-run ratios.
    let merged = format!("{}{}", tokens[0], tokens[1]);
    let merges = vec![Value::String(format!("{} {}", tokens[0], tokens[1]))];
    // Ids 256 and 257 are BOS and EOS; 258 is the first free one.
    tokens[258] = merged;
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |x: usize| Value::U32(x as u32);
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("synthetic {}", s.name)),
        ),
        (key("embedding_length"), u32v(s.hidden)),
        (key("block_count"), u32v(s.layers)),
        (key("feed_forward_length"), u32v(s.ffn)),
        (key("attention.head_count"), u32v(s.heads)),
        (key("attention.head_count_kv"), u32v(s.kv_heads)),
        (key("attention.key_length"), u32v(s.head_dim)),
        (key("attention.value_length"), u32v(s.head_dim)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (key("context_length"), u32v(8192)),
        (key("rope.freq_base"), Value::F32(500_000.0)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), u32v(256)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(257)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let partial = path.with_extension("gguf.partial");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::Fetch(e.to_string()))?;
    }
    let file = std::fs::File::create(&partial)
        .map_err(|e| EngineError::Fetch(format!("cannot write {}: {e}", partial.display())))?;
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &metadata, &tensors).map_err(candle)?;
    drop(w);
    std::fs::rename(&partial, path).map_err(|e| EngineError::Fetch(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synthetic_model_loads_and_runs() {
        // The smallest shape, written and loaded back through the normal GGUF path.
        let dir = std::env::temp_dir().join(format!("ps-synthetic-{}", std::process::id()));
        let path = dir.join("smollm2-135m-q8_0.gguf");
        let (shape, dtype) = parse("smollm2-135m-q8_0").unwrap();
        write_gguf(&shape, dtype, &path).unwrap();
        let engine = crate::Engine::load(&path, "synthetic").unwrap();
        assert_eq!(engine.model.cfg.n_layer, 30);
        assert_eq!(engine.model.precision(), "q8_0");
        let ids = engine.tokenize_target("hello world").unwrap();
        assert_eq!(
            ids.len(),
            "hello world".len(),
            "one token per byte: the only merge joins bytes 0 and 1"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(parse("llama-8b-q4_k").is_ok());
        assert!(parse("llama-9b-q4_k").is_err());
        assert!(parse("llama-8b-q3_x").is_err());
    }
}
