//! The `salience` command on a Hugging Face directory and on a GGUF file: the interface other
//! tools check against (`--json` with prompt_tokens, target_tokens and objective), on the
//! tiny fixture models with float64 references (`tests/fixtures/`).

use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn salience_json(model: &PathBuf, prompt: &str, target: &str, method: &str) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
        .args(["salience", "--model"])
        .arg(model)
        .args(["--template", "raw", "--prompt", prompt, "--target", target])
        .args(["--method", method, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn salience_json_is_the_same_for_a_directory_and_a_gguf_file() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qwen2/reference.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["cases"][0];
    let (prompt, target) = (
        case["prompt"].as_str().unwrap(),
        case["target"].as_str().unwrap(),
    );
    let dir = salience_json(&fixtures().join("qwen2"), prompt, target, "grad_dot_input");
    let gguf = salience_json(
        &fixtures().join("qwen2.gguf"),
        prompt,
        target,
        "grad_dot_input",
    );
    for out in [&dir, &gguf] {
        let tokens = out["prompt_tokens"].as_array().unwrap();
        let want = case["prompt_tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), want.len());
        for ((t, w), score) in tokens
            .iter()
            .zip(want)
            .zip(case["grad_dot_input"].as_array().unwrap())
        {
            assert_eq!(t["id"], w["id"]);
            assert_eq!(t["start"], w["start"]);
            assert_eq!(t["end"], w["end"]);
            let (ours, theirs) = (t["score"].as_f64().unwrap(), score.as_f64().unwrap());
            assert!(
                (ours - theirs).abs() <= 1e-3 * theirs.abs().max(1e-2),
                "{ours} vs {theirs}"
            );
        }
        let target_ids: Vec<&serde_json::Value> = out["target_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["id"])
            .collect();
        let want_ids: Vec<&serde_json::Value> =
            case["target_ids"].as_array().unwrap().iter().collect();
        assert_eq!(target_ids, want_ids);
        let objective = out["objective"].as_f64().unwrap();
        let want = case["objective"].as_f64().unwrap();
        assert!(
            (objective - want).abs() <= 1e-4 * want.abs(),
            "{objective} vs {want}"
        );
    }
}

#[test]
fn unusable_model_paths_are_clear_errors() {
    let run = |model: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
            .args(["salience", "--model"])
            .arg(model)
            .args(["--template", "raw", "--prompt", "a", "--target", "b"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let empty = std::env::temp_dir().join(format!("ps-empty-dir-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert!(
        run(&empty).contains("without config.json"),
        "{}",
        run(&empty)
    );
    // A directory with only pickle weights is refused, never loaded.
    let pickle = std::env::temp_dir().join(format!("ps-pickle-dir-{}", std::process::id()));
    std::fs::create_dir_all(&pickle).unwrap();
    std::fs::copy(
        fixtures().join("qwen2/config.json"),
        pickle.join("config.json"),
    )
    .unwrap();
    std::fs::write(pickle.join("pytorch_model.bin"), b"not loaded").unwrap();
    let err = run(&pickle);
    assert!(err.contains("pickle"), "{err}");
    // An architecture the engine does not run names the ones it does.
    let other = std::env::temp_dir().join(format!("ps-gpt2-dir-{}", std::process::id()));
    std::fs::create_dir_all(&other).unwrap();
    for f in ["tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("qwen2").join(f), other.join(f)).unwrap();
    }
    std::fs::write(other.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let err = run(&other);
    assert!(err.contains("gpt2") && err.contains("qwen3"), "{err}");
    for d in [empty, pickle, other] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
