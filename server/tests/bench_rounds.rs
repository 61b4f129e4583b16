//! `bench --rounds N --baseline-python PY`: the rounds alternate which side runs first (PyTorch
//! right before or after each piece of work of ours, from one process started once), and the
//! summary's medians are those of the ratios each round printed. The baselines are a stand-in
//! Python that answers with a different time each call, so the test knows every ratio.

mod common;
use common::rows;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;

/// A "python" that imports anything and whose PyTorch script, a server (`--serve`), answers
/// 0.01, 0.02, 0.03, ... seconds, 0.01 more each request, and whose llama.cpp script decodes
/// 1000 tokens/s. Each script appends the instruction-set caps it was given to `torch-env` or
/// `llama-env`; the server appends each request to `torch-requests`.
fn stand_in_python(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("python");
    let script = format!(
        r#"#!/bin/sh
[ "$1" = "-c" ] && exit 0
count={dir}/torch-calls
case "$1" in
  *pytorch_baseline.py)
    case "$*" in *--serve*) ;; *) echo "not a server: $*" >&2; exit 1 ;; esac
    echo "$MKL_ENABLE_INSTRUCTIONS/$ONEDNN_MAX_CPU_ISA/$ATEN_CPU_CAPABILITY" >> {dir}/torch-env
    echo 'a notice on stdout'
    echo '{{"baseline": "pytorch", "version": "stand-in"}}'
    while read -r request; do
      n=$(( $(cat "$count" 2>/dev/null || echo 0) + 1 )); echo $n > "$count"
      echo "$request" >> {dir}/torch-requests
      echo '{{"method": "grad_dot_input", "prompt_tokens": 8, "seconds": 0.0'$n'}}'
    done ;;
  *llama_cpp_baseline.py)
    echo "$MKL_ENABLE_INSTRUCTIONS/$ONEDNN_MAX_CPU_ISA/$ATEN_CPU_CAPABILITY" >> {dir}/llama-env
    echo '{{"version": "stand-in", "prefill_seconds": 2.0, "decode_tokens_per_second": 1000.0}}' ;;
esac
"#,
        dir = dir.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `bench` on SmolLM2 with 8-token prompts and 2 decoded tokens, once, against `python`.
fn short_bench(python: &std::path::Path) -> std::process::Command {
    let mut command = common::gradient_bench("8");
    command
        .args(["--repeat", "1", "--baseline-python"])
        .arg(python);
    command
}

#[test]
fn rounds_alternate_and_report_median_ratios() {
    let dir = std::env::temp_dir().join(format!("bench-rounds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let python = stand_in_python(&dir);
    // One file for stdout and stderr keeps their order: which side ran first shows.
    let log = dir.join("log");
    let file = std::fs::File::create(&log).unwrap();
    let status = short_bench(&python)
        .args(["--rounds", "3"])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .unwrap();
    let mut out = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let requests = std::fs::read_to_string(dir.join("torch-requests")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "{out}");

    // Round 1: ours first; round 2: the baselines first; round 3: ours first. PyTorch started
    // once, before the first round, and timed the same work as ours, once a round.
    assert_eq!(
        out.matches("starting the pytorch_baseline.py").count(),
        1,
        "{out}"
    );
    let rounds: Vec<&str> = out.split("## round ").skip(1).collect();
    assert_eq!(rounds.len(), 3, "{out}");
    for (i, round) in rounds.iter().enumerate() {
        let ours = round.find("| 8 | grad_dot_input").expect("our timing");
        let theirs = round
            .find("pytorch_baseline.py: grad_dot_input, 8 tokens: ")
            .expect("baseline");
        assert_eq!(theirs < ours, i == 1, "round {}:\n{round}", i + 1);
        let llama = round
            .find("running the llama_cpp_baseline.py")
            .expect("llama.cpp");
        assert_eq!(llama < ours, i == 1, "round {}:\n{round}", i + 1);
    }
    let requests: Vec<serde_json::Value> = requests
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!(r["method"], "grad_dot_input");
        assert_eq!(r["prompt_tokens"], 8);
    }

    // Each round's ratio is our time over the stand-in's 0.01, 0.02, 0.03 seconds.
    let our_rows = rows(&out, "8");
    let ours: Vec<f64> = our_rows
        .iter()
        .map(|cells| cells[2].parse().unwrap())
        .collect();
    // Our rows: GFLOP, GFLOP/s (GFLOP over the best time) and its share of the multiply-add
    // limit measured before the row, "NN % of LIMIT".
    let arithmetic: Vec<(f64, f64)> = our_rows
        .iter()
        .map(|cells| {
            let (gflop, rate): (f64, f64) = (cells[5].parse().unwrap(), cells[6].parse().unwrap());
            let seconds: f64 = cells[2].parse().unwrap();
            let (share, limit) = cells[7].split_once(" % of ").expect("share of the limit");
            let (share, limit): (f64, f64) = (share.parse().unwrap(), limit.parse().unwrap());
            assert!(gflop > 1.0 && limit > 1.0, "{cells:?}");
            let want = gflop / seconds;
            assert!((rate - want).abs() <= 0.5 + 0.06 * want, "{cells:?}");
            let want = 100.0 * rate / limit;
            assert!((share - want).abs() <= 1.0 + 0.02 * want, "{cells:?}");
            (gflop, limit)
        })
        .collect();
    let printed = rows(&out, "gradient salience, 8 tokens");
    assert_eq!((ours.len(), printed.len()), (3, 4), "{out}");
    let mut ratios = Vec::new();
    for (k, (cells, mine)) in printed.iter().zip(&ours).enumerate() {
        let ratio: f64 = cells[3].parse().unwrap();
        let expected = mine / (0.01 * (k + 1) as f64);
        // Our time is printed to a thousandth of a second, the ratio to a hundredth.
        let tolerance = 0.0005 / mine * expected + 0.006;
        assert!(
            (ratio - expected).abs() < tolerance,
            "round {k}: {ratio} vs {expected}"
        );
        ratios.push(ratio);
        // At the multiply-add limit: the row's arithmetic at the limit over the stand-in's time.
        let (gflop, limit) = arithmetic[k];
        let floor: f64 = cells[4].parse().unwrap();
        let expected = gflop / limit / (0.01 * (k + 1) as f64);
        assert!(
            (floor - expected).abs() < 0.006 + 0.01 * expected,
            "round {k}: {floor} vs {expected}"
        );
    }
    // The summary row: the median of the three, the lowest and highest, each round's.
    let summary = &printed[3];
    ratios.sort_by(f64::total_cmp);
    assert_eq!(summary[1], format!("{:.2}", ratios[1]), "{summary:?}");
    assert_eq!(
        summary[2],
        format!("{:.2} – {:.2}", ratios[0], ratios[2]),
        "{summary:?}"
    );
    assert_eq!(summary[3].split(" / ").count(), 3, "{summary:?}");
    let mut floors: Vec<f64> = printed[..3].iter().map(|c| c[4].parse().unwrap()).collect();
    floors.sort_by(f64::total_cmp);
    assert_eq!(summary[4], format!("{:.2}", floors[1]), "{summary:?}");
    // Decoding is summarized as a speed against the stand-in's 1000 tokens/s.
    let decoding = rows(&out, "greedy decoding");
    assert!(decoding[3][1].starts_with("speed "), "{decoding:?}");
}

#[test]
fn a_decoding_run_of_fewer_than_two_tokens_is_refused_before_any_work() {
    for n in ["0", "1"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
            .args(["bench", "--model", "no-such-model", "--generate-tokens", n])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{n}: {stderr}");
        assert!(
            stderr.contains("give no decoding speed") && stderr.contains("use 2 or more"),
            "{n}: {stderr}"
        );
    }
}

/// `PROMPT_SALIENCE_KERNEL=avx2` (on a CPU with AVX2, as this project's machines have) caps the
/// PyTorch baseline to AVX2 as well (MKL, oneDNN and ATen), and not llama.cpp, whose kernels
/// its build fixed; a cap the user set for PyTorch stays.
#[test]
fn a_capped_kernel_caps_the_pytorch_baseline_alike() {
    let dir = std::env::temp_dir().join(format!("bench-caps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let python = stand_in_python(&dir);
    let out = short_bench(&python)
        .env("PROMPT_SALIENCE_KERNEL", "avx2")
        .env("ATEN_CPU_CAPABILITY", "mine")
        .env_remove("MKL_ENABLE_INSTRUCTIONS")
        .env_remove("ONEDNN_MAX_CPU_ISA")
        .output()
        .unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let (torch, llama) = (read("torch-env"), read("llama-env"));
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(torch.trim(), "AVX2/AVX2/mine", "{stdout}");
    assert_eq!(llama.trim(), "//mine", "{stdout}");
    assert!(
        stdout.contains(
            "PyTorch baseline runs with MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2;"
        ),
        "{stdout}"
    );
}
