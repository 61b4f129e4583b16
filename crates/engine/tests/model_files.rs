//! Bad model files give clear errors, never panics.

mod common;

use std::io::Write;

use salience_engine::registry::{self, FetchOptions, ModelSpec};
use salience_engine::Engine;

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("prompt-salience-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn load_err(path: &std::path::Path) -> String {
    match Engine::load(path, "test") {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_file() {
    let spec = ModelSpec::parse("/no/such/model.gguf").unwrap();
    let err = registry::resolve(&spec, &FetchOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no such file"), "{err}");
}

#[test]
fn not_a_gguf() {
    let p = temp("garbage.gguf");
    std::fs::write(&p, b"this is not a model").unwrap();
    let err = load_err(&p);
    assert!(err.contains("not a GGUF"), "{err}");
}

#[test]
fn truncated_gguf() {
    let real = common::default_engine_path();
    let bytes = std::fs::read(&real).unwrap();
    let p = temp("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&p);
    assert!(err.contains("truncated"), "{err}");
    let p = temp("header-only.gguf");
    std::fs::write(&p, &bytes[..1000]).unwrap();
    let err = load_err(&p);
    assert!(
        err.contains("corrupt") || err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture() {
    use candle_core::quantized::gguf_file::{write, Value};
    let p = temp("gpt2.gguf");
    let mut f = std::fs::File::create(&p).unwrap();
    let meta = [
        ("general.architecture", Value::String("gpt2".into())),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        ),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("a b".into())]),
        ),
    ];
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    write(&mut f, &meta, &[]).unwrap();
    f.flush().unwrap();
    let err = load_err(&p);
    assert!(err.contains("architecture `gpt2`"), "{err}");
    assert!(
        err.contains("supported: llama, smollm3, qwen2, qwen3, phi3, gemma2, gemma3"),
        "{err}"
    );
}

/// Corrupt tensor data (a NaN scale) is refused when the model loads, naming the tensor,
/// instead of turning every score into NaN.
#[test]
fn a_tensor_with_nan_values_is_refused_by_name() {
    use candle_core::quantized::{gguf_file, GgmlDType};
    let real = common::default_engine_path();
    let mut bytes = std::fs::read(&real).unwrap();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    let name = "blk.3.attn_k.weight";
    let info = &content.tensor_infos[name];
    let at = (content.tensor_data_offset + info.offset) as usize;
    match info.ggml_dtype {
        GgmlDType::F32 => bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes()),
        // Every other block of these types starts with its f16 scale.
        _ => bytes[at..at + 2].copy_from_slice(&0x7e00u16.to_le_bytes()),
    }
    let p = temp("nan.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let err = load_err(&p);
    assert!(err.contains(name) && err.contains("NaN"), "{err}");
}

#[test]
fn the_default_model_loads_with_its_chat_template() {
    let engine = common::default_engine();
    assert_eq!(engine.model.cfg.n_layer, 30);
    let p = engine
        .prepare(
            "Hello 123",
            None,
            salience_engine::prompt::TemplateMode::Chat,
        )
        .unwrap();
    // Template tokens have no source; the user's text maps back exactly.
    let mapped: Vec<_> = p.tokens.iter().filter_map(|t| t.source.clone()).collect();
    assert_eq!(mapped.first().unwrap().start, 0);
    assert_eq!(mapped.last().unwrap().end, "Hello 123".len());
    // Digits are split one by one, no prefix space before "Hello".
    assert_eq!(mapped.len(), 5, "{:?}", mapped);
    assert!(p.tokens.iter().any(|t| t.source.is_none()));
}
