//! Shared by the integration tests: the default model, fetched through the project's own code.

use std::path::PathBuf;

use salience_engine::model::{Arch, Model, ModelConfig, Rope};
use salience_engine::registry::{self, FetchOptions, ModelSpec, DEFAULT_MODEL};
use salience_engine::Engine;

/// The default model's file, fetched into the cache if missing. Never skips: no model is a
/// failure.
#[allow(dead_code)]
pub fn default_engine_path() -> PathBuf {
    let spec = ModelSpec::parse(DEFAULT_MODEL).unwrap();
    let fetch = FetchOptions {
        // Tests fetch the models they need (or fail): they may use the network.
        allow_network: true,
        ..FetchOptions::default()
    };
    registry::resolve(&spec, &fetch)
        .unwrap_or_else(|e| panic!("the default model is needed and could not be fetched: {e}"))
}

/// The default model, loaded.
#[allow(dead_code)]
pub fn default_engine() -> Engine {
    Engine::load(&default_engine_path(), DEFAULT_MODEL).expect("load default model")
}

/// The PyTorch reference cases, vendored in the repository (`tests/reference/README.md`).
#[allow(dead_code)]
pub fn reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/reference")
}

/// A tiny random-weight model of an architecture, built in memory, with every feature of the
/// architecture switched on where it has one: Gemma's sliding windows (small enough to really
/// cut attention off) and Gemma 2's soft-capping, Phi's partial rotary, Qwen 2's biases.
#[allow(dead_code)]
pub fn tiny(arch: Arch, seed: u64) -> Model {
    let gemma = matches!(arch, Arch::Gemma2 | Arch::Gemma3);
    let base = if gemma { 1_000_000.0 } else { 10_000.0 };
    let mut cfg = ModelConfig::plain(arch, 3, 16, (4, 2, 8), 24, 40, base, 64);
    cfg.rope_local = Rope::plain(8, 10_000.0);
    if gemma {
        cfg.sliding_window = Some(4);
        cfg.embed_scale = 4.0;
    }
    if arch == Arch::Gemma2 {
        cfg.attn_softcap = Some(0.9);
        cfg.final_softcap = Some(2.5);
        cfg.attn_scale = 1.0 / 12f32.sqrt();
    }
    if arch == Arch::Phi3 {
        cfg.rope = Rope::plain(4, 10_000.0);
        cfg.rope_local = cfg.rope.clone();
    }
    Model::random(cfg, seed).unwrap()
}

#[allow(dead_code)]
pub fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[allow(dead_code)]
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[allow(dead_code)]
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[allow(dead_code)]
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}
