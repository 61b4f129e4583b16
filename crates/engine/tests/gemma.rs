//! Gemma 3 (270M, base): loads from its four-part package, tokenizes like SentencePiece,
//! generates, and gives gradients that make sense.

use salience_engine::prompt::TemplateMode;
use salience_engine::registry::{self, FetchOptions, ModelSpec};
use salience_engine::salience::{self, IgOptions, Method, SalienceRequest};
use salience_engine::{no_progress, CancelToken, Engine};

fn gemma() -> Engine {
    let spec = ModelSpec::parse("gemma-3-270m").unwrap();
    let path = registry::resolve(
        &spec,
        &FetchOptions {
            // Tests fetch the models they need (or fail): they may use the network.
            allow_network: true,
            ..FetchOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("gemma-3-270m is needed and could not be fetched: {e}"));
    Engine::load(&path, "gemma-3-270m").expect("load gemma-3-270m")
}

fn log_prob(engine: &Engine, prompt: &str, target: &str) -> f32 {
    let p = engine.prepare(prompt, None, TemplateMode::Raw).unwrap();
    let mut ids = p.ids();
    let start = ids.len();
    ids.extend(engine.tokenize_target(target).unwrap().iter().map(|t| t.0));
    let req = SalienceRequest {
        target: start..ids.len(),
        ids,
        method: Method::GradDotInput,
        ig: IgOptions::default(),
        pad_id: None,
        contrast: None,
    };
    let r = salience::compute(&engine.model, &req, &no_progress, &CancelToken::new()).unwrap();
    assert!(r.scores.iter().all(|s| s.is_finite()));
    r.objective
}

#[test]
fn gemma3_end_to_end() {
    let engine = gemma();
    assert_eq!(engine.model.cfg.n_layer, 18);
    assert!(engine.chat_template.is_none(), "a base model: raw prompts");
    // Raw mode prepends BOS (the GGUF says add_bos) and maps words back to the text.
    let text = "The capital of France is";
    let p = engine.prepare(text, None, TemplateMode::Raw).unwrap();
    assert_eq!(p.tokens[0].id, engine.tokenizer.bos_id.unwrap());
    assert!(p.tokens[0].source.is_none());
    let words: Vec<&str> = p.tokens[1..]
        .iter()
        .map(|t| &text[t.source.clone().unwrap()])
        .collect();
    assert_eq!(words, ["The", " capital", " of", " France", " is"]);
    // Byte fallback round-trips text outside the vocabulary.
    for s in ["naïve café 東京 👩‍👩‍👧 ☕️", "  two  spaces\nand a line"] {
        let ids: Vec<u32> = engine
            .tokenize_target(s)
            .unwrap()
            .iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(engine.tokenizer.decode(&ids), s);
    }
    // The model knows its geography far better than chance.
    let paris = log_prob(&engine, text, " Paris");
    let banana = log_prob(&engine, text, " banana");
    assert!(
        paris > banana + 5.0,
        "log p(Paris) {paris} vs log p(banana) {banana}"
    );
    // Generation runs and is deterministic.
    let opts = salience_engine::generate::GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let a = engine
        .generate(&p.ids(), &opts, &no_progress, &CancelToken::new())
        .unwrap();
    let b = engine
        .generate(&p.ids(), &opts, &no_progress, &CancelToken::new())
        .unwrap();
    assert_eq!(a.ids, b.ids);
    assert_eq!(
        b.reused_prefix,
        p.tokens.len() - 1,
        "the prompt's cache is reused"
    );
    assert!(!a.text.trim().is_empty());
}
