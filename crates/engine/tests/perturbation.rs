//! Perturbation methods and contrastive targets on tiny random-weight models (both
//! architectures): the prefix-cache shortcut must equal a plain forward pass on the shortened
//! prompt, and a contrastive objective must equal the difference of two plain runs.

use candle_core::Tensor;
use salience_engine::model::weight::Weight;
use salience_engine::model::{Arch, Model, ModelConfig};
use salience_engine::perturbation::{self, DeletionScorer, SurrogateOptions, TargetTerm};
use salience_engine::salience::{self, IgOptions, Method, SalienceRequest};
use salience_engine::{no_progress, CancelToken};

mod common;

fn tiny(arch: Arch) -> Model {
    common::tiny(arch, 11)
}

const CONTEXT: [u32; 10] = [3, 17, 5, 29, 11, 2, 38, 21, 9, 14];
const TARGET: [u32; 3] = [6, 33, 12];
const CONTRAST: [u32; 2] = [25, 1];

/// F by a plain forward pass over the whole sequence, no cache.
fn plain_objective(model: &Model, context: &[u32], target: &[u32]) -> f32 {
    let ids: Vec<u32> = context.iter().chain(target).copied().collect();
    let e = model.embeddings(&ids).unwrap().unsqueeze(0).unwrap();
    let (f, _) =
        salience::objectives(model, &e, target, context.len(), &CancelToken::new()).unwrap();
    f[0]
}

fn without(context: &[u32], deleted: &[usize]) -> Vec<u32> {
    context
        .iter()
        .enumerate()
        .filter(|(i, _)| !deleted.contains(i))
        .map(|(_, &id)| id)
        .collect()
}

fn check_deletion_matches_plain_runs(arch: Arch) {
    let model = tiny(arch);
    let cancel = CancelToken::new();
    let terms = TargetTerm::objective(&TARGET, Some(&CONTRAST));
    let mut scorer = DeletionScorer::new(&model, &CONTEXT, terms, &cancel).unwrap();
    let full =
        plain_objective(&model, &CONTEXT, &TARGET) - plain_objective(&model, &CONTEXT, &CONTRAST);
    assert!(
        (scorer.full - full).abs() < 1e-4,
        "{} vs {full}",
        scorer.full
    );
    for deleted in [
        vec![9],
        vec![0],
        vec![0, 1, 5],
        vec![1, 2],
        vec![4, 7, 8],
        vec![5],
        vec![2, 3, 4, 5, 6, 7, 8, 9],
    ] {
        let ctx = without(&CONTEXT, &deleted);
        let want =
            plain_objective(&model, &ctx, &TARGET) - plain_objective(&model, &ctx, &CONTRAST);
        let got = scorer.without(&deleted, &cancel).unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "{arch:?} deleting {deleted:?}: {got} vs {want}"
        );
    }
    // Batched variants (same first deletion, and not) give the same F as one at a time.
    let variants = vec![
        vec![3],
        vec![3, 7],
        vec![3, 4, 9],
        vec![1],
        vec![6, 8],
        vec![9],
    ];
    let one_by_one: Vec<f32> = variants
        .iter()
        .map(|d| scorer.without(d, &cancel).unwrap())
        .collect();
    scorer.batch = 4;
    let batched = scorer.without_many(&variants, &cancel).unwrap();
    for (a, b) in one_by_one.iter().zip(&batched) {
        assert!((a - b).abs() < 1e-4, "{one_by_one:?} vs {batched:?}");
    }
    // Leave-one-out is F(full) - F(without the unit), unit by unit.
    let units = vec![vec![0], vec![1, 2], vec![3], vec![4, 5, 6], vec![7, 8, 9]];
    let loo = perturbation::leave_one_out(&mut scorer, &units, &no_progress, &cancel).unwrap();
    for (unit, delta) in units.iter().zip(&loo) {
        let ctx = without(&CONTEXT, unit);
        let want = full
            - (plain_objective(&model, &ctx, &TARGET) - plain_objective(&model, &ctx, &CONTRAST));
        assert!((delta - want).abs() < 1e-4, "{unit:?}: {delta} vs {want}");
    }
}

#[test]
fn deletion_with_a_reused_prefix_equals_a_plain_run_llama() {
    check_deletion_matches_plain_runs(Arch::Llama);
}

#[test]
fn deletion_with_a_reused_prefix_equals_a_plain_run_gemma() {
    check_deletion_matches_plain_runs(Arch::Gemma3);
}

#[test]
fn deletion_with_a_reused_prefix_equals_a_plain_run_other_architectures() {
    for arch in [Arch::Qwen2, Arch::Qwen3, Arch::Phi3, Arch::Gemma2] {
        check_deletion_matches_plain_runs(arch);
    }
}

/// The first token is deletable like any other (a raw prompt without BOS starts with a word);
/// deleting every token is refused, and the surrogate draws only masks that keep one.
#[test]
fn the_first_token_is_deletable_but_not_every_token() {
    let model = tiny(Arch::Llama);
    let cancel = CancelToken::new();
    let mut scorer = DeletionScorer::new(
        &model,
        &CONTEXT,
        TargetTerm::objective(&TARGET, None),
        &cancel,
    )
    .unwrap();
    let a = scorer.without(&[0, 1], &cancel).unwrap();
    let b = scorer.without(&[1], &cancel).unwrap();
    assert_ne!(a, b, "deleting position 0 changes F");
    let all: Vec<usize> = (0..CONTEXT.len()).collect();
    assert!(!scorer.keeps_a_token(&all));
    let err = scorer.without(&all, &cancel).unwrap_err().to_string();
    assert!(err.contains("every token before the target"), "{err}");
    // Two units covering the whole context: a quarter of the masks would delete everything.
    let units = vec![(0..5).collect::<Vec<_>>(), (5..10).collect()];
    let opts = SurrogateOptions {
        samples: 16,
        ..SurrogateOptions::default()
    };
    let (weights, report) =
        perturbation::ablation_surrogate(&mut scorer, &units, &opts, &no_progress, &cancel)
            .unwrap();
    assert_eq!(report.samples, 16);
    assert!(weights.iter().all(|w| w.is_finite()));
    // One unit covering everything: no mask can delete it, which is said, not fitted as zero.
    let err = perturbation::ablation_surrogate(&mut scorer, &[all], &opts, &no_progress, &cancel)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more segments"), "{err}");
}

/// Progress moves after every batch, not only at the end (a batch of a long prompt on a big
/// model takes seconds).
#[test]
fn leave_one_out_reports_progress_after_every_batch() {
    let model = tiny(Arch::Llama);
    let cancel = CancelToken::new();
    let terms = TargetTerm::objective(&TARGET, None);
    let mut scorer = DeletionScorer::new(&model, &CONTEXT, terms, &cancel).unwrap();
    scorer.batch = 2;
    let units: Vec<Vec<usize>> = (0..5).map(|u| vec![2 * u, 2 * u + 1]).collect();
    let seen = std::sync::Mutex::new(Vec::new());
    let progress = |p: salience_engine::Progress| {
        if let salience_engine::Progress::Perturbation { done, total } = p {
            seen.lock().unwrap().push((done, total));
        }
    };
    perturbation::leave_one_out(&mut scorer, &units, &progress, &cancel).unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen, [(0, 5), (2, 5), (4, 5), (5, 5)]);
}

#[test]
fn the_surrogate_is_reproducible_and_fits_a_model_it_can_see() {
    let model = tiny(Arch::Llama);
    let cancel = CancelToken::new();
    let units: Vec<Vec<usize>> = (1..CONTEXT.len()).map(|p| vec![p]).collect();
    let run = |seed| {
        let mut scorer = DeletionScorer::new(
            &model,
            &CONTEXT,
            TargetTerm::objective(&TARGET, None),
            &cancel,
        )
        .unwrap();
        let opts = SurrogateOptions {
            samples: 48,
            seed,
            ..SurrogateOptions::default()
        };
        let out =
            perturbation::ablation_surrogate(&mut scorer, &units, &opts, &no_progress, &cancel)
                .unwrap();
        assert_eq!(scorer.passes, 1 + 48);
        out
    };
    let (w1, r1) = run(3);
    let (w2, r2) = run(3);
    assert_eq!(w1, w2);
    assert_eq!(r1.held_out_r2, r2.held_out_r2);
    assert_eq!(w1.len(), units.len());
    assert!(r1.held_out > 0 && r1.held_out_r2.is_finite());
}

fn request(method: Method, contrast: Option<&[u32]>, target: &[u32]) -> SalienceRequest {
    let ids: Vec<u32> = CONTEXT.iter().chain(target).copied().collect();
    SalienceRequest {
        ids,
        target: CONTEXT.len()..CONTEXT.len() + target.len(),
        method,
        ig: IgOptions {
            fixed_steps: Some(6),
            ..IgOptions::default()
        },
        pad_id: Some(0),
        contrast: contrast.map(<[u32]>::to_vec),
    }
}

fn check_contrast_is_a_difference(arch: Arch) {
    let model = tiny(arch);
    let cancel = CancelToken::new();
    for method in [Method::GradDotInput, Method::IntegratedGradients] {
        let run =
            |req: SalienceRequest| salience::compute(&model, &req, &no_progress, &cancel).unwrap();
        let c = run(request(method, Some(&CONTRAST), &TARGET));
        let a = run(request(method, None, &TARGET));
        let b = run(request(method, None, &CONTRAST));
        assert!(
            (c.objective - (a.objective - b.objective)).abs() < 1e-4,
            "{method:?}: {} vs {} - {}",
            c.objective,
            a.objective,
            b.objective
        );
        assert_eq!(c.target_log_probs.len(), TARGET.len());
        assert_eq!(c.contrast_log_probs.len(), CONTRAST.len());
        let scale = a
            .scores
            .iter()
            .chain(&b.scores)
            .fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 1e-5);
        for (i, s) in c.scores.iter().enumerate() {
            let want = a.scores[i] - b.scores[i];
            assert!(
                (s - want).abs() <= 1e-4 * scale.max(1.0),
                "{method:?}[{i}]: {s} vs {want}"
            );
        }
    }
}

#[test]
fn a_contrastive_target_is_the_difference_of_two_runs_llama() {
    check_contrast_is_a_difference(Arch::Llama);
}

#[test]
fn a_contrastive_target_is_the_difference_of_two_runs_gemma() {
    check_contrast_is_a_difference(Arch::Gemma3);
}

#[test]
fn the_contrastive_gradient_matches_finite_differences() {
    let model = tiny(Arch::Llama);
    let cancel = CancelToken::new();
    let c = salience::compute(
        &model,
        &request(Method::GradDotInput, Some(&CONTRAST), &TARGET),
        &no_progress,
        &cancel,
    )
    .unwrap();
    // <dF/de_i, e_i> is the derivative of F along scaling token i's embedding by (1 + t).
    let f_scaled = |i: usize, t: f32| -> f32 {
        let mut f = 0.0;
        for (target, sign) in [(&TARGET[..], 1.0), (&CONTRAST[..], -1.0)] {
            let ids: Vec<u32> = CONTEXT.iter().chain(target).copied().collect();
            let e = model.embeddings(&ids).unwrap();
            let mut rows: Vec<Tensor> = (0..ids.len()).map(|r| e.get(r).unwrap()).collect();
            rows[i] = (&rows[i] * (1.0 + t as f64)).unwrap();
            let e = Tensor::stack(&rows, 0).unwrap().unsqueeze(0).unwrap();
            let (o, _) = salience::objectives(&model, &e, target, CONTEXT.len(), &cancel).unwrap();
            f += sign * o[0];
        }
        f
    };
    for i in [1, 4, 9] {
        let h = 1e-2;
        let numeric = (f_scaled(i, h) - f_scaled(i, -h)) / (2.0 * h);
        assert!(
            (c.scores[i] - numeric).abs() < 2e-3 + 1e-2 * numeric.abs(),
            "token {i}: {} vs {numeric}",
            c.scores[i]
        );
    }
}

#[test]
fn perturbation_methods_need_segments() {
    let model = tiny(Arch::Llama);
    let err = salience::compute(
        &model,
        &request(Method::LeaveOneOut, None, &TARGET),
        &no_progress,
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("segments"), "{err}");
}

/// A one-layer model that copies: uniform attention adds every earlier token's embedding to
/// the last position, and the tied head reads it back, so each token in the context raises its
/// own logit. The answer is known: the token the target repeats matters most.
fn copying_model() -> Model {
    let mut cfg = ModelConfig::plain(Arch::Llama, 1, 64, (1, 1, 64), 8, 40, 10_000.0, 64);
    cfg.attn_scale = 1.0 / 8.0;
    let mut m = Model::random(cfg, 5).unwrap();
    let dev = candle_core::Device::Cpu;
    let eye = Tensor::eye(64, candle_core::DType::F32, &dev).unwrap();
    let zeros = Tensor::zeros((64, 64), candle_core::DType::F32, &dev).unwrap();
    let l = &mut m.layers[0];
    l.attn_norm = Tensor::ones(64, candle_core::DType::F32, &dev).unwrap();
    // No query or key: every earlier position gets the same attention weight.
    l.w_qkv =
        Weight::dense(Tensor::cat(&[&zeros, &zeros, &(&eye * 8.0).unwrap()], 0).unwrap()).unwrap();
    l.wo = Weight::dense(eye).unwrap();
    l.w_down =
        Weight::dense(Tensor::zeros((64, 8), candle_core::DType::F32, &dev).unwrap()).unwrap();
    m.final_norm = Tensor::ones(64, candle_core::DType::F32, &dev).unwrap();
    m
}

#[test]
fn the_token_a_target_copies_ranks_first() {
    let model = copying_model();
    let cancel = CancelToken::new();
    let context = [3, 17, 5, 29, 11, 2, 38, 21, 9, 14];
    for (copied, target) in [(3usize, 29u32), (6, 38), (8, 9)] {
        let units: Vec<Vec<usize>> = (1..context.len()).map(|p| vec![p]).collect();
        let mut scorer = DeletionScorer::new(
            &model,
            &context,
            TargetTerm::objective(&[target], None),
            &cancel,
        )
        .unwrap();
        let loo = perturbation::leave_one_out(&mut scorer, &units, &no_progress, &cancel).unwrap();
        let best = (0..loo.len())
            .max_by(|&a, &b| loo[a].total_cmp(&loo[b]))
            .unwrap();
        assert_eq!(units[best], vec![copied], "leave-one-out {loo:?}");
        let opts = SurrogateOptions::default();
        let (w, _) =
            perturbation::ablation_surrogate(&mut scorer, &units, &opts, &no_progress, &cancel)
                .unwrap();
        let best = (0..w.len()).max_by(|&a, &b| w[a].total_cmp(&w[b])).unwrap();
        assert_eq!(units[best], vec![copied], "surrogate {w:?}");
    }
}
