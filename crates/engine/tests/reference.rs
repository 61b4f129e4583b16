//! Agreement with an independent PyTorch computation on the default model's weights
//! (`tests/reference/`, vendored). Its scores attribute the loss; ours attribute F = -loss, so the
//! signed methods flip sign.

mod common;

use common::{floats, ids, pearson, rel_l2};

use salience_engine::generate::GenerateOptions;
use salience_engine::prompt::TemplateMode;
use salience_engine::salience::{self, Baseline, IgOptions, Method, SalienceRequest, Spacing};
use salience_engine::{no_progress, CancelToken, Engine};
use serde_json::Value;

struct Case {
    input: Value,
    reference: Value,
}

fn load(name: &str) -> Case {
    let dir = common::reference_dir();
    let read = |f: String| -> Value {
        let text = std::fs::read_to_string(dir.join(&f))
            .unwrap_or_else(|e| panic!("reference file {f}: {e}"));
        serde_json::from_str(&text).unwrap()
    };
    Case {
        input: read(format!("{name}.json")),
        reference: read(format!("{name}.ref.json")),
    }
}

fn request(engine: &Engine, case: &Case, method: Method, ig: IgOptions) -> SalienceRequest {
    let prompt = case.input["prompt"].as_str().unwrap();
    let target = case.input["target"].as_str().unwrap();
    let prepared = engine.prepare(prompt, None, TemplateMode::Raw).unwrap();
    let mut all = prepared.ids();
    assert_eq!(all, ids(&case.reference["prompt_ids"]), "prompt token ids");
    let target_ids: Vec<u32> = engine
        .tokenize_target(target)
        .unwrap()
        .iter()
        .map(|t| t.0)
        .collect();
    assert_eq!(
        target_ids,
        ids(&case.reference["target_ids"]),
        "target token ids"
    );
    // Byte offsets agree with the reference's for every prompt token.
    for (tok, r) in prepared
        .tokens
        .iter()
        .zip(case.reference["prompt_tokens"].as_array().unwrap())
    {
        let src = tok.source.clone().expect("raw prompts map every token");
        assert_eq!(src.start as u64, r["byte_start"].as_u64().unwrap());
        assert_eq!(src.end as u64, r["byte_end"].as_u64().unwrap());
    }
    let start = all.len();
    all.extend(&target_ids);
    SalienceRequest {
        ids: all,
        target: start..start + target_ids.len(),
        method,
        ig,
        pad_id: None,
        contrast: None,
    }
}

/// The gradient methods, their key in the reference files, and the sign that turns the
/// reference's attribution of the loss into ours of F.
const GRADIENT_METHODS: [(Method, &str, f64); 2] = [
    (Method::GradL2, "grad_l2", 1.0),
    (Method::GradDotInput, "grad_dot_input", -1.0),
];

/// Our scores for a case, and F.
fn our_scores(engine: &Engine, case: &Case, method: Method) -> (Vec<f64>, f32) {
    let req = request(engine, case, method, IgOptions::default());
    let r = salience::compute(&engine.model, &req, &no_progress, &CancelToken::new()).unwrap();
    (r.scores.iter().map(|&s| s as f64).collect(), r.objective)
}

/// A reference's scores in our sign convention.
fn signed(scores: &Value, sign: f64) -> Vec<f64> {
    floats(scores).into_iter().map(|s| s * sign).collect()
}

fn check_gradient_methods(name: &str) {
    let engine = common::default_engine();
    let case = load(name);
    let loss = case.reference["loss"].as_f64().unwrap();
    for (method, key, sign) in GRADIENT_METHODS {
        let (ours, objective) = our_scores(&engine, &case, method);
        let theirs = signed(&case.reference["results"][key]["scores"], sign);
        assert_eq!(ours.len(), theirs.len());
        let (r_corr, err) = (pearson(&ours, &theirs), rel_l2(&ours, &theirs));
        eprintln!("{name} {key}: pearson {r_corr:.9}, relative L2 {err:.2e}");
        assert!(r_corr >= 0.999, "{key}: pearson {r_corr}");
        assert!(err <= 1e-3, "{key}: relative L2 {err}");
        assert!(
            ((objective as f64) + loss).abs() <= 1e-3 * loss.abs().max(1.0),
            "F {objective} vs -loss {}",
            -loss
        );
    }
}

fn check_integrated_gradients(name: &str) {
    let engine = common::default_engine();
    let case = load(name);
    let ig_ref = &case.reference["results"]["ig_extra"]["ig_midpoint_32_prompt"];
    let ig = IgOptions {
        baseline: Baseline::Zero,
        spacing: Spacing::Uniform,
        fixed_steps: Some(32),
        ..IgOptions::default()
    };
    let req = request(&engine, &case, Method::IntegratedGradients, ig);
    let r = salience::compute(&engine.model, &req, &no_progress, &CancelToken::new()).unwrap();
    let ours: Vec<f64> = r.scores.iter().map(|&s| s as f64).collect();
    let theirs: Vec<f64> = floats(&ig_ref["scores"]).into_iter().map(|s| -s).collect();
    let err = rel_l2(&ours, &theirs);
    let report = r.ig.unwrap();
    eprintln!(
        "{name} integrated gradients (32 midpoint steps, zero baseline): relative L2 {err:.2e}, completeness gap {:.3}",
        report.completeness_gap
    );
    assert_eq!(report.steps, 32);
    assert!(err <= 2e-2, "integrated gradients relative L2 {err}");
    let ref_gap = ig_ref["completeness"]["rel_error"].as_f64().unwrap().abs();
    assert!(
        (report.completeness_gap as f64 - ref_gap).abs() < 0.02,
        "gap {} vs reference {ref_gap}",
        report.completeness_gap
    );
}

fn check_greedy(name: &str) {
    let engine = common::default_engine();
    let case = load(name);
    let prompt = case.input["prompt"].as_str().unwrap();
    let want = ids(&case.input["greedy_ids"]);
    let prepared = engine.prepare(prompt, None, TemplateMode::Raw).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: want.len(),
        ..GenerateOptions::default()
    };
    let g = engine
        .generate(&prepared.ids(), &opts, &no_progress, &CancelToken::new())
        .unwrap();
    assert_eq!(
        g.ids,
        want,
        "greedy ids: got {:?}",
        engine.tokenizer.decode(&g.ids)
    );
}

/// Distance from the float64 truth (`NAME.ref64.json`): ours against PyTorch's float32
/// (`NAME.ref.json`), both measured here from the stored data.
fn check_float64_distance(name: &str) {
    let engine = common::default_engine();
    let case = load(name);
    let text = std::fs::read_to_string(common::reference_dir().join(format!("{name}.ref64.json")))
        .expect("float64 reference");
    let truth: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        ids(&truth["prompt_ids"]),
        ids(&case.reference["prompt_ids"])
    );
    for (method, key, sign) in GRADIENT_METHODS {
        let (ours, objective) = our_scores(&engine, &case, method);
        let exact = signed(&truth["results"][key]["scores"], sign);
        let torch32 = signed(&case.reference["results"][key]["scores"], sign);
        let (mine, theirs) = (rel_l2(&ours, &exact), rel_l2(&torch32, &exact));
        eprintln!(
            "{name}: F {objective} vs float64 {} (PyTorch float32 {})",
            -truth["loss"].as_f64().unwrap(),
            -case.reference["loss"].as_f64().unwrap()
        );
        eprintln!(
            "{name} {key}: relative L2 to float64: ours {mine:.2e}, PyTorch float32 {theirs:.2e} ({:.1}x)",
            mine / theirs
        );
        assert!(
            mine <= 2.0 * theirs,
            "{key}: {mine:.2e} from float64, more than twice PyTorch float32's {theirs:.2e}"
        );
    }
}

#[test]
fn few_shot_classification_is_as_close_to_float64_as_pytorch() {
    check_float64_distance("few_shot_classification");
}

#[test]
fn non_ascii_is_as_close_to_float64_as_pytorch() {
    check_float64_distance("non_ascii");
}

#[test]
fn few_shot_classification_gradients() {
    check_gradient_methods("few_shot_classification");
}

#[test]
fn non_ascii_gradients() {
    check_gradient_methods("non_ascii");
}

#[test]
fn few_shot_classification_integrated_gradients() {
    check_integrated_gradients("few_shot_classification");
}

#[test]
fn non_ascii_integrated_gradients() {
    check_integrated_gradients("non_ascii");
}

#[test]
fn few_shot_classification_greedy() {
    check_greedy("few_shot_classification");
}

#[test]
fn non_ascii_greedy() {
    check_greedy("non_ascii");
}

/// The default integrated-gradients settings (mean baseline, adaptive pieces) must close the
/// completeness gap to 5 % within 64 gradient evaluations on the reference prompts.
fn check_default_integrated_gradients(name: &str) {
    let engine = common::default_engine();
    let case = load(name);
    let req = request(
        &engine,
        &case,
        Method::IntegratedGradients,
        IgOptions::default(),
    );
    let r = salience::compute(&engine.model, &req, &no_progress, &CancelToken::new()).unwrap();
    let report = r.ig.unwrap();
    eprintln!(
        "{name} integrated gradients (defaults): {} gradients, completeness gap {:.4}",
        report.steps, report.completeness_gap
    );
    assert!(report.adaptive && report.steps <= 64, "{report:?}");
    assert!(report.completeness_gap <= 0.05, "{report:?}");
    let sum: f32 = r.scores.iter().sum();
    assert!((sum - report.attribution_sum).abs() < 1e-3 * sum.abs().max(1.0));
}

#[test]
fn few_shot_classification_default_integrated_gradients_are_complete() {
    check_default_integrated_gradients("few_shot_classification");
}

#[test]
fn non_ascii_default_integrated_gradients_are_complete() {
    check_default_integrated_gradients("non_ascii");
}

/// The default model's weights stay Q4_1 in memory; its scores agree with the same model
/// dequantized to f32, and no f32 copy of the matrices is ever made.
#[test]
fn quantized_weights_score_like_the_dequantized_model() {
    let engine = common::default_engine();
    let file_bytes = std::fs::metadata(common::default_engine_path())
        .unwrap()
        .len() as f64;
    let kept = engine.model.weight_bytes() as f64;
    assert!(
        kept < 1.05 * file_bytes,
        "weights take {kept} bytes in memory, the file {file_bytes}"
    );
    assert!(
        !engine.model.precision().contains("f32"),
        "{}",
        engine.model.precision()
    );
    let plain = engine.model.dequantized().unwrap();
    assert!(
        plain.weight_bytes() as f64 > 4.0 * kept,
        "the reference is really f32"
    );
    let case = load("few_shot_classification");
    for method in [Method::GradL2, Method::GradDotInput] {
        let req = request(&engine, &case, method, IgOptions::default());
        let cancel = CancelToken::new();
        let q = salience::compute(&engine.model, &req, &no_progress, &cancel).unwrap();
        let f = salience::compute(&plain, &req, &no_progress, &cancel).unwrap();
        let a: Vec<f64> = q.scores.iter().map(|&s| s as f64).collect();
        let b: Vec<f64> = f.scores.iter().map(|&s| s as f64).collect();
        let (r, err) = (pearson(&a, &b), rel_l2(&a, &b));
        eprintln!("{method:?}: quantized vs dequantized pearson {r:.9}, relative L2 {err:.2e}");
        assert!(
            r >= 0.999 && err <= 1e-4,
            "{method:?}: pearson {r}, relative L2 {err}"
        );
        assert!((q.objective - f.objective).abs() <= 1e-4 * f.objective.abs().max(1.0));
    }
}
