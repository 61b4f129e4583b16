//! `bench --baseline-python PY`: the same work timed by PyTorch and llama.cpp in the same run,
//! so that every speed figure is a ratio measured on the same machine under the same load.
//!
//! The scripts are the ones in `docs/bench/`, built into the binary and written to a temporary
//! folder; they print their results as one JSON line at the end.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const PYTORCH_SCRIPT: &str = include_str!("../../../docs/bench/pytorch_baseline.py");
const LLAMA_CPP_SCRIPT: &str = include_str!("../../../docs/bench/llama_cpp_baseline.py");

/// What prompt-salience measured, to set against the baselines.
#[derive(Default)]
pub struct Measured {
    /// (method as the PyTorch script names it, prompt tokens, best seconds).
    pub salience: Vec<(&'static str, usize, f64)>,
    pub prefill_seconds: f64,
    pub decode_tokens_per_second: f64,
}

pub struct BaselineArgs<'a> {
    pub python: &'a Path,
    pub gguf: &'a Path,
    pub lengths: &'a [usize],
    pub ig_lengths: &'a [usize],
    pub ig_steps: usize,
    pub target_tokens: usize,
    pub generate_tokens: usize,
    pub repeat: usize,
    pub threads: usize,
}

/// Runs the baselines that `python` can import and prints the ratios; says which could not run
/// and why (the user asked for them).
pub fn compare(args: &BaselineArgs, ours: &Measured) {
    let dir = std::env::temp_dir().join(format!("prompt-salience-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        println!("baselines: cannot create {}: {e}", dir.display());
        return;
    }
    let list = |v: &[usize]| {
        v.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let common = [
        "--repeat".to_string(),
        args.repeat.max(1).to_string(),
        "--threads".to_string(),
        args.threads.to_string(),
    ];
    println!(
        "\nbaselines, same machine, same run, {} threads:",
        args.threads
    );
    println!("| work | prompt-salience | baseline | ratio (ours / baseline time) |");
    println!("|---|---|---|---|");
    let torch = run_script(
        args.python,
        &dir,
        "pytorch_baseline.py",
        PYTORCH_SCRIPT,
        "import torch, transformers, gguf, accelerate",
        args.gguf,
        &[
            vec![
                "--lengths".to_string(),
                list(args.lengths),
                "--ig-lengths".to_string(),
                list(args.ig_lengths),
                "--ig-steps".to_string(),
                args.ig_steps.to_string(),
                "--target-tokens".to_string(),
                args.target_tokens.to_string(),
            ],
            common.to_vec(),
        ]
        .concat(),
    );
    match torch {
        Ok(v) => {
            let version = v["version"].as_str().unwrap_or("?").to_string();
            for r in v["results"].as_array().into_iter().flatten() {
                let (Some(method), Some(n), Some(theirs)) = (
                    r["method"].as_str(),
                    r["prompt_tokens"].as_u64(),
                    r["seconds"].as_f64(),
                ) else {
                    continue;
                };
                let Some(&(_, _, mine)) = ours
                    .salience
                    .iter()
                    .find(|(m, len, _)| *m == method && *len == n as usize)
                else {
                    continue;
                };
                let label = if method == "integrated_gradients" {
                    format!("integrated gradients ({} steps), {n} tokens", args.ig_steps)
                } else {
                    format!("gradient salience, {n} tokens")
                };
                println!(
                    "| {label} | {mine:.3} s | PyTorch {version}: {theirs:.3} s | {:.2} |",
                    mine / theirs
                );
            }
        }
        Err(why) => println!("| gradient salience | — | PyTorch not run: {why} | — |"),
    }
    let llama = run_script(
        args.python,
        &dir,
        "llama_cpp_baseline.py",
        LLAMA_CPP_SCRIPT,
        "import llama_cpp, numpy",
        args.gguf,
        &[
            vec![
                "--prompt-tokens".to_string(),
                "100".to_string(),
                "--generate-tokens".to_string(),
                args.generate_tokens.to_string(),
            ],
            common.to_vec(),
        ]
        .concat(),
    );
    match llama {
        Ok(v) => {
            let version = v["version"].as_str().unwrap_or("?");
            let (prefill, rate) = (
                v["prefill_seconds"].as_f64().unwrap_or(f64::NAN),
                v["decode_tokens_per_second"].as_f64().unwrap_or(f64::NAN),
            );
            println!(
                "| prefill, 100 tokens | {:.3} s | llama.cpp {version}: {prefill:.3} s | {:.2} |",
                ours.prefill_seconds,
                ours.prefill_seconds / prefill
            );
            println!(
                "| greedy decoding | {:.1} tokens/s | llama.cpp {version}: {rate:.1} tokens/s | {:.2} (speed: {:.2}×) |",
                ours.decode_tokens_per_second,
                rate / ours.decode_tokens_per_second,
                ours.decode_tokens_per_second / rate
            );
        }
        Err(why) => println!("| decoding | — | llama.cpp not run: {why} | — |"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs one script with the model and arguments; returns its last stdout line as JSON.
fn run_script(
    python: &Path,
    dir: &Path,
    name: &str,
    source: &str,
    imports: &str,
    gguf: &Path,
    args: &[String],
) -> Result<Value, String> {
    let probe = Command::new(python)
        .args(["-c", imports])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !probe.status.success() {
        return Err(format!("`{}` cannot `{imports}`", python.display()));
    }
    let script: PathBuf = dir.join(name);
    std::fs::write(&script, source).map_err(|e| format!("cannot write {name}: {e}"))?;
    eprintln!("running the {name} baseline ...");
    let mut command = Command::new(python);
    command.arg(&script).arg(gguf).args(args);
    // The baselines run with the system's page policy, not the one this process chose.
    crate::memory_pages::system_pages_for(&mut command);
    let out = command
        .output()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(format!("{name} failed: {}", tail.join(" / ")));
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("{name} printed no result ({e})"))
}
