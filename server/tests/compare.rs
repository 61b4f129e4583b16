//! `prompt-salience compare` on the command line: two files, and one file on two models.

use std::path::{Path, PathBuf};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../prompts/case-studies/{name}.prompt.md"))
}

/// `compare` on the command line: two files, and one file on two models (both architectures).
#[test]
fn compare_reports_align_both_maps() {
    let run = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
            .env("PROMPT_SALIENCE_ALLOW_NETWORK", "1")
            .arg("compare")
            .args(args)
            .args(["--format", "json", "--no-faithfulness"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = case("principles-first");
    let last = case("principles-last");
    let v = run(&[first.to_str().unwrap(), last.to_str().unwrap()]);
    assert_eq!(v["schema"], "prompt-salience/compare");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{v}");
    for r in rows {
        let (a, b) = (
            r["a"].as_u64().unwrap() as usize,
            r["b"].as_u64().unwrap() as usize,
        );
        assert_eq!(v["a"]["segments"][a]["text"], v["b"]["segments"][b]["text"]);
    }
    let models = case("model-comparison");
    let v = run(&[
        models.to_str().unwrap(),
        "--model",
        "smollm2-135m-instruct",
        "--model",
        "gemma-3-270m",
    ]);
    assert_eq!(v["a"]["model"], "smollm2-135m-instruct");
    assert_eq!(v["b"]["model"], "gemma-3-270m");
    assert_eq!(v["a"]["target"], "Italy.");
    let rows = v["rows"].as_array().unwrap();
    assert!(
        rows.iter().all(|r| r["a"].is_u64() && r["b"].is_u64()),
        "same text, same words"
    );
    assert_ne!(v["a"]["objective"], v["b"]["objective"]);
}
