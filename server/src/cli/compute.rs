//! `prompt-salience compute FILE` and `prompt-salience generate FILE`.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use salience_core::analysis::{analyse, Analysis, Target};
use salience_core::faithfulness::{self, Faithfulness, FaithfulnessOptions};
use salience_core::options::{limits, Layers, Resolved};
use salience_core::prompt_file::{self, write, Granularity, PromptFile, SalienceSettings};
use salience_core::segments::Segmentation;
use salience_engine::salience::{Baseline, Method};
use salience_engine::{CancelToken, Engine, EngineError};

use super::{stderr_progress, GenerationArgs, ModelArgs};
use crate::report;

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
    /// Target: a candidate answer that is not in the file, explained as if it were the
    /// response (in memory; the file is not changed).
    #[arg(long, group = "target_choice")]
    target_text: Option<String>,
    /// Contrastive target: explain why the target rather than this alternative
    /// (F = ln p(target) - ln p(alternative)). Default: the file's `salience.contrast`.
    #[arg(long, conflicts_with = "no_contrast")]
    contrast: Option<String>,
    /// Ignore the file's `salience.contrast`: explain the target alone.
    #[arg(long)]
    no_contrast: bool,
    /// grad_l2, grad_dot_input, integrated_gradients, leave_one_out, ablation_surrogate
    /// (default: the file's `salience.method`, else grad_l2)
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
    /// Integrated gradients: the path's start, mean | zero | pad (default: the file's, else mean).
    #[arg(long)]
    baseline: Option<Baseline>,
    /// ablation_surrogate: random ablation masks (default: the file's `salience.samples`, else 64).
    #[arg(long)]
    samples: Option<usize>,
    /// Skip the faithfulness (deletion) check that comes with every report.
    #[arg(long)]
    no_faithfulness: bool,
    /// Faithfulness check: random deletions per number of deleted segments, when there are
    /// more than 40 possible deletions (otherwise every one is tried).
    #[arg(long, default_value_t = 32)]
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
    /// terminal (colours in the terminal), json (every level), or html (one self-contained page).
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
    pub selected: Segmentation,
    pub custom: Option<Segmentation>,
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
        let in_response = text[file.response.clone()]
            .find(t.as_str())
            .map(|p| file.response.start + p);
        let found = in_response.or_else(|| {
            let at = text[file.prompt.clone()]
                .find(t.as_str())
                .map(|p| file.prompt.start + p)?;
            let line = text[..at].matches('\n').count() + 1;
            eprintln!(
                "--target: {t:?} is not in the response; explaining its first occurrence in the prompt (line {line}) by the text before it"
            );
            Some(at)
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

impl AnalysisArgs {
    /// These arguments (with the generation and model arguments) as the highest layer of
    /// settings, resolved with the file's front matter by [`Layers`].
    fn resolve(
        &self,
        file: &PromptFile,
        generation: &GenerationArgs,
        model: Option<String>,
    ) -> Result<Resolved, EngineError> {
        let mut arguments = SalienceSettings {
            model,
            method: self.method,
            granularity: self.granularity,
            separators: self.separators.clone(),
            gain: self.gain,
            ig_steps: self.steps,
            baseline: self.baseline,
            contrast: self.contrast.clone(),
            samples: self.samples,
            perturbation_seed: Some(self.perturbation_seed),
            ..SalienceSettings::default()
        };
        generation.add_to(&mut arguments);
        let mut file_layer = file.settings.clone();
        if self.no_contrast {
            file_layer.contrast = None;
        }
        Layers {
            arguments: &arguments,
            file: &file_layer,
            client: &NO_CLIENT,
        }
        .resolve()
        .map_err(EngineError::InvalidInput)
    }
}

/// Settings from the model and generation arguments alone, over the file's (for `generate`).
fn generation_layers<'a>(
    arguments: &'a mut SalienceSettings,
    file: &'a PromptFile,
    model: &ModelArgs,
    generation: &GenerationArgs,
) -> Layers<'a> {
    arguments.model = model.name().map(str::to_string);
    generation.add_to(arguments);
    Layers {
        arguments,
        file: &file.settings,
        client: &NO_CLIENT,
    }
}

/// The command line has no client settings.
static NO_CLIENT: SalienceSettings = SalienceSettings::EMPTY;

/// Analyses `file` with `engine` as `args` ask, with the faithfulness check unless skipped.
pub fn analyse_file(
    args: &AnalysisArgs,
    file: &PromptFile,
    engine: &Engine,
    generation: &GenerationArgs,
) -> Result<FileRun, EngineError> {
    let draws = limits::count(args.draws as u64, limits::DRAWS)
        .map_err(|e| EngineError::InvalidInput(format!("--draws: {e}")))?;
    let resolved = args.resolve(file, generation, Some(engine.name.clone()))?;
    let selected = resolved.segmentation().clone();
    let opts = resolved.analysis;
    let candidate;
    let (file, target) = match &args.target_text {
        Some(answer) if answer.trim().is_empty() => {
            return Err(EngineError::InvalidInput("--target-text is empty".into()))
        }
        Some(answer) => {
            candidate = prompt_file::parse(&write::with_response(file, answer));
            (&candidate, Target::Response)
        }
        None => (file, target(args, file)?),
    };
    let cancel = CancelToken::new();
    let analysis = analyse(engine, file, &target, &opts, &stderr_progress, &cancel)?;
    let faithfulness = if args.no_faithfulness {
        None
    } else {
        let opts = FaithfulnessOptions {
            random_draws: draws,
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
        custom: resolved.custom,
        gain: resolved.gain,
    })
}

pub fn run(args: ComputeArgs) -> Result<(), EngineError> {
    let (file, original) = read(&args.file)?;
    let mut arguments = SalienceSettings::default();
    let model = generation_layers(&mut arguments, &file, &args.model, &args.generation).model();
    let engine = args.model.fetch.load(&model)?;
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
    let mut arguments = SalienceSettings::default();
    let layers = generation_layers(&mut arguments, &file, model, generation);
    let options = layers.generation().map_err(EngineError::InvalidInput)?;
    let engine = model.fetch.load(&layers.model())?;
    let s = &file.settings;
    let prepared = engine.prepare(
        file.prompt_text(),
        s.system.as_deref(),
        engine.template_or_default(s.template),
    )?;
    let gen = engine.generate(
        &prepared.ids(),
        &options,
        &stderr_progress,
        &CancelToken::new(),
    )?;
    write::write_if_unchanged(path, &original, &write::with_response(&file, &gen.text))
        .map_err(|e| EngineError::InvalidInput(e.to_string()))?;
    eprintln!(
        "{}: wrote {} tokens ({:.1} tokens/s, stop: {:?}{})",
        path.display(),
        gen.ids.len(),
        gen.tokens_per_second(),
        gen.stop_reason,
        super::sampled_with(gen.seed)
    );
    Ok(())
}
