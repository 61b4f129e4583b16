//! Salience gradients against finite differences on tiny random-weight models of every
//! architecture, built in memory.

use candle_core::{DType, Device, Tensor};
use salience_engine::model::{Arch, Model};
use salience_engine::salience::{
    self, gradients, Baseline, IgOptions, Method, SalienceRequest, Spacing,
};
use salience_engine::{no_progress, CancelToken};

mod common;

fn tiny(arch: Arch) -> Model {
    common::tiny(arch, 7)
}

const IDS: [u32; 9] = [3, 17, 5, 29, 11, 2, 38, 21, 9];
const TARGET: std::ops::Range<usize> = 6..9;

fn objective(model: &Model, embeds: &[f32]) -> f64 {
    let t = TARGET.end;
    let e = Tensor::from_vec(embeds.to_vec(), (1, t, model.cfg.hidden), &Device::Cpu).unwrap();
    let g = gradients(model, &e, &IDS[TARGET], TARGET.start, &CancelToken::new()).unwrap();
    g.objective[0] as f64
}

/// dF/de by central differences, for the scored positions (before the target).
fn numeric_gradient(model: &Model, embeds: &[f32], step: f32) -> Vec<f32> {
    let h = model.cfg.hidden;
    (0..TARGET.start * h)
        .map(|i| {
            let mut p = embeds.to_vec();
            p[i] += step;
            let mut m = embeds.to_vec();
            m[i] -= step;
            ((objective(model, &p) - objective(model, &m)) / (2.0 * step as f64)) as f32
        })
        .collect()
}

fn embeds(model: &Model) -> Vec<f32> {
    model
        .embeddings(&IDS[..TARGET.end])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A request for IDS with TARGET as the target.
fn request(method: Method, ig: IgOptions, contrast: Option<Vec<u32>>) -> SalienceRequest {
    SalienceRequest {
        ids: IDS.to_vec(),
        target: TARGET,
        method,
        ig,
        pad_id: Some(0),
        contrast,
    }
}

fn scores(model: &Model, method: Method, ig: IgOptions) -> salience::SalienceResult {
    let req = request(method, ig, None);
    salience::compute(model, &req, &no_progress, &CancelToken::new()).unwrap()
}

fn assert_close(what: &str, ours: &[f32], numeric: &[f32], tol: f32) {
    let scale = numeric.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
    assert!(scale > 1e-4, "{what}: the numeric gradient is degenerate");
    for (i, (a, b)) in ours.iter().zip(numeric).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}[{i}]: analytic {a} vs numeric {b} (scale {scale})"
        );
    }
}

fn check_gradient_methods(arch: Arch) {
    let model = tiny(arch);
    let e = embeds(&model);
    let num = numeric_gradient(&model, &e, 1e-2);
    let h = model.cfg.hidden;
    let l2: Vec<f32> = num
        .chunks(h)
        .map(|g| g.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let dot: Vec<f32> = num
        .chunks(h)
        .zip(e.chunks(h))
        .map(|(g, x)| g.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect();
    let r = scores(&model, Method::GradL2, IgOptions::default());
    assert_close(&format!("{arch:?} grad_l2"), &r.scores, &l2, 2e-3);
    let r = scores(&model, Method::GradDotInput, IgOptions::default());
    assert_close(&format!("{arch:?} grad_dot_input"), &r.scores, &dot, 2e-3);
    // F itself: log-probs are negative and sum over the target tokens.
    assert!((r.objective as f64 - objective(&model, &e)).abs() < 1e-5);
    assert!(r.target_log_probs.iter().all(|&lp| lp < 0.0));
}

fn check_integrated_gradients(arch: Arch) {
    let model = tiny(arch);
    let e = embeds(&model);
    let h = model.cfg.hidden;
    let steps = 4;
    // IG from numeric gradients at the same midpoints, zero baseline on scored positions.
    let mut ig = vec![0f32; TARGET.start];
    for k in 0..steps {
        let alpha = (k as f32 + 0.5) / steps as f32;
        let point: Vec<f32> = e
            .iter()
            .enumerate()
            .map(|(i, &x)| if i < TARGET.start * h { x * alpha } else { x })
            .collect();
        // Near the zero baseline RMSNorm makes F steep: a smaller step.
        let g = numeric_gradient(&model, &point, 2e-3);
        for (pos, score) in ig.iter_mut().enumerate() {
            let s: f32 = (0..h).map(|d| g[pos * h + d] * e[pos * h + d]).sum();
            *score += s / steps as f32;
        }
    }
    let opts = IgOptions {
        baseline: Baseline::Zero,
        spacing: Spacing::Uniform,
        fixed_steps: Some(steps),
        batch: Some(3),
        ..IgOptions::default()
    };
    let r = scores(&model, Method::IntegratedGradients, opts);
    assert_close(
        &format!("{arch:?} integrated_gradients"),
        &r.scores,
        &ig,
        2e-3,
    );
    assert_eq!(r.ig.unwrap().steps, steps);
}

#[test]
fn llama_gradients_match_finite_differences() {
    check_gradient_methods(Arch::Llama);
}

#[test]
fn gemma3_gradients_match_finite_differences() {
    check_gradient_methods(Arch::Gemma3);
}

#[test]
fn smollm3_gradients_match_finite_differences() {
    check_gradient_methods(Arch::SmolLM3);
}

#[test]
fn qwen2_gradients_match_finite_differences() {
    check_gradient_methods(Arch::Qwen2);
}

#[test]
fn qwen3_gradients_match_finite_differences() {
    check_gradient_methods(Arch::Qwen3);
}

#[test]
fn phi3_gradients_match_finite_differences() {
    check_gradient_methods(Arch::Phi3);
}

#[test]
fn gemma2_gradients_match_finite_differences() {
    check_gradient_methods(Arch::Gemma2);
}

#[test]
fn llama_integrated_gradients_match_finite_differences() {
    check_integrated_gradients(Arch::Llama);
}

#[test]
fn gemma3_integrated_gradients_match_finite_differences() {
    check_integrated_gradients(Arch::Gemma3);
}

#[test]
fn integrated_gradients_completeness_improves_with_steps() {
    let model = tiny(Arch::Llama);
    let run = |steps| {
        let opts = IgOptions {
            baseline: Baseline::Mean,
            fixed_steps: Some(steps),
            ..IgOptions::default()
        };
        scores(&model, Method::IntegratedGradients, opts)
            .ig
            .unwrap()
            .completeness_gap
    };
    let (coarse, fine) = (run(2), run(64));
    assert!(fine < 0.01, "64 steps leave a gap of {fine}");
    assert!(fine <= coarse, "{fine} > {coarse}");
}

#[test]
fn adaptive_integrated_gradients_stop_at_tolerance_or_cap() {
    let model = tiny(Arch::Gemma3);
    let opts = IgOptions {
        baseline: Baseline::Pad,
        initial_steps: 2,
        max_steps: 64,
        tolerance: 0.02,
        ..IgOptions::default()
    };
    let report = scores(&model, Method::IntegratedGradients, opts.clone())
        .ig
        .unwrap();
    // Refining where the midpoint estimate misses the exact F(b) - F(a) closes the gap well
    // within the budget on a smooth model.
    assert!(report.adaptive, "{report:?}");
    assert!(
        report.completeness_gap <= 0.02 && report.steps <= 64,
        "{report:?}"
    );
    // Stopping before the cap, the progress still ends at 100 %.
    let seen = std::sync::Mutex::new(Vec::new());
    let record = |p: salience_engine::Progress| {
        if let salience_engine::Progress::IntegratedGradients { step, steps } = p {
            seen.lock().unwrap().push((step, steps));
        }
    };
    let req = request(Method::IntegratedGradients, opts, None);
    salience::compute(&model, &req, &record, &CancelToken::new()).unwrap();
    let seen = seen.into_inner().unwrap();
    let (step, steps) = *seen.last().expect("progress reported");
    assert!(report.steps < 64, "the cap was not reached: {report:?}");
    assert_eq!((step, steps), (report.steps, report.steps), "{seen:?}");
}

#[test]
fn kv_cache_decoding_matches_the_full_forward() {
    for arch in Arch::ALL {
        let model = tiny(arch);
        // Full forward over all tokens: logits of the last position.
        let e = scaled_embeddings(&model);
        let tape = model.forward_embeds(&e, &mut || Ok(())).unwrap();
        let logits_at = |pos: usize| -> Vec<f32> {
            let h = tape.last_hidden.narrow(0, pos, 1).unwrap();
            let normed =
                salience_engine::model::kernels::rms_norm(&h, &model.final_norm, model.cfg.eps)
                    .unwrap();
            model
                .logits(&normed)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let full = logits_at(IDS.len() - 1);
        // Cached: a prefix (whose last layer computes its last position only), then one token
        // at a time.
        let mut cache = Default::default();
        let prefix = model.forward_cached(&IDS[..4], &mut cache).unwrap();
        let prefix: Vec<f32> = model
            .logits(&prefix)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in logits_at(3).iter().zip(&prefix) {
            assert!((a - b).abs() < 1e-4, "{arch:?}, prefix: {a} vs {b}");
        }
        let mut h = None;
        for &id in &IDS[4..] {
            h = Some(model.forward_cached(&[id], &mut cache).unwrap());
        }
        let cached: Vec<f32> = model
            .logits(&h.unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in full.iter().zip(&cached) {
            assert!((a - b).abs() < 1e-4, "{arch:?}: {a} vs {b}");
        }
    }
}

#[test]
fn invalid_targets_are_errors() {
    let model = tiny(Arch::Llama);
    for target in [0..3, 5..5, 7..12] {
        let req = SalienceRequest {
            ids: IDS.to_vec(),
            target: target.clone(),
            method: Method::GradL2,
            ig: IgOptions::default(),
            pad_id: None,
            contrast: None,
        };
        assert!(
            salience::compute(&model, &req, &no_progress, &CancelToken::new()).is_err(),
            "{target:?}"
        );
    }
}

#[test]
fn cancellation_stops_the_computation() {
    let model = tiny(Arch::Llama);
    let cancel = CancelToken::new();
    cancel.cancel();
    let req = SalienceRequest {
        ids: IDS.to_vec(),
        target: TARGET,
        method: Method::GradL2,
        ig: IgOptions::default(),
        pad_id: None,
        contrast: None,
    };
    let err = salience::compute(&model, &req, &no_progress, &cancel).unwrap_err();
    assert!(
        matches!(err, salience_engine::EngineError::Cancelled),
        "{err}"
    );
}

/// Layers recomputed in the backward pass (checkpointing), whole or only their MLP
/// projections, give the same gradients as layers whose activations were kept.
#[test]
fn recomputed_layers_give_the_same_gradients() {
    for arch in Arch::ALL {
        let model = tiny(arch);
        let e = scaled_embeddings(&model);
        let g_out = Tensor::randn(0f32, 1.0, (IDS.len(), model.cfg.hidden), &Device::Cpu).unwrap();
        let grad = |budget: usize| {
            let tape = model
                .forward_embeds_within(&e, budget, &mut || Ok(()))
                .unwrap();
            model.backward(tape, g_out.clone(), &mut || Ok(())).unwrap()
        };
        let kept: Vec<f32> = grad(usize::MAX).flatten_all().unwrap().to_vec1().unwrap();
        let one_layer = model.layer_tape_bytes(1, IDS.len());
        // Every layer without its MLP projections, and one layer whole.
        let mlp = IDS.len() * 2 * model.cfg.ffn * 4;
        let lean = model.cfg.n_layer * (one_layer - mlp) + mlp;
        for budget in [0, one_layer, lean] {
            let recomputed: Vec<f32> = grad(budget).flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(kept, recomputed, "{arch:?}, budget {budget}");
        }
    }
}

/// A pass whose last layer computes outputs only for the last positions (the scored ones)
/// gives the same input gradient as the full pass with the gradient of the other outputs 0,
/// with the last layer kept or recomputed.
#[test]
fn a_last_layer_trimmed_to_the_scored_positions_gives_the_same_gradients() {
    let from = 3;
    for arch in Arch::ALL {
        let model = tiny(arch);
        let e = scaled_embeddings(&model);
        let (t, hidden) = (IDS.len(), model.cfg.hidden);
        let g_suffix = Tensor::randn(0f32, 1.0, (t - from, hidden), &Device::Cpu).unwrap();
        let g_full = Tensor::cat(
            &[
                &Tensor::zeros((from, hidden), DType::F32, &Device::Cpu).unwrap(),
                &g_suffix,
            ],
            0,
        )
        .unwrap();
        let full_tape = model
            .forward_embeds_recording(&e, Some(usize::MAX), 0, &mut || Ok(()))
            .unwrap();
        let full_last = full_tape.last_hidden.clone();
        let want: Vec<f32> = model
            .backward(full_tape, g_full, &mut || Ok(()))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for budget in [usize::MAX, 0] {
            let tape = model
                .forward_embeds_recording(&e, Some(budget), from, &mut || Ok(()))
                .unwrap();
            let last_full = full_last.narrow(0, from, t - from).unwrap();
            let d = (&tape.last_hidden - &last_full)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "{arch:?}: outputs differ by {d}");
            let got: Vec<f32> = model
                .backward(tape, g_suffix.clone(), &mut || Ok(()))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-5 * scale,
                "{arch:?}, budget {budget}: gradients differ by {worst} of {scale}"
            );
        }
    }
}

/// The embeddings of `IDS` as the first layer takes them: scaled, one sequence.
fn scaled_embeddings(model: &Model) -> Tensor {
    (model.embeddings(&IDS).unwrap() * model.cfg.embed_scale as f64)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Integrated gradients compute F at the zero baseline from the target's positions alone
/// where a model keeps zeros at zero (no biases): the same value as a forward pass over the
/// whole zero context, for every architecture (Qwen 2's biases take the full pass).
#[test]
fn the_objective_at_the_zero_baseline_matches_a_full_forward_pass() {
    for arch in Arch::ALL {
        let model = tiny(arch);
        assert_eq!(model.keeps_zeros(), arch != Arch::Qwen2, "{arch:?}");
        let opts = IgOptions {
            baseline: Baseline::Zero,
            spacing: Spacing::Uniform,
            fixed_steps: Some(1),
            ..IgOptions::default()
        };
        let r = scores(&model, Method::IntegratedGradients, opts.clone());
        let got =
            r.ig.expect("an integrated-gradients report")
                .objective_at_baseline as f64;
        let mut zero_context = embeds(&model);
        zero_context[..TARGET.start * model.cfg.hidden].fill(0.0);
        let want = objective(&model, &zero_context);
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{arch:?}: F at the zero baseline {got}, a full forward pass {want}"
        );
        // And F at the input is still the input's.
        assert!((r.objective as f64 - objective(&model, &embeds(&model))).abs() < 1e-5);

        // With a contrastive alternative B, F = ln p(A) - ln p(B), each term from its own
        // target positions.
        let alternative = [12u32, 33, 7, 1];
        let req = request(
            Method::IntegratedGradients,
            opts,
            Some(alternative.to_vec()),
        );
        let r = salience::compute(&model, &req, &no_progress, &CancelToken::new()).unwrap();
        let got =
            r.ig.expect("an integrated-gradients report")
                .objective_at_baseline as f64;
        let zero_context_then = |after: &[u32]| {
            let h = model.cfg.hidden;
            let zeros = Tensor::zeros((TARGET.start, h), DType::F32, &Device::Cpu).unwrap();
            let rest = model.embeddings(after).unwrap();
            let e = Tensor::cat(&[zeros, rest], 0)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let g = gradients(&model, &e, after, TARGET.start, &CancelToken::new()).unwrap();
            g.objective[0] as f64
        };
        let want = zero_context_then(&IDS[TARGET]) - zero_context_then(&alternative);
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "{arch:?} with an alternative: F at the zero baseline {got}, full passes {want}"
        );
    }
}
