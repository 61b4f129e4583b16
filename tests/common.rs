//! Shared by the integration tests: the default model, fetched through the project's own code.

use std::path::PathBuf;

use prompt_salience::engine::registry::{self, FetchOptions, ModelSpec, DEFAULT_MODEL};
use prompt_salience::engine::Engine;

/// The default model, fetched into the cache if missing. Never skips: no model is a failure.
#[allow(dead_code)]
pub fn default_engine() -> Engine {
    let spec = ModelSpec::parse(DEFAULT_MODEL).unwrap();
    let path = registry::resolve(&spec, &FetchOptions::default())
        .unwrap_or_else(|e| panic!("the default model is needed and could not be fetched: {e}"));
    Engine::load(&path, DEFAULT_MODEL).expect("load default model")
}

#[allow(dead_code)]
pub fn shared_dir() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.join("../../shared")
}
