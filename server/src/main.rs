fn main() -> std::process::ExitCode {
    prompt_salience::cli::main()
}
