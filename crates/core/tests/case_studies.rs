//! Issue 6 end to end on the real default model: perturbation methods, contrastive targets,
//! the faithfulness check and comparisons, on the case studies in `prompts/case-studies/`.

use std::path::{Path, PathBuf};

use salience_core::analysis::{analyse, Analysis, AnalysisOptions, Target};
use salience_core::compare::align;
use salience_core::faithfulness::{self, FaithfulnessOptions, Verdict};
use salience_core::prompt_file::{self, Granularity, PromptFile};
use salience_core::segments::Segmentation;
use salience_engine::prompt::TemplateMode;
use salience_engine::salience::Method;
use salience_engine::{no_progress, CancelToken, Engine};

use salience_engine::registry::{FetchOptions, DEFAULT_MODEL};

/// The default model, fetched into the cache if missing. Never skips: no model is a failure.
fn default_engine() -> Engine {
    Engine::load_named(
        DEFAULT_MODEL,
        &FetchOptions {
            // Tests fetch the models they need (or fail): they may use the network.
            allow_network: true,
            ..FetchOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("the default model is needed and could not be fetched: {e}"))
}

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../prompts/case-studies/{name}.prompt.md"))
}

fn options(file: &PromptFile, method: Method, level: Granularity) -> AnalysisOptions {
    let mut o = AnalysisOptions::new(
        method,
        Some(file.settings.template.unwrap_or(TemplateMode::Chat)),
    );
    o.system = file.settings.system.clone();
    o.contrast = file.settings.contrast.clone();
    o.segments = Segmentation::Standard(level);
    o
}

fn run(engine: &Engine, file: &PromptFile, opts: &AnalysisOptions) -> Analysis {
    analyse(
        engine,
        file,
        &Target::Response,
        opts,
        &no_progress,
        &CancelToken::new(),
    )
    .unwrap()
}

#[test]
fn issue6_end_to_end() {
    let engine = default_engine();
    a_copied_word_ranks_first_under_leave_one_out(&engine);
    a_contrast_is_the_difference_of_two_plain_runs(&engine);
    the_case_study_maps_and_their_faithfulness(&engine);
}

/// The target copies a word of the prompt: deleting that word must cost the most.
fn a_copied_word_ranks_first_under_leave_one_out(engine: &Engine) {
    let file = prompt_file::parse(
        "The password is zebra. Please repeat the password exactly.\n<!-- response -->\nzebra\n",
    );
    // Hundreds of words one at a time would take minutes: a clear error instead.
    let long = prompt_file::parse(&format!(
        "{}\n<!-- response -->\nzebra\n",
        "one more word ".repeat(100)
    ));
    let err = analyse(
        engine,
        &long,
        &Target::Response,
        &options(&long, Method::LeaveOneOut, Granularity::Word),
        &no_progress,
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("coarser granularity"), "{err}");
    for method in [Method::LeaveOneOut, Method::AblationSurrogate] {
        let a = run(engine, &file, &options(&file, method, Granularity::Word));
        let level = a.level(&Segmentation::Standard(Granularity::Word), 1.0);
        let top = level.segments.iter().find(|s| s.rank == 1).unwrap();
        assert_eq!(&a.text[top.start..top.end], "zebra", "{method:?}");
        assert!(top.score > 1.0, "{method:?}: {}", top.score);
        let p = a.perturbation.as_ref().unwrap();
        assert_eq!(p.level, "word");
        if method == Method::AblationSurrogate {
            let s = p.surrogate.as_ref().unwrap();
            assert!(s.held_out_r2 > 0.5, "held-out R² {}", s.held_out_r2);
        }
    }
}

/// F for "A rather than B" equals ln p(A) from a file whose response is A minus ln p(B) from
/// a file whose response is B; for every method.
fn a_contrast_is_the_difference_of_two_plain_runs(engine: &Engine) {
    let text = std::fs::read_to_string(case("menu-few-shot")).unwrap();
    let file = prompt_file::parse(&text);
    assert_eq!(file.settings.contrast.as_deref(), Some("Veggie curry"));
    let b_file = prompt_file::parse(&prompt_file::write::with_response(&file, "Veggie curry"));
    let mut plain = options(&file, Method::GradDotInput, Granularity::Block);
    plain.contrast = None;
    let f_a = run(engine, &file, &plain).objective;
    let f_b = run(engine, &b_file, &plain).objective;
    for method in [Method::GradDotInput, Method::LeaveOneOut] {
        let a = run(engine, &file, &options(&file, method, Granularity::Block));
        assert!(
            (a.objective - (f_a - f_b)).abs() < 2e-3,
            "{method:?}: {} vs {f_a} - {f_b}",
            a.objective
        );
        let c = a.contrast.as_ref().unwrap();
        assert!((c.log_probs.iter().sum::<f32>() - f_b).abs() < 2e-3);
    }
    // Gradient x input with a contrast: the difference of the two plain maps.
    let with = run(
        engine,
        &file,
        &options(&file, Method::GradDotInput, Granularity::Block),
    );
    let a_map = run(engine, &file, &plain);
    let b_map = run(engine, &b_file, &plain);
    for ((w, x), y) in with.tokens.iter().zip(&a_map.tokens).zip(&b_map.tokens) {
        assert!((w.score - (x.score - y.score)).abs() < 1e-3 + 1e-3 * x.score.abs());
    }
}

fn the_case_study_maps_and_their_faithfulness(engine: &Engine) {
    let text = std::fs::read_to_string(case("menu-few-shot")).unwrap();
    let file = prompt_file::parse(&text);
    let block = Segmentation::Standard(Granularity::Block);
    let loo = run(
        engine,
        &file,
        &options(&file, Method::LeaveOneOut, Granularity::Block),
    );
    assert_eq!(
        loo.level(&block, 1.0).segments.len(),
        5,
        "instruction and four examples"
    );
    let check = |a: &Analysis, seed| {
        let opts = FaithfulnessOptions {
            seed,
            ..FaithfulnessOptions::default()
        };
        faithfulness::check(engine, a, &block, &opts, &no_progress, &CancelToken::new()).unwrap()
    };
    let f1 = check(&loo, 0);
    let f2 = check(&loo, 0);
    assert_eq!(
        serde_json::to_value(&f1).unwrap()["points"],
        serde_json::to_value(&f2).unwrap()["points"]
    );
    // Five blocks: 10 %, 20 % and 30 % delete 1, 1 and 2 blocks; one point per size, and with
    // so few blocks every possible deletion is tried (no seed involved).
    assert_eq!(
        f1.points.iter().map(|p| p.deleted).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(f1.points.iter().all(|p| p.random.exact));
    assert_eq!(f1.points[0].random.drops.len(), 5);
    assert_eq!(f1.points[1].random.drops.len(), 10);
    // Leave-one-out deletes one segment, so its top segment's drop at one deleted segment is
    // its own score, and no single deletion does better: faithful by construction.
    let top = loo
        .level(&block, 1.0)
        .segments
        .iter()
        .map(|s| s.score)
        .fold(f32::MIN, f32::max);
    let one = &f1.points[0];
    assert!(
        (one.top_drop - top).abs() < 1e-3,
        "{} vs {top}",
        one.top_drop
    );
    assert_eq!(f1.verdict, Verdict::Faithful, "{}", f1.summary());
    assert!(
        f1.reason
            .starts_with("deleting the top 1 of 5 blocks lowers F by"),
        "{}",
        f1.reason
    );
    // The same map upside down points at the wrong blocks: the test must say so.
    let mut reversed = loo.clone();
    for t in &mut reversed.tokens {
        t.score = -t.score;
    }
    let f = check(&reversed, 0);
    assert_eq!(f.verdict, Verdict::NotFaithful, "{}", f.summary());
    // Past the exact limit: random draws, whose seed matters.
    let sampled = |seed| {
        let opts = FaithfulnessOptions {
            seed,
            exact_up_to: 0,
            random_draws: 6,
            ..FaithfulnessOptions::default()
        };
        faithfulness::check(
            engine,
            &loo,
            &block,
            &opts,
            &no_progress,
            &CancelToken::new(),
        )
        .unwrap()
    };
    let (s0, s1) = (sampled(0), sampled(1));
    assert!(s0
        .points
        .iter()
        .all(|p| !p.random.exact && p.random.drops.len() == 6 && p.random.standard_error > 0.0));
    assert_ne!(
        s0.points.iter().map(|p| p.random_mean).collect::<Vec<_>>(),
        s1.points.iter().map(|p| p.random_mean).collect::<Vec<_>>(),
        "another seed draws other random segments"
    );

    // Principles first or last: the same sentences, moved; the alignment finds them all.
    let maps: Vec<(Analysis, Vec<String>)> = ["principles-first", "principles-last"]
        .iter()
        .map(|name| {
            let file = prompt_file::parse(&std::fs::read_to_string(case(name)).unwrap());
            let a = run(
                engine,
                &file,
                &options(&file, Method::GradDotInput, Granularity::Sentence),
            );
            let texts = a
                .level(&Segmentation::Standard(Granularity::Sentence), 1.0)
                .segments
                .iter()
                .map(|s| a.text[s.start..s.end].to_string())
                .collect();
            (a, texts)
        })
        .collect();
    let rows = align(&maps[0].1, &maps[1].1);
    assert_eq!(maps[0].1.len(), maps[1].1.len());
    assert!(
        rows.iter().all(|r| r.before.is_some() && r.after.is_some()),
        "{rows:?}"
    );
}
