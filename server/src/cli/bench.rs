//! `prompt-salience bench`: timings of salience and generation on this machine.

use std::time::{Duration, Instant};

use clap::Args;

use super::bench_baselines::{
    self, BaselineArgs, Baselines, Measured, SalienceTiming, TorchServer,
};
use super::ModelArgs;
use salience_engine::generate::GenerateOptions;
use salience_engine::machine;
use salience_engine::perturbation::{self, DeletionScorer, SurrogateOptions, TargetTerm};
use salience_engine::registry;
use salience_engine::salience::{self, Baseline, IgOptions, Method, SalienceRequest, Spacing};
use salience_engine::synthetic;
use salience_engine::{no_progress, CancelToken, Engine, EngineError};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt lengths in tokens (gradient salience). Each list may be given empty to skip it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,300,600")]
    lengths: Vec<usize>,
    /// Tokens in the explained target.
    #[arg(long, default_value_t = 20)]
    target_tokens: usize,
    /// Integrated gradients steps (fixed, zero baseline).
    #[arg(long, default_value_t = 16)]
    ig_steps: usize,
    /// Prompt lengths for integrated gradients (slow).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,300")]
    ig_lengths: Vec<usize>,
    /// Tokens to generate in the decoding benchmark (at least 2: the speed counts the tokens
    /// after the first, which the prefill produces).
    #[arg(long, default_value_t = 64, value_parser = at_least_two)]
    generate_tokens: usize,
    /// Prompt lengths for leave-one-out over 10 equal segments.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,300")]
    perturbation_lengths: Vec<usize>,
    /// Repetitions; the best time is reported.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Measure a random-weight model of a real shape instead, e.g. llama-8b-q4_k or
    /// qwen2-1.5b-q8_0 (shapes: smollm2-135m, llama-1b/3b/8b, qwen2-0.5b/1.5b/7b,
    /// qwen3-0.6b/4b, phi3-mini, gemma2-2b, gemma3-1b). The GGUF is written to the cache
    /// first, by a separate process, so that its memory does not count.
    #[arg(long, value_name = "SHAPE-TYPE")]
    synthetic: Option<String>,
    /// A Python with torch + transformers + gguf and/or llama-cpp-python: runs the same work
    /// there (`docs/bench/*_baseline.py`) after this bench and prints the ratios.
    #[arg(long, value_name = "PYTHON")]
    baseline_python: Option<std::path::PathBuf>,
    /// Measure this many times, alternating which side runs first (odd rounds prompt-salience,
    /// even rounds the baselines; PyTorch right before or after each piece of work, llama.cpp
    /// before or after the round), and print each ratio's median over the rounds.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Write the synthetic GGUF and exit (used by --synthetic).
    #[arg(long, hide = true)]
    write_synthetic_only: bool,
}

/// The engine for a synthetic model, writing its GGUF first when it is not cached.
fn synthetic_engine(spec: &str, write_only: bool) -> Result<Option<Engine>, EngineError> {
    let (shape, dtype) = synthetic::parse(spec)?;
    let path = registry::cache_dir()
        .join("synthetic")
        .join(format!("{spec}.gguf"));
    if write_only {
        synthetic::write_gguf(&shape, dtype, &path)?;
        return Ok(None);
    }
    if !path.is_file() {
        eprintln!("writing {} ...", path.display());
        let exe = std::env::current_exe().map_err(|e| EngineError::Fetch(e.to_string()))?;
        let status = std::process::Command::new(exe)
            .args(["bench", "--synthetic", spec, "--write-synthetic-only"])
            .status()
            .map_err(|e| EngineError::Fetch(format!("cannot start the writer: {e}")))?;
        if !status.success() {
            return Err(EngineError::Fetch(format!(
                "writing the synthetic model failed ({status})"
            )));
        }
    }
    let file_mib = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
    let engine = Engine::load(&path, spec)?;
    println!(
        "synthetic model {spec}: file {file_mib:.0} MiB, weights in memory {:.0} MiB ({})",
        engine.model.weight_bytes() as f64 / (1 << 20) as f64,
        engine.model.precision()
    );
    Ok(Some(engine))
}

/// The process's peak resident memory since the last `restart_peak_rss` (or its start).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Hands the memory that earlier work freed back to the kernel (the allocators keep it for
/// 10 s, see `allocator.rs`) and starts the peak over (Linux's `clear_refs` 5): each row's figure is
/// then its own work's peak from the memory still in use, as in a fresh process, not the
/// largest of everything before it (integrated gradients' batches, or an earlier round).
/// Returns whether the peak could be restarted.
fn restart_peak_rss() -> bool {
    // Each thread's mimalloc heap holds what that thread freed: the pool's workers run the
    // passes.
    rayon::broadcast(|_| crate::allocator::release_free_memory());
    crate::allocator::release_free_memory();
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

pub fn run(args: BenchArgs) -> Result<(), EngineError> {
    let engine = match &args.synthetic {
        Some(spec) => match synthetic_engine(spec, args.write_synthetic_only)? {
            Some(engine) => engine,
            None => return Ok(()),
        },
        None => args.model.load()?,
    };
    println!(
        "peak RSS after loading: {:.0} MiB",
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    let mut baseline = args.baseline_python.as_ref().map(|python| {
        Baselines::prepare(&BaselineArgs {
            python,
            gguf: &engine.path,
            lengths: &args.lengths,
            ig_lengths: &args.ig_lengths,
            ig_steps: args.ig_steps,
            target_tokens: args.target_tokens,
            generate_tokens: args.generate_tokens,
            repeat: args.repeat,
            threads: rayon::current_num_threads(),
        })
    });
    let text = "The quick brown fox jumps over the lazy dog while the committee reviews \
                the quarterly budget, and every number must add up before Friday. ";
    let pool: Vec<u32> = engine
        .tokenize_target(&text.repeat(200))?
        .iter()
        .map(|t| t.0)
        .collect();
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            println!("\n## round {round} of {}", args.rounds);
        }
        let llama_before = match &baseline {
            Some(b) if baselines_first(round) => Some(b.run_llama()),
            _ => None,
        };
        // PyTorch times each piece of work next to ours (see `bench_baselines`).
        let torch = baseline.as_mut().and_then(Baselines::torch);
        let measured = measure(&engine, &args, &pool, round, torch)?;
        let Some(b) = &mut baseline else { continue };
        let results = b.round_results(llama_before);
        let rows = bench_baselines::compare(args.ig_steps, &results, &measured);
        bench_baselines::print_round(&rows, b.threads);
        rounds.push(rows);
    }
    if rounds.len() > 1 {
        bench_baselines::print_summary(&rounds);
    }
    Ok(())
}

/// Whether `round` runs the baselines first: the even ones, so that rounds alternate.
fn baselines_first(round: u32) -> bool {
    round.is_multiple_of(2)
}

/// One round of every measurement on `engine`, printed as it goes; prompts are cut from the
/// tokens of `pool`. With `torch`, PyTorch times each salience case right after ours (odd
/// rounds) or right before (even rounds).
fn measure(
    engine: &Engine,
    args: &BenchArgs,
    pool: &[u32],
    round: u32,
    mut torch: Option<&mut TorchServer>,
) -> Result<Measured, EngineError> {
    let mut measured = Measured::default();
    let cancel = CancelToken::new();
    println!(
        "model: {}  threads: {}",
        engine.name,
        rayon::current_num_threads()
    );
    println!(
        "GFLOP/s against the multiply-add limit of {} threads with the {:?} kernel, measured before and after each row",
        rayon::current_num_threads(),
        salience_engine::model::Kernel::best()
    );
    println!(
        "| prompt tokens | method | seconds (best of {}) | first run | peak RSS MiB | GFLOP | GFLOP/s | of the limit |",
        args.repeat
    );
    let (mut highest, mut peaks_restarted) = (0f64, false);
    println!("|---|---|---|---|---|---|---|---|");
    let mut run_case = |len: usize, method: Method, steps: usize| -> Result<(), EngineError> {
        let ids: Vec<u32> = pool[..len + args.target_tokens].to_vec();
        let req = SalienceRequest {
            ids,
            target: len..len + args.target_tokens,
            method,
            ig: IgOptions {
                baseline: Baseline::Zero,
                spacing: Spacing::Uniform,
                fixed_steps: Some(steps),
                ..IgOptions::default()
            },
            pad_id: None,
            contrast: None,
        };
        let theirs = |torch: &mut Option<&mut TorchServer>| {
            if let Some(server) = torch {
                match server.time(method.name(), len) {
                    Ok(s) => eprintln!(
                        "pytorch_baseline.py: {}, {len} tokens: {s:.3} s",
                        method.name()
                    ),
                    Err(why) => eprintln!("{why}"),
                }
            }
        };
        let theirs_first = baselines_first(round);
        if theirs_first {
            theirs(&mut torch);
        }
        // The limit of this minute, measured before and after our runs; the higher of the two,
        // since a neighbour that takes the core for a moment lowers one probe, not the limit.
        let before = machine::multiply_add_limit(LIMIT_PROBE).flops_per_second;
        // The first run also faults in fresh memory for the activations, as a one-shot
        // `compute` does; later runs reuse it, as the language server does.
        let mut best = f64::INFINITY;
        let mut first = None;
        if restart_peak_rss() {
            peaks_restarted = true;
        }
        for _ in 0..args.repeat.max(1) {
            let r = salience::compute(&engine.model, &req, &no_progress, &cancel)?;
            best = best.min(r.seconds);
            first.get_or_insert(r.seconds);
        }
        let first = first.unwrap_or(best);
        let limit = before.max(machine::multiply_add_limit(LIMIT_PROBE).flops_per_second);
        let flops = salience::flops(&engine.model, &req).map(|f| f.total());
        let at_limit_seconds = flops.map(|f| f / limit);
        measured.salience.push(SalienceTiming {
            method: method.name(),
            prompt_tokens: len,
            seconds: best,
            at_limit_seconds,
        });
        let label = match method {
            Method::IntegratedGradients => format!("integrated_gradients ({steps} steps)"),
            m => m.name().to_string(),
        };
        let peak = peak_rss_mib().unwrap_or(f64::NAN);
        highest = highest.max(peak);
        let arithmetic = match flops {
            Some(f) => format!(
                "{:.1} | {:.0} | {:.0} % of {:.0} |",
                f / 1e9,
                f / best / 1e9,
                100.0 * f / best / limit,
                limit / 1e9
            ),
            None => "— | — | — |".into(),
        };
        println!("| {len} | {label} | {best:.3} | {first:.3} | {peak:.0} | {arithmetic}");
        if !theirs_first {
            theirs(&mut torch);
        }
        Ok(())
    };
    for &len in &args.lengths {
        run_case(len, Method::GradDotInput, 0)?;
    }
    for &len in &args.ig_lengths {
        run_case(len, Method::IntegratedGradients, args.ig_steps)?;
    }
    println!(
        "\nleave-one-out, 10 equal segments, {}-token target:",
        args.target_tokens
    );
    let wide = perturbation::DEFAULT_BATCH;
    println!(
        "| prompt tokens | plain forward passes | reused prefix | reused prefix + batches of {wide} |"
    );
    println!("|---|---|---|---|");
    let best_of = |f: &mut dyn FnMut() -> Result<(), EngineError>| -> Result<f64, EngineError> {
        let mut best = f64::INFINITY;
        for _ in 0..args.repeat {
            let started = Instant::now();
            f()?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let scorer = |context, target, batch| -> Result<DeletionScorer, EngineError> {
        let mut s = DeletionScorer::new(
            &engine.model,
            context,
            TargetTerm::objective(target, None),
            &cancel,
        )?;
        s.batch = batch;
        Ok(s)
    };
    let mut surrogate_rows = Vec::new();
    for &len in &args.perturbation_lengths {
        let context = &pool[..len];
        let target = &pool[len..len + args.target_tokens];
        let units: Vec<Vec<usize>> = (0..10)
            .map(|k| (1.max(k * len / 10)..(k + 1) * len / 10).collect())
            .collect();
        // The baseline: every shortened prompt run from scratch, one at a time.
        let plain = best_of(&mut || {
            for unit in &units {
                let ids: Vec<u32> = context
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !unit.contains(i))
                    .map(|(_, &id)| id)
                    .chain(target.iter().copied())
                    .collect();
                let e = engine
                    .model
                    .embeddings(&ids)
                    .and_then(|e| e.unsqueeze(0))
                    .map_err(EngineError::candle)?;
                salience::objectives(&engine.model, &e, target, ids.len() - target.len(), &cancel)
                    .map_err(EngineError::candle)?;
            }
            Ok(())
        })?;
        let with_batch = |batch: usize| {
            best_of(&mut || {
                let mut s = scorer(context, target, batch)?;
                perturbation::leave_one_out(&mut s, &units, &no_progress, &cancel)?;
                Ok(())
            })
        };
        let (reused, batched) = (with_batch(1)?, with_batch(wide)?);
        println!(
            "| {len} | {plain:.3} s | {reused:.3} s ({:.2}x) | {batched:.3} s ({:.2}x) |",
            plain / reused,
            plain / batched
        );
        surrogate_rows.push((len, units, context, target));
    }
    println!("\nablation_surrogate, 32 masks over the same segments:");
    println!("| prompt tokens | batches of 1 | batches of {wide} |");
    println!("|---|---|---|");
    for (len, units, context, target) in surrogate_rows {
        let opts = SurrogateOptions {
            samples: 32,
            ..SurrogateOptions::default()
        };
        let time = |batch: usize| {
            best_of(&mut || {
                let mut s = scorer(context, target, batch)?;
                perturbation::ablation_surrogate(&mut s, &units, &opts, &no_progress, &cancel)?;
                Ok(())
            })
        };
        let (one, batched) = (time(1)?, time(wide)?);
        println!(
            "| {len} | {one:.3} s | {batched:.3} s ({:.2}x) |",
            one / batched
        );
    }
    let prompt: Vec<u32> = pool[..100].to_vec();
    let opts = GenerateOptions {
        max_new_tokens: args.generate_tokens,
        // A fixed count, as the llama.cpp baseline decodes.
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    // Best of the repetitions, as the baseline reports; a fresh prompt each time so the prefix
    // cache does not flatter the figure.
    let mut best: Option<salience_engine::generate::Generation> = None;
    measured.prefill_seconds = f64::INFINITY;
    for attempt in 0..args.repeat.max(1) {
        // Alternating first tokens: no run, in this round or the next, starts where the last
        // one ended.
        let run = (round as usize - 1) * args.repeat.max(1) + attempt;
        let mut prompt_variant = prompt.clone();
        prompt_variant[0] = prompt_variant[1 + run % 2];
        let g = engine.generate(&prompt_variant, &opts, &no_progress, &cancel)?;
        if g.reused_prefix > 0 {
            return Err(EngineError::Compute(format!(
                "bench: the prefill reused {} cached tokens; its time would not be a prefill's",
                g.reused_prefix
            )));
        }
        measured.prefill_seconds = measured.prefill_seconds.min(g.prefill_seconds);
        if best
            .as_ref()
            .is_none_or(|b| g.tokens_per_second() > b.tokens_per_second())
        {
            best = Some(g);
        }
    }
    let g = best.expect("at least one run");
    measured.decode_tokens_per_second = g.tokens_per_second();
    println!(
        "generation: {} tokens after a 100-token prompt: prefill {:.3}s, decode {:.1} tokens/s (best of {})",
        g.ids.len(),
        measured.prefill_seconds,
        measured.decode_tokens_per_second,
        args.repeat.max(1)
    );
    let last = peak_rss_mib().unwrap_or(f64::NAN);
    if peaks_restarted {
        println!(
            "peak RSS: {:.0} MiB (the highest row; each counts from the memory in use when it began)",
            highest.max(last)
        );
    } else {
        println!("peak RSS: {last:.0} MiB");
    }
    Ok(measured)
}

/// How long each measurement of the multiply-add limit runs (before and after each row):
/// long enough for the cores' clocks to settle at their all-core speed.
const LIMIT_PROBE: Duration = Duration::from_millis(300);

/// `--generate-tokens`: a decoding speed needs a token after the first.
fn at_least_two(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 2 => Ok(n),
        Ok(n) => Err(format!(
            "{n} tokens give no decoding speed (it counts the tokens after the first): use 2 or more"
        )),
        Err(e) => Err(e.to_string()),
    }
}
