//! `bench --baseline-python PY`: the same work timed by PyTorch and llama.cpp in the same run,
//! so that every speed figure is a ratio measured on the same machine under the same load.
//!
//! The scripts are the ones in `docs/bench/`, built into the binary and written to a temporary
//! folder. llama.cpp's prints its results as one JSON line at the end, once per round. PyTorch's
//! stays running (`--serve`) and times each piece of work right before or after ours: on these
//! shared machines the speed drifts by up to 1.9× within an hour, and a ratio of two figures
//! taken a minute apart carried that drift (one run's rounds gave 0.58, 1.00 and 0.64 at 600
//! tokens).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use salience_engine::model::Kernel;
use serde_json::Value;

const PYTORCH_SCRIPT: &str = include_str!("../../../docs/bench/pytorch_baseline.py");
const LLAMA_CPP_SCRIPT: &str = include_str!("../../../docs/bench/llama_cpp_baseline.py");

/// What prompt-salience measured, to set against the baselines.
#[derive(Default)]
pub struct Measured {
    pub salience: Vec<SalienceTiming>,
    pub prefill_seconds: f64,
    pub decode_tokens_per_second: f64,
}

/// One piece of salience work, as measured.
pub struct SalienceTiming {
    /// The method as the PyTorch script names it.
    pub method: &'static str,
    pub prompt_tokens: usize,
    /// The best run's time.
    pub seconds: f64,
    /// The time its arithmetic takes at the machine's multiply-add limit, measured next to it
    /// (`salience::flops` over `machine::multiply_add_limit`), where the work's arithmetic is
    /// known.
    pub at_limit_seconds: Option<f64>,
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

/// One row of the comparison: a piece of work, both sides' figures, and the ratio of our
/// time to the baseline's (None where the baseline could not run).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub work: String,
    pub ours: String,
    pub theirs: String,
    pub ratio: Option<f64>,
    /// The ratio a program that ran every multiply-add at this machine's limit, and did
    /// nothing else, would get against the same baseline time: no speed-up goes below it.
    pub floor: Option<f64>,
    /// Decoding: the ratio is also printed as a speed, baseline time over ours.
    pub speed: bool,
}

/// What the two baselines measured in one round, or why they did not run. `torch` has the
/// shape of the PyTorch script's batch output: `{"version", "results": [...]}`.
pub struct BaselineResults {
    torch: Result<Value, String>,
    llama: Result<Value, String>,
}

/// A baseline script ready to run: its path and its arguments (the model first).
type Script = (PathBuf, Vec<String>);

/// The baselines, checked against `python` and written to a temporary folder once for every
/// round (importing torch to check for it takes seconds); the folder goes with this. PyTorch's
/// runs from the start as a server, llama.cpp's once per round.
pub struct Baselines<'a> {
    python: &'a Path,
    dir: PathBuf,
    torch: Result<TorchServer, String>,
    llama: Result<Script, String>,
    pub threads: usize,
}

/// The PyTorch baseline's instruction sets, capped to those of the kernels this process runs
/// (`PROMPT_SALIENCE_KERNEL` caps them, or the CPU lacks AVX-512), so that the comparison is
/// one instruction set against the same: MKL's and oneDNN's matrix kernels and ATen's own
/// (attention, element-wise). llama.cpp's kernels are fixed when pip builds it, so it is
/// never capped.
pub fn torch_isa_caps(ours: Kernel) -> &'static [(&'static str, &'static str)] {
    match ours {
        Kernel::Avx512 => &[],
        Kernel::Avx2 => &[
            ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
            ("ONEDNN_MAX_CPU_ISA", "AVX2"),
            ("ATEN_CPU_CAPABILITY", "avx2"),
        ],
        Kernel::Portable => &[
            ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2"),
            ("ONEDNN_MAX_CPU_ISA", "SSE41"),
            ("ATEN_CPU_CAPABILITY", "default"),
        ],
    }
}

impl<'a> Baselines<'a> {
    pub fn prepare(args: &BaselineArgs<'a>) -> Baselines<'a> {
        let dir =
            std::env::temp_dir().join(format!("prompt-salience-bench-{}", std::process::id()));
        let created = std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()));
        let list = |v: &[usize]| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let with_common = |own: Vec<String>| {
            let mut all = vec![args.gguf.display().to_string()];
            all.extend(own);
            all.extend([
                "--repeat".to_string(),
                args.repeat.max(1).to_string(),
                "--threads".to_string(),
                args.threads.to_string(),
            ]);
            all
        };
        let prepare = |name: &str, source: &str, imports: &str, own: Vec<String>| {
            created.clone().and_then(|()| {
                let script = prepare_script(args.python, &dir, name, source, imports)?;
                Ok((script, with_common(own)))
            })
        };
        let torch = prepare(
            "pytorch_baseline.py",
            PYTORCH_SCRIPT,
            "import torch, transformers, gguf, accelerate",
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
        );
        let llama = prepare(
            "llama_cpp_baseline.py",
            LLAMA_CPP_SCRIPT,
            "import llama_cpp, numpy",
            vec![
                "--prompt-tokens".to_string(),
                "100".to_string(),
                "--generate-tokens".to_string(),
                args.generate_tokens.to_string(),
            ],
        );
        // Caps the user set for PyTorch stay as they are.
        let ours = Kernel::best();
        let torch_env: Vec<_> = torch_isa_caps(ours)
            .iter()
            .copied()
            .filter(|(name, _)| std::env::var_os(name).is_none())
            .collect();
        if !torch_env.is_empty() {
            let set: Vec<String> = torch_env.iter().map(|(n, v)| format!("{n}={v}")).collect();
            println!(
                "prompt-salience runs its {ours:?} kernels: the PyTorch baseline runs with {}; \
                 llama.cpp keeps the instructions pip built it for",
                set.join(" ")
            );
        }
        let log = dir.join("pytorch_baseline.stderr");
        let torch = torch.and_then(|(path, script_args)| {
            TorchServer::start(args.python, &path, &script_args, &torch_env, log)
        });
        Baselines {
            python: args.python,
            dir,
            torch,
            llama,
            threads: args.threads,
        }
    }

    /// Runs the llama.cpp script, when it could be prepared.
    pub fn run_llama(&self) -> Result<Value, String> {
        let (path, args) = self.llama.as_ref().map_err(Clone::clone)?;
        run_script(self.python, path, args, &[])
    }

    /// The PyTorch server, when it started.
    pub fn torch(&mut self) -> Option<&mut TorchServer> {
        self.torch.as_mut().ok()
    }

    /// This round's results: PyTorch's figures so far (the next round starts empty), and
    /// llama.cpp's, run now unless `llama_before` holds them already.
    pub fn round_results(
        &mut self,
        llama_before: Option<Result<Value, String>>,
    ) -> BaselineResults {
        BaselineResults {
            torch: match &mut self.torch {
                Ok(server) => Ok(server.take_round()),
                Err(why) => Err(why.clone()),
            },
            llama: llama_before.unwrap_or_else(|| self.run_llama()),
        }
    }
}

/// The PyTorch baseline, loaded once and kept running (`pytorch_baseline.py --serve`).
pub struct TorchServer {
    child: Child,
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
    /// Its stderr (a loading progress bar, warnings), shown when it fails.
    log: PathBuf,
    version: String,
    /// What it measured: `{"method", "prompt_tokens", "seconds"}` per piece of work.
    measured: Vec<Value>,
}

impl TorchServer {
    fn start(
        python: &Path,
        script: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> Result<TorchServer, String> {
        eprintln!("starting the pytorch_baseline.py baseline ...");
        let stderr = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let mut command = Command::new(python);
        command
            .arg(script)
            .args(args)
            .arg("--serve")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        crate::memory_pages::system_pages_for(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot run pytorch_baseline.py: {e}"))?;
        let (input, output) = (child.stdin.take(), child.stdout.take());
        let (Some(input), Some(output)) = (input, output) else {
            return Err("pytorch_baseline.py: no pipes".into());
        };
        let mut server = TorchServer {
            child,
            input: Some(input),
            output: BufReader::new(output),
            log,
            version: String::new(),
            measured: Vec::new(),
        };
        let ready = server.answer()?;
        server.version = ready["version"].as_str().unwrap_or("?").to_string();
        Ok(server)
    }

    /// The next JSON object the script prints; lines that are not one (a library's notice)
    /// are passed on to stderr.
    fn answer(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            let read = self
                .output
                .read_line(&mut line)
                .map_err(|e| format!("pytorch_baseline.py: {e}"))?;
            if read == 0 {
                let status = self.child.wait().map_err(|e| e.to_string())?;
                let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!(
                    "pytorch_baseline.py exited ({status}): {}",
                    last_lines(&stderr)
                ));
            }
            match serde_json::from_str::<Value>(line.trim()) {
                Ok(v) if v.is_object() => return Ok(v),
                _ => eprint!("pytorch_baseline.py: {line}"),
            }
        }
    }

    /// Times `method` on a `prompt_tokens`-token prompt (best of the script's `--repeat`,
    /// after a warm-up run), and keeps the figure for this round's comparison.
    pub fn time(&mut self, method: &str, prompt_tokens: usize) -> Result<f64, String> {
        let request = serde_json::json!({"method": method, "prompt_tokens": prompt_tokens});
        let input = self.input.as_mut().ok_or("pytorch_baseline.py: closed")?;
        writeln!(input, "{request}")
            .and_then(|()| input.flush())
            .map_err(|e| format!("pytorch_baseline.py: {e}"))?;
        let answer = self.answer()?;
        if let Some(why) = answer["error"].as_str() {
            return Err(format!("pytorch_baseline.py: {why}"));
        }
        let seconds = answer["seconds"]
            .as_f64()
            .ok_or_else(|| format!("pytorch_baseline.py answered {answer}"))?;
        self.measured.push(answer);
        Ok(seconds)
    }

    /// This round's figures in the shape `compare` reads; the next round starts empty.
    pub fn take_round(&mut self) -> Value {
        let results = std::mem::take(&mut self.measured);
        serde_json::json!({"version": self.version, "results": results})
    }
}

impl Drop for TorchServer {
    fn drop(&mut self) {
        // End of input ends the script's loop.
        drop(self.input.take());
        let _ = self.child.wait();
    }
}

impl Drop for Baselines<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Row {
    /// The row of a baseline that could not run, and why.
    fn not_run(work: &str, baseline: &str, why: &str) -> Row {
        Row {
            work: work.into(),
            ours: "—".into(),
            theirs: format!("{baseline} not run: {why}"),
            ratio: None,
            floor: None,
            speed: false,
        }
    }
}

/// Sets what the baselines measured against what prompt-salience measured in the same round.
pub fn compare(ig_steps: usize, results: &BaselineResults, ours: &Measured) -> Vec<Row> {
    let mut rows = Vec::new();
    match &results.torch {
        Ok(v) => {
            let version = v["version"].as_str().unwrap_or("?");
            for r in v["results"].as_array().into_iter().flatten() {
                let (Some(method), Some(n), Some(theirs)) = (
                    r["method"].as_str(),
                    r["prompt_tokens"].as_u64(),
                    r["seconds"].as_f64(),
                ) else {
                    continue;
                };
                let Some(mine) = ours
                    .salience
                    .iter()
                    .find(|m| m.method == method && m.prompt_tokens == n as usize)
                else {
                    continue;
                };
                let work = if method == "integrated_gradients" {
                    format!("integrated gradients ({ig_steps} steps), {n} tokens")
                } else {
                    format!("gradient salience, {n} tokens")
                };
                rows.push(Row {
                    work,
                    ours: format!("{:.3} s", mine.seconds),
                    theirs: format!("PyTorch {version}: {theirs:.3} s"),
                    ratio: Some(mine.seconds / theirs),
                    floor: mine.at_limit_seconds.map(|s| s / theirs),
                    speed: false,
                });
            }
        }
        Err(why) => rows.push(Row::not_run("gradient salience", "PyTorch", why)),
    }
    match &results.llama {
        Ok(v) => {
            let version = v["version"].as_str().unwrap_or("?");
            let (prefill, rate) = (
                v["prefill_seconds"].as_f64().unwrap_or(f64::NAN),
                v["decode_tokens_per_second"].as_f64().unwrap_or(f64::NAN),
            );
            rows.push(Row {
                work: "prefill, 100 tokens".into(),
                ours: format!("{:.3} s", ours.prefill_seconds),
                theirs: format!("llama.cpp {version}: {prefill:.3} s"),
                ratio: Some(ours.prefill_seconds / prefill),
                floor: None,
                speed: false,
            });
            rows.push(Row {
                work: "greedy decoding".into(),
                ours: format!("{:.1} tokens/s", ours.decode_tokens_per_second),
                theirs: format!("llama.cpp {version}: {rate:.1} tokens/s"),
                ratio: Some(rate / ours.decode_tokens_per_second),
                floor: None,
                speed: true,
            });
        }
        Err(why) => rows.push(Row::not_run("decoding", "llama.cpp", why)),
    }
    rows
}

/// Prints one round's comparison.
pub fn print_round(rows: &[Row], threads: usize) {
    println!("\nbaselines, same machine, same run, {threads} threads:");
    println!(
        "| work | prompt-salience | baseline | ratio (ours / baseline time) | at the multiply-add limit |"
    );
    println!("|---|---|---|---|---|");
    for row in rows {
        let ratio = match row.ratio {
            Some(r) if row.speed => format!("{r:.2} (speed: {:.2}×)", 1.0 / r),
            Some(r) => format!("{r:.2}"),
            None => "—".into(),
        };
        let floor = row.floor.map_or_else(|| "—".into(), |f| format!("{f:.2}"));
        println!(
            "| {} | {} | {} | {ratio} | {floor} |",
            row.work, row.ours, row.theirs
        );
    }
}

/// One piece of work's figures over the rounds.
#[derive(Debug)]
pub struct WorkRatios {
    pub work: String,
    pub ratios: Vec<f64>,
    /// `Row::floor` of the rounds that had one.
    pub floors: Vec<f64>,
    /// Decoding: shown as speeds.
    pub speed: bool,
}

/// Each piece of work's ratios over the rounds, in the order of the first round. Work that
/// some round could not measure keeps the rounds that did.
pub fn ratios_by_work(rounds: &[Vec<Row>]) -> Vec<WorkRatios> {
    let mut out: Vec<WorkRatios> = Vec::new();
    for row in rounds.iter().flatten() {
        let Some(r) = row.ratio else { continue };
        let at = match out.iter().position(|w| w.work == row.work) {
            Some(at) => at,
            None => {
                out.push(WorkRatios {
                    work: row.work.clone(),
                    ratios: Vec::new(),
                    floors: Vec::new(),
                    speed: row.speed,
                });
                out.len() - 1
            }
        };
        out[at].ratios.push(r);
        out[at].floors.extend(row.floor);
    }
    out
}

/// The middle value (the mean of the two middle ones for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Prints the median ratio of each piece of work over alternating rounds.
pub fn print_summary(rounds: &[Vec<Row>]) {
    println!(
        "\nratios over {} alternating rounds (ours / baseline time; odd rounds ran prompt-salience first, even rounds the baselines first):",
        rounds.len()
    );
    println!(
        "| work | median | lowest – highest | each round | at the multiply-add limit (median) |"
    );
    println!("|---|---|---|---|---|");
    for WorkRatios {
        work,
        ratios: list,
        floors,
        speed,
    } in ratios_by_work(rounds)
    {
        let show = |r: f64| {
            if speed {
                format!("{:.2}×", 1.0 / r)
            } else {
                format!("{r:.2}")
            }
        };
        let (lo, hi) = list
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| {
                (lo.min(r), hi.max(r))
            });
        // For decoding the lowest speed is the highest time ratio.
        let (first, last) = if speed { (hi, lo) } else { (lo, hi) };
        let each: Vec<String> = list.iter().map(|&r| show(r)).collect();
        let floor = match floors.is_empty() {
            true => "—".to_string(),
            false => format!("{:.2}", median(&floors)),
        };
        println!(
            "| {work} | {}{} | {} – {} | {} | {floor} |",
            if speed { "speed " } else { "" },
            show(median(&list)),
            show(first),
            show(last),
            each.join(" / ")
        );
    }
}

/// Checks that `python` can import what the script needs, then writes the script to `dir`.
fn prepare_script(
    python: &Path,
    dir: &Path,
    name: &str,
    source: &str,
    imports: &str,
) -> Result<PathBuf, String> {
    let probe = Command::new(python)
        .args(["-c", imports])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !probe.status.success() {
        return Err(format!("`{}` cannot `{imports}`", python.display()));
    }
    let script = dir.join(name);
    std::fs::write(&script, source).map_err(|e| format!("cannot write {name}: {e}"))?;
    Ok(script)
}

/// A failed script's last three lines of stderr, last first, on one line.
fn last_lines(stderr: &str) -> String {
    let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
    tail.join(" / ")
}

/// Runs one script with its arguments; returns its last stdout line as JSON.
fn run_script(
    python: &Path,
    script: &Path,
    args: &[String],
    env: &[(&str, &str)],
) -> Result<Value, String> {
    let name = script
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    eprintln!("running the {name} baseline ...");
    let mut command = Command::new(python);
    command.arg(script).args(args).envs(env.iter().copied());
    // The baselines run with the system's page policy, not the one this process chose.
    crate::memory_pages::system_pages_for(&mut command);
    let out = command
        .output()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{name} failed: {}", last_lines(&stderr)));
    }
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("{name} printed no result ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pytorch_is_capped_only_where_our_kernels_are() {
        assert!(torch_isa_caps(Kernel::Avx512).is_empty());
        for (ours, mkl, onednn, aten) in [
            (Kernel::Avx2, "AVX2", "AVX2", "avx2"),
            (Kernel::Portable, "SSE4_2", "SSE41", "default"),
        ] {
            assert_eq!(
                torch_isa_caps(ours),
                [
                    ("MKL_ENABLE_INSTRUCTIONS", mkl),
                    ("ONEDNN_MAX_CPU_ISA", onednn),
                    ("ATEN_CPU_CAPABILITY", aten)
                ]
            );
        }
    }

    fn measured() -> Measured {
        Measured {
            salience: vec![
                SalienceTiming {
                    method: "grad_dot_input",
                    prompt_tokens: 100,
                    seconds: 0.3,
                    at_limit_seconds: Some(0.2),
                },
                SalienceTiming {
                    method: "integrated_gradients",
                    prompt_tokens: 100,
                    seconds: 2.0,
                    at_limit_seconds: None,
                },
            ],
            prefill_seconds: 0.1,
            decode_tokens_per_second: 150.0,
        }
    }

    fn results(torch_seconds: f64, llama_rate: f64) -> BaselineResults {
        BaselineResults {
            torch: Ok(serde_json::json!({
                "version": "2.x",
                "results": [
                    {"method": "grad_dot_input", "prompt_tokens": 100, "seconds": torch_seconds},
                    {"method": "grad_dot_input", "prompt_tokens": 300, "seconds": 1.0},
                    {"method": "integrated_gradients", "prompt_tokens": 100, "seconds": 4.0},
                ]
            })),
            llama: Ok(serde_json::json!({
                "version": "0.3",
                "prefill_seconds": 0.4,
                "decode_tokens_per_second": llama_rate,
            })),
        }
    }

    #[test]
    fn rows_pair_each_measurement_with_its_baseline() {
        let rows = compare(8, &results(0.5, 100.0), &measured());
        let pairs: Vec<(&str, Option<f64>)> =
            rows.iter().map(|r| (r.work.as_str(), r.ratio)).collect();
        // The 300-token baseline has no measurement of ours: no row.
        assert_eq!(pairs.len(), 4, "{pairs:?}");
        assert_eq!(pairs[0].0, "gradient salience, 100 tokens");
        assert!((pairs[0].1.unwrap() - 0.6).abs() < 1e-12);
        // 0.2 s at the multiply-add limit against PyTorch's 0.5 s.
        assert!((rows[0].floor.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(rows[1].floor, None);
        assert_eq!(pairs[1].0, "integrated gradients (8 steps), 100 tokens");
        assert!((pairs[1].1.unwrap() - 0.5).abs() < 1e-12);
        assert!((pairs[2].1.unwrap() - 0.25).abs() < 1e-12);
        // Decoding: baseline time per token over ours, 100 against 150 tokens/s.
        assert!(rows[3].speed);
        assert!((pairs[3].1.unwrap() - 100.0 / 150.0).abs() < 1e-12);
    }

    #[test]
    fn a_baseline_that_did_not_run_gives_a_row_without_ratio() {
        let r = BaselineResults {
            torch: Err("no torch".into()),
            llama: results(1.0, 1.0).llama,
        };
        let rows = compare(8, &r, &measured());
        assert_eq!(rows[0].ratio, None);
        assert!(rows[0].theirs.contains("no torch"));
        assert_eq!(rows.len(), 3);
    }

    /// A stand-in for `pytorch_baseline.py --serve` that needs no torch: it prints a notice and
    /// its ready line, answers `prompt_tokens / 1000` seconds, an error for any other method
    /// than the two, and exits at a request for 13 tokens.
    const FAKE_SERVER: &str = r#"
import json, sys
print("a library's notice on stdout")
print(json.dumps({"baseline": "pytorch", "version": "fake-1"}), flush=True)
for line in sys.stdin:
    work = json.loads(line)
    n = work["prompt_tokens"]
    if n == 13:
        print("going away", file=sys.stderr, flush=True)
        sys.exit(3)
    if work["method"] not in ("grad_dot_input", "integrated_gradients"):
        print(json.dumps({"error": "unknown method " + work["method"]}), flush=True)
        continue
    print(json.dumps({"method": work["method"], "prompt_tokens": n, "seconds": n / 1000}), flush=True)
"#;

    fn fake_server(dir: &Path) -> TorchServer {
        let script = dir.join("fake_server.py");
        std::fs::write(&script, FAKE_SERVER).unwrap();
        let log = dir.join("fake.stderr");
        TorchServer::start(Path::new("python3"), &script, &[], &[], log).expect("starts")
    }

    #[test]
    fn the_pytorch_server_times_each_piece_of_work_and_keeps_the_rounds_figures() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = fake_server(dir.path());
        assert_eq!(server.version, "fake-1");
        assert_eq!(server.time("grad_dot_input", 300), Ok(0.3));
        assert_eq!(server.time("integrated_gradients", 100), Ok(0.1));
        let why = server.time("grad_l2", 100).unwrap_err();
        assert!(why.contains("unknown method grad_l2"), "{why}");
        let round = server.take_round();
        assert_eq!(round["version"], "fake-1");
        let results = round["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{round}");
        assert_eq!(results[0]["prompt_tokens"], 300);
        // The next round starts empty, and compare reads the round's shape.
        assert_eq!(server.time("grad_dot_input", 100), Ok(0.1));
        let next = server.take_round();
        assert_eq!(next["results"].as_array().unwrap().len(), 1);
        let rows = compare(
            8,
            &BaselineResults {
                torch: Ok(next),
                llama: Err("not here".into()),
            },
            &measured(),
        );
        assert!(
            (rows[0].ratio.unwrap() - 3.0).abs() < 1e-12,
            "{:?}",
            rows[0]
        );
    }

    #[test]
    fn a_pytorch_server_that_exits_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = fake_server(dir.path());
        let why = server.time("grad_dot_input", 13).unwrap_err();
        assert!(why.contains("exited"), "{why}");
        assert!(why.contains("going away"), "{why}");
    }

    #[test]
    fn summaries_take_each_works_median_over_the_rounds() {
        let rounds: Vec<Vec<Row>> = [(0.5, 100.0), (0.3, 300.0), (0.6, 150.0)]
            .iter()
            .map(|&(t, rate)| compare(8, &results(t, rate), &measured()))
            .collect();
        let by_work = ratios_by_work(&rounds);
        assert_eq!(by_work.len(), 4);
        let first = &by_work[0];
        assert_eq!(first.work, "gradient salience, 100 tokens");
        assert!(!first.speed);
        assert_eq!(first.ratios.len(), 3);
        assert!((median(&first.ratios) - 0.6).abs() < 1e-12, "{first:?}");
        // 0.2 s at the limit against 0.5, 0.3 and 0.6 s.
        assert!((median(&first.floors) - 0.4).abs() < 1e-12, "{first:?}");
        assert!(by_work[1].floors.is_empty());
        let decoding = &by_work[3];
        assert!(decoding.speed);
        assert!(
            (median(&decoding.ratios) - 1.0).abs() < 1e-12,
            "{decoding:?}"
        );
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
