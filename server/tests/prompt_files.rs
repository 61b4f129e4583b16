//! End to end on the real default model: `compute` on every file in `prompts/` gives a JSON
//! report that follows the schema and is deterministic; `generate FILE` fills the response.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The binary; it may fetch the models it needs (tests fetch or fail, never skip).
fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_prompt-salience"));
    c.env("PROMPT_SALIENCE_ALLOW_NETWORK", "1");
    c
}

fn prompts() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prompts");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".prompt.md"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "prompts/ holds at least three examples");
    files
}

/// The shipped example whose name contains `name`.
fn shipped(name: &str) -> PathBuf {
    let found = prompts()
        .into_iter()
        .find(|p| p.to_string_lossy().contains(name));
    found.unwrap_or_else(|| panic!("no shipped prompt named like {name}"))
}

/// `compute FILE ARGS…`, run to the end.
fn compute(file: &Path, args: &[&str]) -> std::process::Output {
    bin().arg("compute").arg(file).args(args).output().unwrap()
}

fn compute_json(file: &Path, extra: &[&str]) -> Value {
    let out = compute(file, &[&["--format", "json"], extra].concat());
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The schema of docs/json-schema.md, checked field by field.
fn check_schema(v: &Value) {
    assert_eq!(v["schema"], "prompt-salience/compute");
    assert_eq!(v["version"], 1);
    for key in ["file", "model", "method", "template", "granularity", "text"] {
        assert!(v[key].is_string(), "{key}");
    }
    for key in ["objective", "seconds", "gain"] {
        assert!(v[key].is_number(), "{key}");
    }
    assert!(v["signed"].is_boolean());
    let text = v["text"].as_str().unwrap();
    let at = |x: &Value| x.as_u64().unwrap() as usize;
    let (ts, te) = (at(&v["target"]["start"]), at(&v["target"]["end"]));
    assert!(ts < te && te <= text.len());
    assert_eq!(v["target"]["text"].as_str().unwrap(), &text[ts..te]);
    assert!(v["target"]["log_probs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_f64().unwrap() <= 0.0));
    let tokens = v["tokens"].as_array().unwrap();
    let token_sum: f64 = tokens
        .iter()
        .filter(|t| !t["start"].is_null())
        .map(|t| t["score"].as_f64().unwrap())
        .sum();
    let levels = v["levels"].as_object().unwrap();
    for name in ["token", "word", "sentence", "line", "paragraph", "block"] {
        let level = &levels[name];
        let segs = level["segments"].as_array().unwrap();
        assert!(!segs.is_empty(), "{name}");
        let mut prev_end = 0;
        let mut sum = 0.0;
        let mut share = 0.0;
        for s in segs {
            let (a, b) = (at(&s["start"]), at(&s["end"]));
            assert!(
                prev_end <= a && a < b && b <= ts,
                "{name}: {a}..{b} after {prev_end}, target at {ts}"
            );
            assert_eq!(s["text"].as_str().unwrap(), &text[a..b]);
            assert!(s["normalized"].as_f64().unwrap().abs() <= 1.0 + 1e-6);
            assert!(s["level"].as_u64().unwrap() <= 8);
            assert!(s["rank"].as_u64().unwrap() >= 1);
            sum += s["score"].as_f64().unwrap();
            share += s["share"].as_f64().unwrap();
            prev_end = b;
        }
        assert!(
            (sum - token_sum).abs() <= 1e-3 * token_sum.abs().max(1.0),
            "{name}: {sum} vs {token_sum}"
        );
        assert!((share - 1.0).abs() < 1e-3, "{name}: shares {share}");
        assert!(level["template_share"].as_f64().unwrap() >= 0.0);
    }
}

fn top(v: &Value, level: &str) -> String {
    let segs = v["levels"][level]["segments"].as_array().unwrap();
    let best = segs.iter().find(|s| s["rank"] == 1).unwrap();
    best["text"].as_str().unwrap().to_string()
}

#[test]
fn compute_reports_follow_the_schema_and_are_deterministic() {
    for file in prompts() {
        let a = compute_json(&file, &[]);
        check_schema(&a);
        let b = compute_json(&file, &[]);
        assert_eq!(
            top(&a, "sentence"),
            top(&b, "sentence"),
            "{}",
            file.display()
        );
        assert_eq!(a["target"], b["target"]);
    }
}

#[test]
fn targets_by_text_lines_and_inside_the_prompt() {
    let file = shipped("principles");
    // A target inside the prompt: salience over the text before it only.
    let v = compute_json(&file, &["--target", "Be kind", "--method", "grad_l2"]);
    check_schema(&v);
    assert_eq!(v["target"]["text"], "Be kind");
    // And it says so: the text was not found in the response.
    let out = compute(
        &file,
        &[
            "--target",
            "Be kind",
            "--method",
            "grad_l2",
            "--no-faithfulness",
            "--format",
            "json",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not in the response") && stderr.contains("in the prompt (line"),
        "{stderr}"
    );
    let line = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .position(|l| l.starts_with("1. Be honest"))
        .unwrap()
        + 1;
    let v = compute_json(&file, &["--target-lines", &format!("{line}..{line}")]);
    assert_eq!(
        v["target"]["text"],
        "1. Be honest: say when you do not know."
    );
    let out = compute(&file, &["--target", "not in the file"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the prompt or the response"));
}

#[test]
fn the_headline_example_answers_sensibly_with_a_faithful_map() {
    // The README's first command: the answer a reader would accept, likely under the model
    // (a raw continuation keeps its leading space: " positive" is the token the model chose),
    // and a map that passes its own check.
    let file = shipped("few-shot");
    let v = compute_json(&file, &[]);
    assert_eq!(v["target"]["text"], "positive");
    let f = v["objective"].as_f64().unwrap();
    assert!(
        f > -1.0,
        "ln p(answer) = {f}: the explained answer is not the likely one"
    );
    assert_eq!(
        v["faithfulness"]["verdict"], "faithful",
        "{}",
        v["faithfulness"]["summary"]
    );
}

#[test]
fn faithfulness_sets_the_map_against_leave_one_out() {
    let file = shipped("few-shot");
    let v = compute_json(&file, &["--method", "grad_l2"]);
    let f = &v["faithfulness"];
    let n = f["segments"].as_u64().unwrap() as usize;
    let a = &f["agreement"];
    let loo: Vec<f64> = a["leave_one_out"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(loo.len(), n);
    let rho = a["spearman"].as_f64().unwrap();
    assert!((-1.0..=1.0).contains(&rho), "{rho}");
    // The same single deletions appear in the exact random baseline of one segment (every
    // subset of size 1, in order): the two must be the same numbers.
    let one = f["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["deleted"] == 1 && p["random"]["exact"] == true)
        .expect("few segments: one deletion is enumerated exactly");
    let singles: Vec<f64> = one["random"]["drops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(singles, loo);
    // Leave-one-out's own top segment is the largest single drop.
    let best = loo.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let top = a["leave_one_out_test"]["drop"].as_f64().unwrap();
    assert!((top - best).abs() < 1e-4, "{top} vs {best}");
    // A leave-one-out map is not compared with itself.
    let v = compute_json(&file, &["--method", "leave_one_out"]);
    assert!(v["faithfulness"]["agreement"].is_null());
}

#[test]
fn a_candidate_answer_is_explained_without_touching_the_file() {
    // Copied, so that a write to it would be noticed and nothing else is affected.
    let dir = tempfile::tempdir().unwrap();
    let source = shipped("few-shot");
    let file = dir.path().join("copy.prompt.md");
    std::fs::copy(&source, &file).unwrap();
    let before = std::fs::read(&file).unwrap();
    let args = ["--method", "grad_l2", "--no-faithfulness"];
    let own = compute_json(&file, &args);
    let candidate = "Sentiment: mixed";
    let v = compute_json(&file, &[&args[..], &["--target-text", candidate]].concat());
    check_schema(&v);
    assert_eq!(v["target"]["text"].as_str().unwrap(), candidate);
    assert_ne!(
        v["objective"], own["objective"],
        "a different answer has another F"
    );
    // The prompt part is the same text, the file on disk untouched.
    let start = v["target"]["start"].as_u64().unwrap() as usize;
    assert!(own["text"]
        .as_str()
        .unwrap()
        .starts_with(&v["text"].as_str().unwrap()[..start]));
    assert_eq!(std::fs::read(&file).unwrap(), before);
    let out = compute(&file, &["--target-text", "  "]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--target-text is empty"));
}

#[test]
fn html_report_is_self_contained() {
    let file = &prompts()[0];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.html");
    let status = bin()
        .arg("compute")
        .arg(file)
        .args(["--format", "html", "-o"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let page = std::fs::read_to_string(&out).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no network"
    );
    for level in ["\"sentence\"", "\"block\"", "\"word\""] {
        assert!(page.contains(level), "all levels embedded: {level}");
    }
}

#[test]
fn generate_writes_only_the_response() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.prompt.md");
    let original = "---\nsalience:\n  max_new_tokens: 6\n---\nName a colour.\n";
    std::fs::write(&path, original).unwrap();
    let out = bin().arg("generate").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with(original), "{text}");
    let rest = &text[original.len()..];
    assert!(
        rest.starts_with("\n<!-- response -->\n") && rest.len() > 20,
        "{rest:?}"
    );
    // Running again replaces the response, still keeping the prompt.
    let out = bin()
        .arg("generate")
        .arg(&path)
        .args(["--max-new-tokens", "2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let again = std::fs::read_to_string(&path).unwrap();
    assert!(again.starts_with(original) && again.len() < text.len());
    // A file that is not UTF-8 is refused with a clear message.
    std::fs::write(&path, b"bad \xff bytes").unwrap();
    let out = bin().arg("generate").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not UTF-8"));
}
