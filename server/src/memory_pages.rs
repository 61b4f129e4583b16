//! Which page size the process's memory gets: small (4 KiB) pages, not transparent huge pages.
//!
//! mimalloc asks the kernel for huge pages on its arenas (`MADV_HUGEPAGE`). On this project's
//! CI and bench machines (Firecracker VMs with free-page reporting) a huge page that the
//! process touches for the first time was slow to get: a salience pass that faults in its
//! activations (the first one in a process, or the first after mimalloc returned memory)
//! spent 1.4–1.9 s in the kernel instead of 0.4–0.6 s. Measured with `bench`, three alternating
//! rounds each: first runs at 100 / 300 / 600 tokens 0.38–0.40 / 0.74–0.78 / 1.28–1.50 s with
//! huge pages, 0.24–0.25 / 0.55–0.59 / 1.16–1.17 s without; later runs the same within noise
//! (0.21–0.22 / 0.51–0.56 / 1.12–1.14 s against 0.21–0.22 / 0.51–0.53 / 1.11–1.15 s, the
//! latter with the larger tape budget that the lower memory pays for); peak RSS 30–60 MiB
//! lower, since a huge page counts whole however little of it is used.
//!
//! Setting `MIMALLOC_ALLOW_THP` (mimalloc's own option) leaves the choice to mimalloc.

/// Turns transparent huge pages off for this process and the processes it starts, unless the
/// user set `MIMALLOC_ALLOW_THP`. Returns whether it did. Call it first thing in `main`: it
/// applies to pages touched afterwards, in every mapping.
pub fn small_pages_only() -> bool {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return false;
    }
    set_thp_disabled(true)
}

/// Gives a child process that is not ours (the bench's PyTorch and llama.cpp baselines) the
/// system's page policy back, so that it runs as it would on its own.
pub fn system_pages_for(command: &mut std::process::Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only calls prctl, which is async-signal-safe, and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = command;
}

#[cfg(target_os = "linux")]
fn set_thp_disabled(disabled: bool) -> bool {
    // SAFETY: a plain prctl call with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, disabled as libc::c_ulong, 0, 0, 0) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn set_thp_disabled(_: bool) -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The `THP_enabled` line of a process's status: 0 where huge pages are off for it.
    fn thp_enabled_of(status: &str) -> Option<&str> {
        status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(str::trim)
    }

    fn child_status(restore: bool) -> String {
        let mut cat = std::process::Command::new("cat");
        cat.arg("/proc/self/status");
        if restore {
            system_pages_for(&mut cat);
        }
        let out = cat.output().expect("cat runs");
        String::from_utf8(out.stdout).expect("status is text")
    }

    #[test]
    fn huge_pages_are_off_here_and_back_for_baselines() {
        let own = std::fs::read_to_string("/proc/self/status").expect("status");
        let Some(initial) = thp_enabled_of(&own).map(str::to_string) else {
            panic!("this kernel's /proc/self/status has no THP_enabled line (Linux < 5.0?)");
        };
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            assert!(!small_pages_only(), "the user's setting wins");
            return;
        }
        assert!(small_pages_only(), "prctl(PR_SET_THP_DISABLE) failed");
        let own = std::fs::read_to_string("/proc/self/status").expect("status");
        assert_eq!(thp_enabled_of(&own), Some("0"));
        // Children inherit the setting, except those handed back the system's policy.
        assert_eq!(thp_enabled_of(&child_status(false)), Some("0"));
        assert_eq!(thp_enabled_of(&child_status(true)), Some(initial.as_str()));
    }
}
