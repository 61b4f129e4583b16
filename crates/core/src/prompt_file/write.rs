//! Writing a response into a prompt file: only the response section changes, and only if the
//! file on disk is still what was read.

use std::io::Write;
use std::path::Path;

use super::{PromptFile, RESPONSE_MARKER};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0} changed on disk since it was read: not overwriting it (run again)")]
    ChangedOnDisk(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The file's text with the response section replaced by `response` (the marker is added
/// when missing). Every byte before the response section is kept as it is.
pub fn with_response(file: &PromptFile, response: &str) -> String {
    let text = &file.text;
    let eol = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let response = response.trim_end();
    let mut out = String::with_capacity(text.len() + response.len() + 32);
    match &file.marker {
        Some(marker) => {
            out.push_str(&text[..marker.end]);
            if !out.ends_with('\n') {
                out.push_str(eol);
            }
        }
        None => {
            out.push_str(text);
            if !out.is_empty() && !out.ends_with('\n') {
                out.push_str(eol);
            }
            out.push_str(eol);
            out.push_str(RESPONSE_MARKER);
            out.push_str(eol);
        }
    }
    out.push_str(&response.replace("\r\n", "\n").replace('\n', eol));
    out.push_str(eol);
    out
}

/// Replaces `path` with `text` through a temporary file and a rename, unless the file no
/// longer holds `original`. The file is compared again after the temporary file is written and
/// synced, right before the rename, so a save made meanwhile is never overwritten; the
/// temporary file is removed on every path (and one left by a killed run is removed the next
/// time).
pub fn write_if_unchanged(path: &Path, original: &[u8], text: &str) -> Result<(), WriteError> {
    write_if_unchanged_then(path, original, text, || {})
}

/// Prefix of the temporary files, so a stale one (its writer was killed) can be recognised.
fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.prompt-salience-")
}

fn write_if_unchanged_then(
    path: &Path,
    original: &[u8],
    text: &str,
    before_rename: impl FnOnce(),
) -> Result<(), WriteError> {
    let io = |source| WriteError::Io {
        path: path.display().to_string(),
        source,
    };
    let unchanged = || -> Result<(), WriteError> {
        if std::fs::read(path).map_err(io)? != original {
            return Err(WriteError::ChangedOnDisk(path.display().to_string()));
        }
        Ok(())
    };
    unchanged()?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let prefix = temp_prefix(path);
    remove_stale_temp_files(dir, &prefix);
    // Removed when dropped: on every early return below.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(text.as_bytes()).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(tmp.path(), meta.permissions());
    }
    before_rename();
    unchanged()?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Temporary files of this kind older than a minute belong to a writer that was killed.
fn remove_stale_temp_files(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > 60);
        if name.starts_with(prefix) && name.ends_with(".tmp") && stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt_file::parse;
    use rand::{Rng, SeedableRng};

    /// A save between the first comparison and the rename is kept, and no temporary file is
    /// left behind.
    #[test]
    fn a_save_during_the_write_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.prompt.md");
        std::fs::write(&path, "Ask.\n").unwrap();
        let err =
            write_if_unchanged_then(&path, b"Ask.\n", "Ask.\n\n<!-- response -->\nNo.\n", || {
                std::fs::write(&path, "Ask politely.\n").unwrap()
            })
            .unwrap_err();
        assert!(matches!(err, WriteError::ChangedOnDisk(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "Ask politely.\n");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // Without a save in between, the write goes through.
        write_if_unchanged(&path, b"Ask politely.\n", "Ask politely.\nYes.\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "Ask politely.\nYes.\n"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn adds_the_marker_when_missing() {
        let f = parse("Ask me.");
        assert_eq!(
            with_response(&f, "Sure."),
            "Ask me.\n\n<!-- response -->\nSure.\n"
        );
        let f = parse("Ask me.\r\nPlease.\r\n");
        assert_eq!(
            with_response(&f, "Sure.\nOK."),
            "Ask me.\r\nPlease.\r\n\r\n<!-- response -->\r\nSure.\r\nOK.\r\n"
        );
    }

    #[test]
    fn replaces_only_the_response() {
        let f = parse("---\na: 1\n---\nQ\n<!-- response -->\nold\nanswer\n");
        assert_eq!(
            with_response(&f, "new"),
            "---\na: 1\n---\nQ\n<!-- response -->\nnew\n"
        );
    }

    /// Property: for random files, every byte before the response section survives, and the
    /// result parses back to the same prompt and the new response.
    #[test]
    fn never_changes_bytes_before_the_response() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let pieces = [
            "---\n",
            "salience:\n",
            "  method: grad_l2\n",
            "Hello",
            " world",
            "\n",
            "\r\n",
            "\n\n",
            "<!-- response -->",
            "<!-- response -->\n",
            "é東京👩‍👩‍👧",
            "- item\n",
            "```\ncode\n```\n",
            "  ",
            "\t",
            "---",
            "...\n",
        ];
        for _ in 0..2000 {
            let n = rng.random_range(0..12);
            let text: String = (0..n)
                .map(|_| pieces[rng.random_range(0..pieces.len())])
                .collect();
            let f = parse(&text);
            let keep = f.marker.as_ref().map_or(text.len(), |m| m.end);
            let response = ["A reply.", "two\nlines", ""][rng.random_range(0..3)];
            let out = with_response(&f, response);
            assert!(out.starts_with(&text[..keep]), "{text:?} -> {out:?}");
            let back = parse(&out);
            assert_eq!(back.prompt_text(), f.prompt_text(), "{text:?} -> {out:?}");
            assert_eq!(
                back.response_text().replace("\r\n", "\n"),
                response.trim(),
                "{text:?} -> {out:?}"
            );
        }
    }

    #[test]
    fn refuses_when_the_file_changed_and_writes_atomically_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.prompt.md");
        std::fs::write(&p, "Q\n").unwrap();
        let err = write_if_unchanged(&p, b"something else", "X").unwrap_err();
        assert!(matches!(err, WriteError::ChangedOnDisk(_)));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "Q\n");
        write_if_unchanged(&p, b"Q\n", "Q\n\n<!-- response -->\nA\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "Q\n\n<!-- response -->\nA\n"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
