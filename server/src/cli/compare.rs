//! `prompt-salience compare A.prompt.md B.prompt.md` and `compare FILE --model X --model Y`.

use std::path::PathBuf;

use clap::Args;

use super::compute::{analyse_file, read, AnalysisArgs, FileRun, Format};
use super::{FetchArgs, GenerationArgs};
use crate::report::compare::{self, Side};
use salience_engine::registry::DEFAULT_MODEL;
use salience_engine::{Engine, EngineError};

#[derive(Args)]
pub struct CompareArgs {
    /// One prompt file (with two --model) or two.
    #[arg(required = true, num_args = 1..=2)]
    files: Vec<PathBuf>,
    /// The model of each side: twice for one file, at most once for two files
    /// (default: each file's `salience.model`, else smollm2-135m-instruct).
    #[arg(long, short)]
    model: Vec<String>,
    #[command(flatten)]
    fetch: FetchArgs,
    #[command(flatten)]
    analysis: AnalysisArgs,
    /// html (one page, both maps side by side), json, or terminal.
    #[arg(long, value_enum, default_value = "html")]
    format: Format,
    /// Write the report here instead of stdout.
    #[arg(long, short)]
    output: Option<PathBuf>,
    #[command(flatten)]
    generation: GenerationArgs,
}

pub fn run(args: CompareArgs) -> Result<(), EngineError> {
    let bad = |m: &str| Err(EngineError::InvalidInput(m.into()));
    // (file, model) per side.
    let sides: Vec<(PathBuf, Option<String>)> = match (args.files.as_slice(), args.model.as_slice())
    {
        ([f], [x, y]) => vec![(f.clone(), Some(x.clone())), (f.clone(), Some(y.clone()))],
        ([_], _) => return bad("one file needs two models: --model X --model Y"),
        ([a, b], []) => vec![(a.clone(), None), (b.clone(), None)],
        ([a, b], [m]) => vec![(a.clone(), Some(m.clone())), (b.clone(), Some(m.clone()))],
        _ => return bad("two files take at most one --model"),
    };
    let same_file = sides[0].0 == sides[1].0;
    let mut runs: Vec<(String, FileRun)> = Vec::new();
    let mut engine: Option<(String, Engine)> = None;
    for (path, model) in &sides {
        let (file, _) = read(path)?;
        let name = model
            .clone()
            .or_else(|| file.settings.model.clone())
            .unwrap_or_else(|| DEFAULT_MODEL.into());
        // One model in memory at a time; two files on one model load it once.
        if engine.as_ref().is_none_or(|(n, _)| *n != name) {
            drop(engine.take());
            engine = Some((name.clone(), args.fetch.load(&name)?));
        }
        let e = &engine.as_ref().expect("loaded").1;
        eprintln!("{}: {}", path.display(), e.name);
        let run = analyse_file(&args.analysis, &file, e, &args.generation)?;
        let label = if same_file {
            e.name.clone()
        } else {
            path.display().to_string()
        };
        runs.push((label, run));
    }
    let levels: Vec<_> = runs
        .iter()
        .map(|(_, r)| r.analysis.level(&r.selected, r.gain))
        .collect();
    let side = |i: usize| Side {
        label: runs[i].0.clone(),
        analysis: &runs[i].1.analysis,
        level: &levels[i],
        faithfulness: runs[i].1.faithfulness.as_ref(),
    };
    let (a, b) = (side(0), side(1));
    let out = match args.format {
        Format::Html => compare::html(&a, &b),
        Format::Json => serde_json::to_string_pretty(&compare::json(&a, &b)).expect("json") + "\n",
        Format::Terminal => compare::terminal(&a, &b),
    };
    match &args.output {
        Some(p) => std::fs::write(p, out)
            .map_err(|e| EngineError::InvalidInput(format!("{}: {e}", p.display())))?,
        None => print!("{out}"),
    }
    Ok(())
}
