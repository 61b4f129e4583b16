//! Open documents: text in a rope, the parse of it, and the salience result painted on it.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use ropey::Rope;
use tower_lsp_server::lsp_types::{TextDocumentContentChangeEvent, Uri};

use super::convert::{self, Encoding};
use salience_core::analysis::Analysis;
use salience_core::compare;
use salience_core::faithfulness::Faithfulness;
use salience_core::prompt_file::{self, PromptFile};
use salience_core::segments::{LevelResult, Segmentation};
use salience_engine::CancelToken;

pub struct Painted {
    pub version: i32,
    pub analysis: Arc<Analysis>,
    /// The model as the worker names it, to run more work on the same model.
    pub model: String,
    /// The segments painted (a granularity, or the file's custom separators).
    pub segmentation: Segmentation,
    pub gain: f32,
    /// What is painted: the scores, or their change since `previous` when `difference` is set.
    pub level: LevelResult,
    pub computed_at: Instant,
    /// The result painted before this one (on this text or an earlier version of it).
    pub previous: Option<Arc<Analysis>>,
    /// Per painted segment: its score in `previous`, where it still exists.
    pub before: Vec<Option<f32>>,
    pub difference: bool,
    /// Edits since the map was computed, in order: the byte range replaced (in the text as it
    /// was then) and the length of the text put in its place.
    pub edits: Vec<(Range<usize>, usize)>,
    /// Why the result before this one is not compared with it (another target, method,
    /// contrast or model), if so.
    pub incomparable: Option<String>,
    /// Deletion tests done for this map, by segmentation name.
    pub faithfulness: HashMap<String, Faithfulness>,
}

impl Painted {
    pub fn new(
        version: i32,
        analysis: Arc<Analysis>,
        model: String,
        segmentation: Segmentation,
        gain: f32,
        previous: Option<Arc<Analysis>>,
    ) -> Self {
        let mut p = Self {
            version,
            // Filled by `rerender` below.
            level: LevelResult::default(),
            analysis,
            model,
            segmentation: segmentation.clone(),
            gain,
            computed_at: Instant::now(),
            previous,
            before: Vec::new(),
            difference: false,
            edits: Vec::new(),
            incomparable: None,
            faithfulness: HashMap::new(),
        };
        p.rerender(segmentation, gain);
        p
    }

    /// Re-aggregates from the cached token scores: no model run.
    pub fn rerender(&mut self, segmentation: Segmentation, gain: f32) {
        self.segmentation = segmentation;
        self.gain = gain;
        let level = &self.segmentation;
        let now = self.analysis.level(level, gain);
        self.before = match &self.previous {
            Some(prev) => compare::previous_scores(
                &prev.text,
                &prev.level(level, gain),
                &self.analysis.text,
                &now,
            ),
            None => vec![None; now.segments.len()],
        };
        if !self.difference {
            self.level = now;
            return;
        }
        // The change since the previous result, on the segments that still exist.
        let (ranges, changes): (Vec<_>, Vec<_>) = now
            .segments
            .iter()
            .zip(&self.before)
            .filter_map(|(s, b)| Some((s.start..s.end, (s.score - (*b)?, *b))))
            .unzip();
        let (scores, before): (Vec<f32>, Vec<Option<f32>>) = changes.into_iter().unzip();
        self.before = before;
        self.level = LevelResult::from_scores(
            format!("{} (change)", now.name),
            &ranges,
            &scores,
            0.0,
            0.0,
            gain,
        );
    }

    /// Paints the change since the previous result (or the scores again).
    pub fn set_difference(&mut self, on: bool) {
        self.difference = on;
        self.rerender(self.segmentation.clone(), self.gain);
    }

    /// Where `r`, a range of the text the map was computed on, lies in the document now, and
    /// whether an edit touched it (then the range covers what replaced it).
    pub fn now(&self, r: &Range<usize>) -> (Range<usize>, bool) {
        map_through(&self.edits, r)
    }

    /// Whether the text changed since the map was computed.
    pub fn edited(&self) -> bool {
        !self.edits.is_empty()
    }

    /// The faithfulness check of the painted segmentation, once it has run.
    pub fn faithfulness(&self) -> Option<&Faithfulness> {
        self.faithfulness.get(&self.segmentation.name())
    }

    /// The painted segment's score in the previous result, where it existed.
    pub fn before_of(&self, index: usize) -> Option<f32> {
        self.before.get(index).copied().flatten()
    }
}

/// Maps `r` through `edits` (each a byte range replaced, in the text as it was then, and the
/// length of its replacement): where it lies after them, and whether one touched it.
pub fn map_through(edits: &[(Range<usize>, usize)], r: &Range<usize>) -> (Range<usize>, bool) {
    let (mut start, mut end, mut touched) = (r.start, r.end, false);
    for (old, new_len) in edits {
        let shift = |x: usize| x + new_len - old.len();
        touched |= if old.is_empty() {
            start < old.start && old.start < end
        } else {
            start < old.end && old.start < end
        };
        (start, end) = (
            if start < old.start {
                start
            } else if start >= old.end {
                shift(start)
            } else {
                old.start
            },
            if end <= old.start {
                end
            } else if end >= old.end {
                shift(end)
            } else {
                old.start + new_len
            },
        );
    }
    (start..end, touched)
}

/// What changed between two results that makes their scores incomparable, if anything.
pub fn incomparable(previous: &Analysis, now: &Analysis) -> Option<String> {
    let mut changed = Vec::new();
    if previous.model != now.model {
        changed.push(format!("model ({} → {})", previous.model, now.model));
    }
    if previous.method != now.method {
        changed.push(format!(
            "method ({} → {})",
            previous.method.name(),
            now.method.name()
        ));
    }
    if previous.target_text() != now.target_text() {
        changed.push("target".to_string());
    }
    let contrast = |a: &Analysis| a.contrast.as_ref().map(|c| c.text.clone());
    if contrast(previous) != contrast(now) {
        changed.push("contrast".to_string());
    }
    (!changed.is_empty()).then(|| {
        format!(
            "not compared with the previous result: {} changed",
            changed.join(", ")
        )
    })
}

pub struct Document {
    pub rope: Rope,
    pub version: i32,
    /// The parse of `rope`, made when first needed after an edit: typing in a large document
    /// does not re-parse it on every keystroke.
    parsed: OnceCell<PromptFile>,
    pub painted: Option<Painted>,
    /// The computation running for this document, if any.
    pub running: Option<CancelToken>,
    /// The faithfulness check running in the background, if any.
    pub checking: Option<CancelToken>,
    /// The last result painted, kept across edits to compare the next one with.
    pub previous: Option<Arc<Analysis>>,
}

impl Document {
    /// The prompt file as the text now reads.
    pub fn parsed(&self) -> &PromptFile {
        self.parsed
            .get_or_init(|| prompt_file::parse(&self.rope.to_string()))
    }

    /// Bytes of text: large documents get their diagnostics after a pause in typing.
    pub fn len(&self) -> usize {
        self.rope.len_bytes()
    }

    pub fn new(text: &str, version: i32) -> Self {
        Self {
            rope: Rope::from_str(text),
            version,
            parsed: OnceCell::from(prompt_file::parse(text)),
            painted: None,
            running: None,
            checking: None,
            previous: None,
        }
    }

    /// Applies edits in order. A painted result follows the text: its segments move with the
    /// edits, and those an edit touched become stale. A computation still running for the old
    /// text is cancelled.
    pub fn apply(
        &mut self,
        version: i32,
        changes: Vec<TextDocumentContentChangeEvent>,
        enc: Encoding,
    ) {
        for change in changes {
            let replaced = match change.range {
                Some(r) => {
                    let span = convert::byte_range(&self.rope, &r, enc);
                    let start = self.rope.byte_to_char(span.start);
                    let end = self.rope.byte_to_char(span.end);
                    self.rope.remove(start..end);
                    self.rope.insert(start, &change.text);
                    span
                }
                None => {
                    let all = 0..self.rope.len_bytes();
                    self.rope = Rope::from_str(&change.text);
                    all
                }
            };
            if let Some(p) = &mut self.painted {
                p.edits.push((replaced, change.text.len()));
            }
        }
        self.version = version;
        self.parsed = OnceCell::new();
        for c in [self.running.take(), self.checking.take()]
            .into_iter()
            .flatten()
        {
            c.cancel();
        }
    }

    /// Paints a new result; the one it replaces (or the one an edit removed) becomes the
    /// previous result, for before/after comparisons.
    pub fn paint(
        &mut self,
        version: i32,
        analysis: Arc<Analysis>,
        model: String,
        segmentation: Segmentation,
        gain: f32,
    ) {
        if let Some(p) = self.painted.take() {
            self.previous = Some(p.analysis);
        }
        if let Some(c) = self.checking.take() {
            c.cancel();
        }
        // Before/after only between results that explain the same thing the same way.
        let incomparable = self
            .previous
            .as_ref()
            .and_then(|p| incomparable(p, &analysis));
        let previous = self.previous.clone().filter(|_| incomparable.is_none());
        let mut painted = Painted::new(version, analysis, model, segmentation, gain, previous);
        painted.incomparable = incomparable;
        self.painted = Some(painted);
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

    /// The plain model of LSP positions: lines end at `\n`, `\r\n` or a lone `\r`, nothing
    /// else; columns count UTF-8 bytes or UTF-16 units.
    fn model_position(text: &str, at: usize, enc: Encoding) -> Position {
        let before = &text[..at];
        let mut line = 0;
        let mut line_start = 0;
        let b = before.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\n' || (b[i] == b'\r' && b.get(i + 1) != Some(&b'\n')) {
                line += 1;
                line_start = i + 1;
            }
            i += 1;
        }
        let col = &before[line_start..];
        let character = match enc {
            Encoding::Utf8 => col.len(),
            Encoding::Utf16 => col.encode_utf16().count(),
        };
        Position::new(line, character as u32)
    }

    fn inside_crlf(text: &str, at: usize) -> bool {
        at > 0 && text.as_bytes()[at - 1] == b'\r' && text.as_bytes().get(at) == Some(&b'\n')
    }

    /// Random incremental edits with the characters that other tools count as line breaks
    /// (U+2028, U+2029, U+0085, VT, FF), lone CRs, CRLFs and surrogate pairs, in both
    /// encodings: the document always equals the plain model of the text.
    #[test]
    fn random_edits_match_a_plain_model_of_lsp_lines() {
        use rand::{Rng, SeedableRng};
        let pieces = [
            "a", "bc", "\n", "\r", "\r\n", "\u{2028}", "\u{2029}", "\u{85}", "\u{b}", "\u{c}",
            "😀", "東京", "é", "",
        ];
        for enc in [Encoding::Utf8, Encoding::Utf16] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            for _ in 0..40 {
                let mut text = String::new();
                let mut doc = Document::new("", 1);
                for step in 0..200 {
                    // Positions inside "\r\n" or inside a character are not positions.
                    let valid: Vec<usize> = (0..=text.len())
                        .filter(|&i| text.is_char_boundary(i))
                        .filter(|&i| !inside_crlf(&text, i))
                        .collect();
                    let mut a = valid[rng.random_range(0..valid.len())];
                    let mut b = valid[rng.random_range(0..valid.len())];
                    if a > b {
                        std::mem::swap(&mut a, &mut b);
                    }
                    if rng.random_bool(0.5) {
                        b = a;
                    }
                    let insert: String = (0..rng.random_range(0..4))
                        .map(|_| pieces[rng.random_range(0..pieces.len())])
                        .collect();
                    let (start, end) =
                        (model_position(&text, a, enc), model_position(&text, b, enc));
                    doc.apply(
                        step + 2,
                        vec![edit(
                            start.line,
                            start.character,
                            end.line,
                            end.character,
                            &insert,
                        )],
                        enc,
                    );
                    text.replace_range(a..b, &insert);
                    assert_eq!(doc.rope.to_string(), text, "{enc:?} step {step}");
                }
                // Every position maps back and forth as the model says.
                for at in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                    if inside_crlf(&text, at) {
                        continue;
                    }
                    let pos = model_position(&text, at, enc);
                    assert_eq!(
                        convert::position(&doc.rope, at, enc),
                        pos,
                        "{text:?} at {at}"
                    );
                    assert_eq!(convert::offset(&doc.rope, pos, enc), at, "{text:?} {pos:?}");
                }
            }
        }
    }

    /// Property: a segment no edit touched holds the same text after the edits, at its
    /// mapped range; one that an edit touched is reported as touched.
    #[test]
    fn segments_follow_random_edits() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..500 {
            let original: String = (0..rng.random_range(5..40))
                .map(|_| ["ab", "c", " ", "\n", "é", "😀"][rng.random_range(0..6)])
                .collect();
            let cuts: Vec<usize> = {
                let mut c: Vec<usize> = (0..=original.len())
                    .filter(|&i| original.is_char_boundary(i))
                    .filter(|_| rng.random_bool(0.3))
                    .collect();
                c.insert(0, 0);
                c.push(original.len());
                c.dedup();
                c
            };
            let segments: Vec<std::ops::Range<usize>> =
                cuts.windows(2).map(|w| w[0]..w[1]).collect();
            let mut text = original.clone();
            let mut edits = Vec::new();
            for _ in 0..rng.random_range(1..4) {
                let valid: Vec<usize> = (0..=text.len())
                    .filter(|&i| text.is_char_boundary(i))
                    .collect();
                let mut a = valid[rng.random_range(0..valid.len())];
                let mut b = valid[rng.random_range(0..valid.len())];
                if a > b {
                    std::mem::swap(&mut a, &mut b);
                }
                let insert = ["", "x", "yz\n", "東"][rng.random_range(0..4)];
                text.replace_range(a..b, insert);
                edits.push((a..b, insert.len()));
            }
            for seg in &segments {
                let (now, touched) = map_through(&edits, seg);
                if !touched {
                    assert_eq!(
                        &text[now.clone()],
                        &original[seg.clone()],
                        "{original:?} -> {text:?} {edits:?} {seg:?}"
                    );
                }
            }
        }
        // Direct cases: an insertion inside touches, at either end does not.
        let seg = 5..10;
        assert_eq!(map_through(&[(7..7, 3)], &seg), (5..13, true));
        assert_eq!(map_through(&[(5..5, 3)], &seg), (8..13, false));
        assert_eq!(map_through(&[(10..10, 3)], &seg), (5..10, false));
        assert_eq!(map_through(&[(0..2, 0)], &seg), (3..8, false));
        assert_eq!(map_through(&[(9..12, 1)], &seg), (5..10, true));
    }

    #[test]
    fn an_edit_keeps_the_painted_result_and_cancels_running_work() {
        let mut d = Document::new("Ask.\n", 1);
        let running = CancelToken::new();
        d.running = Some(running.clone());
        d.apply(2, vec![edit(0, 0, 0, 0, "Please ")], Encoding::Utf16);
        assert!(running.is_cancelled());
        assert_eq!(d.parsed().prompt_text(), "Please Ask.");
    }
}
