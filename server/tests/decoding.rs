//! Decoding with the integer dots (activations rounded to 15 bits) against the f32 dots
//! (`PROMPT_SALIENCE_EXACT_DECODING=1`), on the real Gemma 3 270M file, whose Q4_K and Q6_K
//! matrices (and, on CPUs whose widest kernel is AVX2, its Q8_0 output head) take the integer
//! path: the greedy continuations are the same text.

fn generate(prompt: &str, exact: bool) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
        // Tests fetch the models they need (or fail).
        .env("PROMPT_SALIENCE_ALLOW_NETWORK", "1")
        .env(
            "PROMPT_SALIENCE_EXACT_DECODING",
            if exact { "1" } else { "0" },
        )
        .args(["generate", "--model", "gemma-3-270m", "--template", "raw"])
        .args(["--prompt", prompt, "--max-new-tokens", "48"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rounded_activations_keep_gemmas_greedy_continuations() {
    for prompt in [
        "The capital of France is",
        "def fibonacci(n):",
        "Photosynthesis converts",
        "Le chat est assis sur",
    ] {
        let exact = generate(prompt, true);
        assert!(exact.trim().len() > 20, "{prompt:?}: {exact:?}");
        assert_eq!(generate(prompt, false), exact, "{prompt:?}");
    }
}
