//! What the tests that run `prompt-salience bench` share.

/// The cells of the markdown rows whose first cell is `first`.
pub fn rows<'a>(out: &'a str, first: &str) -> Vec<Vec<&'a str>> {
    out.lines()
        .filter_map(|l| l.strip_prefix("| ")?.strip_suffix(" |"))
        .map(|l| l.split(" | ").collect::<Vec<_>>())
        .filter(|cells| cells[0] == first)
        .collect()
}

/// `bench` on SmolLM2 (fetched if missing), gradient salience only at `length` tokens, then
/// 2 decoded tokens.
pub fn gradient_bench(length: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_prompt-salience"));
    command
        .env("PROMPT_SALIENCE_ALLOW_NETWORK", "1")
        .args([
            "bench",
            "--model",
            "smollm2-135m-instruct",
            "--lengths",
            length,
        ])
        .args([
            "--ig-lengths",
            "--perturbation-lengths",
            "--generate-tokens",
            "2",
        ]);
    command
}
