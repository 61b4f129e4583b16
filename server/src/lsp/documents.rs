//! Open documents: text in a rope, the parse of it, and the salience result painted on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ropey::Rope;
use tower_lsp_server::lsp_types::{TextDocumentContentChangeEvent, Uri};

use super::convert::{self, Encoding};
use crate::analysis::Analysis;
use crate::engine::CancelToken;
use crate::prompt_file::{self, Granularity, PromptFile};
use crate::segments::{Level, LevelResult};

pub struct Painted {
    pub version: i32,
    pub analysis: Arc<Analysis>,
    pub granularity: Granularity,
    pub gain: f32,
    pub level: LevelResult,
    pub computed_at: Instant,
}

impl Painted {
    pub fn new(version: i32, analysis: Arc<Analysis>, granularity: Granularity, gain: f32) -> Self {
        let level = analysis.level(&Level::Standard(granularity), gain);
        Self {
            version,
            analysis,
            granularity,
            gain,
            level,
            computed_at: Instant::now(),
        }
    }
    /// Re-aggregates from the cached token scores: no model run.
    pub fn rerender(&mut self, granularity: Granularity, gain: f32) {
        self.granularity = granularity;
        self.gain = gain;
        self.level = self.analysis.level(&Level::Standard(granularity), gain);
    }
}

pub struct Document {
    pub rope: Rope,
    pub version: i32,
    pub parsed: PromptFile,
    pub painted: Option<Painted>,
    /// The computation running for this document, if any.
    pub running: Option<CancelToken>,
}

impl Document {
    pub fn new(text: &str, version: i32) -> Self {
        Self {
            rope: Rope::from_str(text),
            version,
            parsed: prompt_file::parse(text),
            painted: None,
            running: None,
        }
    }

    /// Applies edits in order. A result painted on the old text no longer matches it: it is
    /// dropped, and a computation still running for the old text is cancelled.
    pub fn apply(
        &mut self,
        version: i32,
        changes: Vec<TextDocumentContentChangeEvent>,
        enc: Encoding,
    ) {
        for change in changes {
            match change.range {
                Some(r) => {
                    let span = convert::byte_range(&self.rope, &r, enc);
                    let start = self.rope.byte_to_char(span.start);
                    let end = self.rope.byte_to_char(span.end);
                    self.rope.remove(start..end);
                    self.rope.insert(start, &change.text);
                }
                None => self.rope = Rope::from_str(&change.text),
            }
        }
        self.version = version;
        self.parsed = prompt_file::parse(&self.rope.to_string());
        self.painted = None;
        if let Some(c) = self.running.take() {
            c.cancel();
        }
    }
}

#[derive(Default)]
pub struct Documents {
    pub map: HashMap<Uri, Document>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_lsp_server::lsp_types::{Position, Range};

    fn edit(l0: u32, c0: u32, l1: u32, c1: u32, text: &str) -> TextDocumentContentChangeEvent {
        TextDocumentContentChangeEvent {
            range: Some(Range::new(Position::new(l0, c0), Position::new(l1, c1))),
            range_length: None,
            text: text.into(),
        }
    }

    #[test]
    fn incremental_edits_in_utf16_and_utf8() {
        let start = "😀 東京\r\nline two\n";
        let mut d = Document::new(start, 1);
        // UTF-16: the emoji is 2 units, so 東京 spans columns 3..5.
        d.apply(
            2,
            vec![edit(0, 3, 0, 5, "京都"), edit(1, 5, 1, 8, "2")],
            Encoding::Utf16,
        );
        assert_eq!(d.rope.to_string(), "😀 京都\r\nline 2\n");
        let mut d = Document::new(start, 1);
        // UTF-8: the emoji is 4 bytes, 東京 spans 5..11.
        d.apply(
            2,
            vec![edit(0, 5, 0, 11, "x"), edit(0, 6, 1, 0, "")],
            Encoding::Utf8,
        );
        assert_eq!(d.rope.to_string(), "😀 xline two\n");
        assert_eq!(d.version, 2);
    }

    #[test]
    fn an_edit_drops_the_painted_result_and_cancels_running_work() {
        let mut d = Document::new("Ask.\n", 1);
        let running = CancelToken::new();
        d.running = Some(running.clone());
        d.apply(2, vec![edit(0, 0, 0, 0, "Please ")], Encoding::Utf16);
        assert!(running.is_cancelled() && d.painted.is_none());
        assert_eq!(d.parsed.prompt_text(), "Please Ask.");
    }
}
