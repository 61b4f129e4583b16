//! Every architecture against float64 PyTorch: tiny random-weight models that `transformers`
//! built from a config, stored as Hugging Face directories and as GGUF files with their
//! reference scores (`tests/fixtures/`, made by `tests/fixtures/make_models.py`; only the data
//! is read here).

mod common;

use common::{floats, ids, pearson, rel_l2};

use std::path::{Path, PathBuf};

use salience_engine::prompt::TemplateMode;
use salience_engine::salience::{self, IgOptions, Method, SalienceRequest};
use salience_engine::{no_progress, CancelToken, Engine};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Tolerances against float64: the issue's, for exact weights; looser for quantized files,
/// whose weights are not the reference's.
struct Tolerance {
    pearson: f64,
    rel_l2: f64,
    objective: f64,
}

const EXACT: Tolerance = Tolerance {
    pearson: 0.999,
    rel_l2: 1e-3,
    objective: 1e-4,
};

/// Checks one loaded model against a reference file, every case: token ids and offsets,
/// objective, grad_l2, grad_dot_input, and logits at a few positions.
fn check(what: &str, engine: &Engine, reference: &Value, tol: &Tolerance) {
    for case in reference["cases"].as_array().unwrap() {
        let name = format!("{what} / {}", case["name"].as_str().unwrap());
        let prompt = case["prompt"].as_str().unwrap();
        let target = case["target"].as_str().unwrap();
        let prepared = engine.prepare(prompt, None, TemplateMode::Raw).unwrap();
        assert_eq!(
            prepared.ids(),
            ids(&case["prompt_ids"]),
            "{name}: prompt ids"
        );
        for (tok, want) in prepared
            .tokens
            .iter()
            .zip(case["prompt_tokens"].as_array().unwrap())
        {
            let (s, e) = (
                want["start"].as_u64().unwrap() as usize,
                want["end"].as_u64().unwrap() as usize,
            );
            let want_range = (s < e).then_some(s..e);
            assert_eq!(
                tok.source, want_range,
                "{name}: offsets of token {}",
                tok.id
            );
        }
        let target_ids: Vec<u32> = engine
            .tokenize_target(target)
            .unwrap()
            .iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(target_ids, ids(&case["target_ids"]), "{name}: target ids");
        let mut all = prepared.ids();
        let start = all.len();
        all.extend(&target_ids);
        let objective_ref = case["objective"].as_f64().unwrap();
        for (method, key) in [
            (Method::GradL2, "grad_l2"),
            (Method::GradDotInput, "grad_dot_input"),
        ] {
            let req = SalienceRequest {
                ids: all.clone(),
                target: start..all.len(),
                method,
                ig: IgOptions::default(),
                pad_id: None,
                contrast: None,
            };
            let r =
                salience::compute(&engine.model, &req, &no_progress, &CancelToken::new()).unwrap();
            let ours: Vec<f64> = r.scores.iter().map(|&x| x as f64).collect();
            let theirs = floats(&case[key]);
            let (p, e) = (pearson(&ours, &theirs), rel_l2(&ours, &theirs));
            eprintln!("{name} {key}: pearson {p:.7}, relative L2 {e:.2e}");
            assert!(p >= tol.pearson, "{name} {key}: pearson {p}");
            assert!(e <= tol.rel_l2, "{name} {key}: relative L2 {e}");
            let d = (r.objective as f64 - objective_ref).abs() / objective_ref.abs().max(1.0);
            assert!(
                d <= tol.objective,
                "{name}: objective {} vs {objective_ref}",
                r.objective
            );
        }
        // Logits at a few positions, through the forward pass alone.
        let logits = &case["logits"];
        let e = engine.model.embeddings(&all).unwrap();
        let x = (e * engine.model.cfg.embed_scale as f64)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let tape = engine
            .model
            .forward_embeds_only(&x, &mut || Ok(()))
            .unwrap();
        for (pos, want) in logits["positions"]
            .as_array()
            .unwrap()
            .iter()
            .zip(logits["values"].as_array().unwrap())
        {
            let pos = pos.as_u64().unwrap() as usize;
            let h = tape.last_hidden.narrow(0, pos, 1).unwrap();
            let normed = salience_engine::model::kernels::rms_norm(
                &h,
                &engine.model.final_norm,
                engine.model.cfg.eps,
            )
            .unwrap();
            let ours: Vec<f64> = engine
                .model
                .logits(&normed)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            let theirs = floats(want);
            assert_eq!(ours.len(), theirs.len(), "{name}: vocabulary");
            let err = rel_l2(&ours, &theirs);
            assert!(
                err <= tol.rel_l2,
                "{name}: logits at {pos}: relative L2 {err}"
            );
        }
    }
}

fn check_directory_and_gguf(name: &str) {
    let dir = fixtures().join(name);
    let reference = read_json(&dir.join("reference.json"));
    let engine = Engine::load(&dir, name).unwrap_or_else(|e| panic!("{name} directory: {e}"));
    check(&format!("{name} (directory)"), &engine, &reference, &EXACT);
    let gguf = fixtures().join(format!("{name}.gguf"));
    // Where llama.cpp's format cannot say what the directory says (Gemma 2's query scalar),
    // the GGUF has its own reference, computed as llama.cpp reads the file.
    let own = fixtures().join(format!("{name}.gguf-reference.json"));
    let gguf_reference = if own.is_file() {
        read_json(&own)
    } else {
        reference
    };
    let engine = Engine::load(&gguf, name).unwrap_or_else(|e| panic!("{name}.gguf: {e}"));
    check(&format!("{name} (gguf)"), &engine, &gguf_reference, &EXACT);
}

#[test]
fn llama3_with_rope_scaling() {
    check_directory_and_gguf("llama3");
}

#[test]
fn mistral_sharded() {
    check_directory_and_gguf("mistral");
}

#[test]
fn qwen2_with_biases() {
    check_directory_and_gguf("qwen2");
}

#[test]
fn qwen3_with_qk_norms() {
    check_directory_and_gguf("qwen3");
}

#[test]
fn phi3_with_partial_rotary() {
    check_directory_and_gguf("phi3");
}

#[test]
fn gemma2_with_soft_capping() {
    check_directory_and_gguf("gemma2");
}

#[test]
fn gemma3_from_a_directory() {
    check_directory_and_gguf("gemma3");
}

/// A Q8_0 file keeps its blocks in memory, and scores like its own f32 dequantization.
#[test]
fn a_q8_0_file_stays_quantized_and_close_to_float64() {
    let path = fixtures().join("llama3.q8_0.gguf");
    let engine = Engine::load(&path, "llama3-q8_0").unwrap();
    assert!(
        engine.model.precision().contains("q8_0"),
        "{}",
        engine.model.precision()
    );
    let reference = read_json(&fixtures().join("llama3/reference.json"));
    // Against float64 of the unquantized weights: 8-bit weights move scores a little.
    let loose = Tolerance {
        pearson: 0.99,
        rel_l2: 0.1,
        objective: 0.02,
    };
    check("llama3 (q8_0 gguf)", &engine, &reference, &loose);
}

/// SmolLM3 is Llama with some layers unrotated: the llama3 fixture relabelled as SmolLM3 with
/// every layer rotated must match its reference exactly, and with a layer unrotated must not.
#[test]
fn smollm3_reads_which_layers_are_rotated() {
    let src = fixtures().join("llama3");
    let dir = std::env::temp_dir().join(format!("ps-smollm3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let reference = read_json(&src.join("reference.json"));
    let mut config = read_json(&src.join("config.json"));
    config["model_type"] = "smollm3".into();
    let objective = |config: &Value| -> f64 {
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let engine = Engine::load(&dir, "smollm3").unwrap();
        assert_eq!(engine.model.cfg.arch, salience_engine::model::Arch::SmolLM3);
        let case = &reference["cases"][0];
        let mut all = ids(&case["prompt_ids"]);
        let start = all.len();
        all.extend(ids(&case["target_ids"]));
        let req = SalienceRequest {
            ids: all.clone(),
            target: start..all.len(),
            method: Method::GradL2,
            ig: IgOptions::default(),
            pad_id: None,
            contrast: None,
        };
        salience::compute(&engine.model, &req, &no_progress, &CancelToken::new())
            .unwrap()
            .objective as f64
    };
    let want = reference["cases"][0]["objective"].as_f64().unwrap();
    config["no_rope_layers"] = serde_json::json!([1, 1]);
    assert!((objective(&config) - want).abs() <= 1e-4 * want.abs());
    config["no_rope_layers"] = serde_json::json!([1, 0]);
    assert!((objective(&config) - want).abs() > 1e-3 * want.abs());
    std::fs::remove_dir_all(&dir).unwrap();
}
