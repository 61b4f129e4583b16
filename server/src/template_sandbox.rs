//! Chat templates rendered in a child process with a memory limit.
//!
//! A chat template comes inside the model file, from anyone. The engine bounds its work (fuel)
//! and its output, but not the strings it builds: `{% set s = s ~ s %}` forty times asks for a
//! terabyte, and a failed allocation aborts the whole process. So the binary renders every
//! template in a child (`prompt-salience __render-template`, the job as JSON on stdin) whose
//! address space is capped: a hostile template kills only the child, and the caller gets an
//! error.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use salience_engine::chat_template::TemplateJob;
use salience_engine::EngineError;

/// The child's address space: room for mimalloc's reservations and a large prompt, far below
/// what a doubling template asks for.
const MEMORY_LIMIT: u64 = 4 << 30;
/// Fuel already bounds the work; this catches anything else that hangs.
const TIME_LIMIT: Duration = Duration::from_secs(20);

/// The hidden subcommand that runs in the child.
pub const SUBCOMMAND: &str = "__render-template";

/// [`salience_engine::chat_template::Isolation`] for this binary.
pub fn render(job: &TemplateJob) -> Result<String, EngineError> {
    let exe = std::env::current_exe()
        .map_err(|e| EngineError::Template(format!("cannot find this program to render: {e}")))?;
    render_with(&exe, job)
}

/// Renders `job` in a child process of `exe` (this binary).
pub fn render_with(exe: &Path, job: &TemplateJob) -> Result<String, EngineError> {
    let failed = |m: String| EngineError::Template(m);
    let mut child = Command::new(exe)
        .arg(SUBCOMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| failed(format!("cannot start the renderer: {e}")))?;
    let input = serde_json::to_vec(job).expect("json");
    let mut stdin = child.stdin.take().expect("piped");
    // Written from a thread: a child that stops reading must not block us.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| failed(e.to_string()))? {
            break status;
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!(
                "rendering took more than {} s: refused",
                TIME_LIMIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = writer.join();
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(failed(format!(
            "the template needed more than {} GiB of memory (or crashed its renderer): refused",
            MEMORY_LIMIT >> 30
        )));
    }
    let answer: Result<String, String> = serde_json::from_slice(&out)
        .map_err(|e| failed(format!("the renderer's answer is unreadable: {e}")))?;
    answer.map_err(failed)
}

/// The child: caps its own address space, renders the job from stdin, answers on stdout.
pub fn child_main() -> std::process::ExitCode {
    limit_memory();
    let mut input = Vec::new();
    if std::io::stdin().read_to_end(&mut input).is_err() {
        return std::process::ExitCode::FAILURE;
    }
    let answer: Result<String, String> = match serde_json::from_slice::<TemplateJob>(&input) {
        Ok(job) => job.render().map_err(|e| match e {
            EngineError::Template(m) => m,
            other => other.to_string(),
        }),
        Err(e) => Err(format!("bad job: {e}")),
    };
    let out = serde_json::to_vec(&answer).expect("json");
    let mut stdout = std::io::stdout();
    if stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(unix)]
fn limit_memory() {
    let limit = libc::rlimit {
        rlim_cur: MEMORY_LIMIT as libc::rlim_t,
        rlim_max: MEMORY_LIMIT as libc::rlim_t,
    };
    // SAFETY: setrlimit reads a plain struct; it only lowers this process's own limit.
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &limit);
    }
}

#[cfg(not(unix))]
fn limit_memory() {}
