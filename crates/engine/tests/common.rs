//! Shared by the integration tests: the default model, fetched through the project's own code.

use std::path::PathBuf;

use salience_engine::model::ops::Activation;
use salience_engine::model::{Arch, Model, ModelConfig};
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

/// A tiny random-weight model of either architecture, built in memory.
#[allow(dead_code)]
pub fn tiny(arch: Arch, seed: u64) -> Model {
    let gemma = arch == Arch::Gemma3;
    let cfg = ModelConfig {
        arch,
        n_layer: 3,
        hidden: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 8,
        ffn: 24,
        vocab: 40,
        eps: 1e-5,
        rope_base: if gemma { 1_000_000.0 } else { 10_000.0 },
        rope_base_local: 10_000.0,
        // Small enough that the local layers really cut attention off.
        sliding_window: if gemma { Some(4) } else { None },
        embed_scale: if gemma { 4.0 } else { 1.0 },
        attn_scale: 1.0 / 8f32.sqrt(),
        context_length: 64,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
    };
    Model::random(cfg, seed).unwrap()
}
