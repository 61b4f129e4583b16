//! `prompt-salience compute FILE` and `prompt-salience generate FILE`.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::{stderr_progress, GenerationArgs, ModelArgs};
use crate::analysis::{analyse, Analysis, AnalysisOptions, Target};
use crate::engine::perturbation::SurrogateOptions;
use crate::engine::salience::{Baseline, IgOptions, Method};
use crate::engine::{CancelToken, Engine, EngineError};
use crate::faithfulness::{self, Faithfulness, FaithfulnessOptions};
use crate::prompt_file::{self, write, Granularity, PromptFile};
use crate::report;
use crate::segments::Level;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Terminal,
    Json,
    Html,
}

/// How to analyse a prompt file: shared by `compute` and `compare`.
#[derive(Args, Clone)]
pub struct AnalysisArgs {
    /// Target: this text (first found in the response, else in the prompt).
    #[arg(long, group = "target_choice")]
    target: Option<String>,
    /// Target: a byte range of the file, A..B.
    #[arg(long, group = "target_choice")]
    target_bytes: Option<String>,
    /// Target: lines L1..L2 of the file (1-based, inclusive).
    #[arg(long, group = "target_choice")]
    target_lines: Option<String>,
    /// Contrastive target: explain why the target rather than this alternative
    /// (F = ln p(target) - ln p(alternative)). Default: the file's `salience.contrast`.
    #[arg(long, conflicts_with = "no_contrast")]
    contrast: Option<String>,
    /// Ignore the file's `salience.contrast`: explain the target alone.
    #[arg(long)]
    no_contrast: bool,
    /// grad_l2, grad_dot_input, integrated_gradients, leave_one_out, ablation_surrogate
    /// (default: the file's `salience.method`, else grad_dot_input)
    #[arg(long)]
    method: Option<Method>,
    /// Report level, and the segments perturbation methods and the faithfulness check delete
    /// (default: the file's `salience.granularity`, else sentence)
    #[arg(long)]
    granularity: Option<Granularity>,
    /// Custom segment separators, a regex (overrides --granularity).
    #[arg(long)]
    separators: Option<String>,
    /// Display contrast: gamma of 1 - (1 - |s|/max)^gamma (default: the file's, else 1).
    #[arg(long)]
    gain: Option<f32>,
    /// Integrated gradients: fixed steps (default: adaptive).
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    baseline: Option<Baseline>,
    /// ablation_surrogate: random ablation masks (default: the file's `salience.samples`, else 64).
    #[arg(long)]
    samples: Option<usize>,
    /// Skip the faithfulness (deletion) check that comes with every report.
    #[arg(long)]
    no_faithfulness: bool,
    /// Faithfulness check: random deletions per fraction.
    #[arg(long, default_value_t = 5)]
    draws: usize,
    /// Seed of the ablation masks and of the faithfulness check's random deletions.
    #[arg(long, default_value_t = 0)]
    perturbation_seed: u64,
}

#[derive(Args)]
pub struct ComputeArgs {
    /// The .prompt.md file.
    file: PathBuf,
    #[command(flatten)]
    analysis: AnalysisArgs,
    #[arg(long, value_enum, default_value = "terminal")]
    format: Format,
    /// Write the report here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// When the file has no response, write the generated one into it.
    #[arg(long)]
    write: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    generation: GenerationArgs,
}

/// One prompt file analysed: the map, the level it is shown at, and its faithfulness check.
pub struct FileRun {
    pub analysis: Analysis,
    pub faithfulness: Option<Faithfulness>,
    pub selected: Level,
    pub custom: Option<Level>,
    pub gain: f32,
}

pub fn read(path: &Path) -> Result<(PromptFile, Vec<u8>), EngineError> {
    let (file, bytes) =
        prompt_file::read(path).map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    for p in &file.problems {
        eprintln!(
            "{}:{}:{}: warning: {}",
            path.display(),
            p.line,
            p.column,
            p.message
        );
    }
    Ok((file, bytes))
}

fn parse_range(s: &str) -> Option<(usize, usize)> {
    let (a, b) = s.split_once("..")?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

fn target(args: &AnalysisArgs, file: &PromptFile) -> Result<Target, EngineError> {
    let bad = |m: String| Err(EngineError::InvalidInput(m));
    if let Some(t) = &args.target {
        let text = &file.text;
        let found = text[file.response.clone()]
            .find(t.as_str())
            .map(|p| file.response.start + p)
            .or_else(|| {
                text[file.prompt.clone()]
                    .find(t.as_str())
                    .map(|p| file.prompt.start + p)
            });
        return match found {
            Some(start) if !t.is_empty() => Ok(Target::Bytes(start..start + t.len())),
            _ => bad(format!(
                "target text {t:?} is not in the prompt or the response"
            )),
        };
    }
    if let Some(r) = &args.target_bytes {
        return match parse_range(r) {
            Some((a, b)) if a < b && b <= file.text.len() && file.text.is_char_boundary(a) && file.text.is_char_boundary(b) => {
                Ok(Target::Bytes(a..b))
            }
            _ => bad(format!("--target-bytes {r}: expected A..B within the file's {} bytes, on character boundaries", file.text.len())),
        };
    }
    if let Some(r) = &args.target_lines {
        return match parse_range(r).and_then(|(a, b)| file.line_range(a, b)) {
            Some(range) if !range.is_empty() => Ok(Target::Bytes(range)),
            _ => bad(format!(
                "--target-lines {r}: expected L1..L2, lines of the file with text"
            )),
        };
    }
    Ok(Target::Response)
}

/// Analyses `file` with `engine` as `args` ask, with the faithfulness check unless skipped.
pub fn analyse_file(
    args: &AnalysisArgs,
    file: &PromptFile,
    engine: &Engine,
    generation: &GenerationArgs,
) -> Result<FileRun, EngineError> {
    let s = &file.settings;
    let custom = match args.separators.as_ref().or(s.separators.as_ref()) {
        Some(r) => {
            Some(Level::Custom(regex::Regex::new(r).map_err(|e| {
                EngineError::InvalidInput(format!("--separators: {e}"))
            })?))
        }
        None => None,
    };
    let granularity = args
        .granularity
        .or(s.granularity)
        .unwrap_or(Granularity::Sentence);
    let selected = custom.clone().unwrap_or(Level::Standard(granularity));
    let opts = AnalysisOptions {
        method: args.method.or(s.method).unwrap_or(Method::GradDotInput),
        template: engine.template_or_default(s.template),
        system: s.system.clone(),
        ig: IgOptions {
            baseline: args.baseline.or(s.baseline).unwrap_or_default(),
            fixed_steps: args.steps.or(s.ig_steps),
            ..IgOptions::default()
        },
        generation: generation.options_with(s),
        contrast: if args.no_contrast {
            None
        } else {
            args.contrast.clone().or(s.contrast.clone())
        },
        segments: selected.clone(),
        surrogate: SurrogateOptions {
            samples: args
                .samples
                .or(s.samples)
                .unwrap_or(SurrogateOptions::default().samples),
            seed: args.perturbation_seed,
            ..SurrogateOptions::default()
        },
    };
    let target = target(args, file)?;
    let cancel = CancelToken::new();
    let analysis = analyse(engine, file, &target, &opts, &stderr_progress, &cancel)?;
    let faithfulness = if args.no_faithfulness {
        None
    } else {
        let opts = FaithfulnessOptions {
            random_draws: args.draws,
            seed: args.perturbation_seed,
            ..FaithfulnessOptions::default()
        };
        match faithfulness::check(
            engine,
            &analysis,
            &selected,
            &opts,
            &stderr_progress,
            &cancel,
        ) {
            Ok(f) => Some(f),
            // Too few segments for a deletion test is not a reason to withhold the map.
            Err(EngineError::InvalidInput(m)) => {
                eprintln!("faithfulness check skipped: {m}");
                None
            }
            Err(e) => return Err(e),
        }
    };
    Ok(FileRun {
        analysis,
        faithfulness,
        selected,
        custom,
        gain: args.gain.or(s.gain).unwrap_or(1.0),
    })
}

pub fn run(args: ComputeArgs) -> Result<(), EngineError> {
    let (file, original) = read(&args.file)?;
    let engine = args.model.load_or(file.settings.model.as_deref())?;
    let run = analyse_file(&args.analysis, &file, &engine, &args.generation)?;
    let analysis = &run.analysis;
    if analysis.generated_response && args.write {
        let response = &analysis.text[analysis.response.clone()];
        write::write_if_unchanged(
            &args.file,
            &original,
            &write::with_response(&file, response),
        )
        .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
        eprintln!("wrote the generated response into {}", args.file.display());
    }
    let name = args.file.display().to_string();
    let json = || {
        report::json(
            analysis,
            &name,
            &run.selected,
            run.custom.as_ref(),
            run.gain,
            run.faithfulness.as_ref(),
        )
    };
    let out = match args.format {
        Format::Terminal => {
            let mut out =
                report::terminal(analysis, &analysis.level(&run.selected, run.gain), run.gain);
            if let Some(f) = &run.faithfulness {
                out.push_str(&report::faithfulness_text(f));
            }
            out
        }
        Format::Json => serde_json::to_string_pretty(&json()).expect("json") + "\n",
        Format::Html => report::html(&json()),
    };
    match &args.output {
        Some(p) => std::fs::write(p, out)
            .map_err(|e| EngineError::InvalidInput(format!("{}: {e}", p.display())))?,
        None => print!("{out}"),
    }
    Ok(())
}

pub fn generate_into_file(
    path: &Path,
    model: &ModelArgs,
    generation: &GenerationArgs,
) -> Result<(), EngineError> {
    let (file, original) = read(path)?;
    if file.prompt.is_empty() {
        return Err(EngineError::InvalidInput(format!(
            "{}: the prompt is empty",
            path.display()
        )));
    }
    let s = &file.settings;
    let engine = model.load_or(s.model.as_deref())?;
    let prepared = engine.prepare(
        file.prompt_text(),
        s.system.as_deref(),
        engine.template_or_default(s.template),
    )?;
    let gen = engine.generate(
        &prepared.ids(),
        &generation.options_with(s),
        &stderr_progress,
        &CancelToken::new(),
    )?;
    write::write_if_unchanged(path, &original, &write::with_response(&file, &gen.text))
        .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    eprintln!(
        "{}: wrote {} tokens ({:.1} tokens/s, stop: {:?})",
        path.display(),
        gen.ids.len(),
        gen.tokens_per_second(),
        gen.stop_reason
    );
    Ok(())
}
