//! The client's process (`InitializeParams::process_id`): a server on stdio exits once it is
//! gone, as the LSP specification asks. Closing the server's input is how an editor normally
//! ends it, yet one server was found still running after the Neovim that started it had
//! exited (in a test run: every thread idle, 140 MiB resident); the process id is a check that
//! does not depend on the pipe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often the client's process is looked for.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Set by `run_stdio` only: a server driven in-process (the tests) never exits its process.
static EXIT_WITH_CLIENT: AtomicBool = AtomicBool::new(false);

/// Makes `watch` exit the process when the client's is gone.
pub fn exit_with_client() {
    EXIT_WITH_CLIENT.store(true, Ordering::Relaxed);
}

/// Watches process `pid` (the client's) from a task, if `exit_with_client` was called and
/// `pid` is this process's parent or one of its ancestors. A client that starts the server
/// through a container or a remote shell sends an id from another process namespace, which
/// means nothing here (or another process): that one is not watched.
pub fn watch(pid: u32) {
    if !EXIT_WITH_CLIENT.load(Ordering::Relaxed) {
        return;
    }
    if !is_ancestor(pid) {
        tracing::info!("the client's process {pid} does not start this one: not watched");
        return;
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if !is_running(pid) {
                tracing::warn!("the client (process {pid}) has exited: stopping");
                // Exit without `shutdown`: 1, as the specification has it for `exit`.
                std::process::exit(1);
            }
        }
    });
}

/// Whether process `pid` exists and is not a zombie (dead, waiting for its parent).
pub fn is_running(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(id) = libc::pid_t::try_from(pid) else {
            return true; // not a process id this system has: nothing to watch
        };
        // SAFETY: signal 0 sends nothing; it only checks that the process exists.
        let exists = unsafe { libc::kill(id, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        let zombie = stat_after_name(pid).is_some_and(|s| s.starts_with('Z'));
        exists && !zombie
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Whether `pid` is this process's parent, its parent's parent, and so on.
fn is_ancestor(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let mut at = std::os::unix::process::parent_id();
        for _ in 0..64 {
            if at == pid {
                return true;
            }
            match parent_of(at) {
                Some(parent) if parent != 0 && parent != at => at = parent,
                _ => return false,
            }
        }
        false
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        false
    }
}

/// The parent of process `pid`.
#[cfg(unix)]
fn parent_of(pid: u32) -> Option<u32> {
    stat_after_name(pid)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `/proc/PID/stat` after the process's name ("PID (NAME) STATE PPID ..." gives
/// "STATE PPID ..."): the name may hold spaces and parentheses. None where there is none.
#[cfg(unix)]
fn stat_after_name(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat[stat.rfind(')')? + 1..].trim_start().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_running_until_it_has_exited() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(is_running(child.id()));
        child.kill().unwrap();
        // Dead but not yet reaped: a zombie counts as gone.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!is_running(child.id()));
        child.wait().unwrap();
        assert!(!is_running(child.id()));
    }

    #[test]
    fn the_parent_and_its_ancestors_are_ancestors_and_nothing_else_is() {
        let parent = std::os::unix::process::parent_id();
        assert!(is_ancestor(parent));
        assert!(is_ancestor(1) || parent_of(parent).is_none());
        assert!(!is_ancestor(std::process::id()));
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        assert!(!is_ancestor(child.id()));
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
