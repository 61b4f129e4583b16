//! The models issue's memory goal through the real binary: a 600-token gradient salience pass
//! on the default model peaks under 600 MiB of resident memory with the tape keeping every
//! layer, also over repeated passes (where an allocator that places its blocks differently
//! each time made the peak creep past it: `allocator.rs`).

mod common;
use common::rows;

#[test]
fn repeated_600_token_passes_peak_under_600_mib() {
    let out = common::gradient_bench("600")
        .args(["--repeat", "5"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // | prompt tokens | method | seconds (best of 5) | first run | peak RSS MiB |
    let row = &rows(&stdout, "600")[0];
    assert_eq!(row[1], "grad_dot_input", "{stdout}");
    let peak: f64 = row[4].parse().expect("a peak RSS figure (Linux)");
    assert!(peak < 600.0, "peak RSS {peak} MiB:\n{stdout}");
}
