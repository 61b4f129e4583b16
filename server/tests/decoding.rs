//! Decoding with the integer dots (activations rounded to 15 bits) against the f32 dots
//! (`PROMPT_SALIENCE_EXACT_DECODING=1`), on the real models: the greedy continuations are the
//! same text. Gemma 3 270M's Q4_K and Q6_K matrices take the integer path on every CPU with
//! AVX2; its Q5_0 and Q8_0 matrices, and SmolLM2's Q4_1 and Q8_0 ones, where AVX2 is the
//! widest kernel.

fn generate(model: &str, template: &str, prompt: &str, exact: bool) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
        // Tests fetch the models they need (or fail).
        .env("PROMPT_SALIENCE_ALLOW_NETWORK", "1")
        .env(
            "PROMPT_SALIENCE_EXACT_DECODING",
            if exact { "1" } else { "0" },
        )
        .args(["generate", "--model", model, "--template", template])
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

fn same_continuations(model: &str, template: &str, prompts: &[&str]) {
    for prompt in prompts {
        let exact = generate(model, template, prompt, true);
        assert!(exact.trim().len() > 20, "{model}, {prompt:?}: {exact:?}");
        assert_eq!(
            generate(model, template, prompt, false),
            exact,
            "{model}, {prompt:?}"
        );
    }
}

#[test]
fn rounded_activations_keep_gemmas_greedy_continuations() {
    same_continuations(
        "gemma-3-270m",
        "raw",
        &[
            "The capital of France is",
            "def fibonacci(n):",
            "Photosynthesis converts",
            "Le chat est assis sur",
        ],
    );
}

#[test]
fn rounded_activations_keep_smollm2s_greedy_continuations() {
    same_continuations(
        "smollm2-135m-instruct",
        "chat",
        &[
            "Write a haiku about the sea.",
            "Explain photosynthesis to a child.",
            "What is 17 times 23?",
        ],
    );
}
