//! Client settings (`initializationOptions`, `workspace/configuration` section
//! `promptSalience`). A prompt file's own front matter wins over these.

use salience_core::prompt_file::SalienceSettings;
use serde_json::Value;

#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    pub model: Option<String>,
    pub method: Option<String>,
    pub granularity: Option<String>,
    pub gain: Option<f32>,
    pub ig_steps: Option<usize>,
    pub max_new_tokens: Option<usize>,
    pub cache_dir: Option<String>,
    pub allow_network: Option<bool>,
    pub inlay_hints: Option<bool>,
    /// Run the faithfulness check in the background after each result (default true);
    /// otherwise only on `promptSalience.checkFaithfulness`.
    pub background_faithfulness: Option<bool>,
}

impl ClientSettings {
    /// These settings as the lowest layer for [`salience_core::options`]. A method or
    /// granularity the server does not know is logged and left unset.
    pub fn layer(&self) -> SalienceSettings {
        fn parsed<T: std::str::FromStr<Err = String>>(what: &str, v: &Option<String>) -> Option<T> {
            let text = v.as_deref()?;
            text.parse()
                .map_err(|e| tracing::warn!("client setting {what}: {e}"))
                .ok()
        }
        SalienceSettings {
            model: self.model.clone(),
            method: parsed("method", &self.method),
            granularity: parsed("granularity", &self.granularity),
            gain: self.gain,
            ig_steps: self.ig_steps,
            max_new_tokens: self.max_new_tokens,
            ..SalienceSettings::default()
        }
    }

    /// Takes the keys present in `v` (camelCase or snake_case); ignores others.
    pub fn merge_json(&mut self, v: &Value) {
        // Clients send every declared setting; null or "" means "not set".
        let get = |a: &str, b: &str| {
            v.get(a)
                .or_else(|| v.get(b))
                .filter(|x| !x.is_null() && x.as_str() != Some(""))
        };
        let s = |a, b| get(a, b).and_then(|x| x.as_str()).map(str::to_string);
        if let Some(x) = s("model", "model") {
            self.model = Some(x);
        }
        if let Some(x) = s("method", "method") {
            self.method = Some(x);
        }
        if let Some(x) = s("granularity", "granularity") {
            self.granularity = Some(x);
        }
        if let Some(x) = get("gain", "gain").and_then(Value::as_f64) {
            self.gain = Some(x as f32);
        }
        if let Some(x) = get("igSteps", "ig_steps").and_then(Value::as_u64) {
            self.ig_steps = Some(x as usize);
        }
        if let Some(x) = get("maxNewTokens", "max_new_tokens").and_then(Value::as_u64) {
            self.max_new_tokens = Some(x as usize);
        }
        if let Some(x) = s("cacheDir", "cache_dir") {
            self.cache_dir = Some(x);
        }
        if let Some(x) = get("allowNetwork", "allow_network").and_then(Value::as_bool) {
            self.allow_network = Some(x);
        }
        if let Some(x) = get("inlayHints", "inlay_hints").and_then(Value::as_bool) {
            self.inlay_hints = Some(x);
        }
        if let Some(x) =
            get("backgroundFaithfulness", "background_faithfulness").and_then(Value::as_bool)
        {
            self.background_faithfulness = Some(x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_null_values_mean_unset() {
        let mut s = ClientSettings::default();
        s.merge_json(&serde_json::json!({"model": "gemma-3-270m", "gain": 2.0}));
        s.merge_json(
            &serde_json::json!({"model": "", "method": null, "igSteps": 8, "inlayHints": true}),
        );
        assert_eq!(s.model.as_deref(), Some("gemma-3-270m"));
        assert_eq!(s.method, None);
        assert_eq!(
            (s.gain, s.ig_steps, s.inlay_hints),
            (Some(2.0), Some(8), Some(true))
        );
    }
}
