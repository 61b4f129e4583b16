//! The only place that converts between the engine's byte offsets and LSP positions
//! (UTF-8 or UTF-16 code units, as negotiated).

use std::ops::Range;

use ropey::Rope;
use tower_lsp_server::lsp_types::{Position, PositionEncodingKind, Range as LspRange};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    Utf8,
    #[default]
    Utf16,
}

impl Encoding {
    /// UTF-8 if the client offers it (no conversion needed), else UTF-16 (the default).
    pub fn negotiate(offered: Option<&[PositionEncodingKind]>) -> Self {
        match offered {
            Some(kinds) if kinds.contains(&PositionEncodingKind::UTF8) => Encoding::Utf8,
            _ => Encoding::Utf16,
        }
    }
    pub fn kind(self) -> PositionEncodingKind {
        match self {
            Encoding::Utf8 => PositionEncodingKind::UTF8,
            Encoding::Utf16 => PositionEncodingKind::UTF16,
        }
    }
}

/// Byte offset of a position; positions past a line's end clamp to it, past the end to the end.
pub fn offset(rope: &Rope, pos: Position, enc: Encoding) -> usize {
    let line = pos.line as usize;
    if line >= rope.len_lines() {
        return rope.len_bytes();
    }
    let line_start_char = rope.line_to_char(line);
    let line_slice = rope.line(line);
    // The line's text without its break: a position never points inside "\r\n".
    let mut content_chars = line_slice.len_chars();
    while content_chars > 0 && matches!(line_slice.char(content_chars - 1), '\n' | '\r') {
        content_chars -= 1;
    }
    let mut units = 0usize;
    let mut chars = 0usize;
    for c in line_slice.chars().take(content_chars) {
        let w = match enc {
            Encoding::Utf8 => c.len_utf8(),
            Encoding::Utf16 => c.len_utf16(),
        };
        if units + w > pos.character as usize {
            break;
        }
        units += w;
        chars += 1;
    }
    rope.char_to_byte(line_start_char + chars)
}

pub fn position(rope: &Rope, offset: usize, enc: Encoding) -> Position {
    let offset = offset.min(rope.len_bytes());
    let line = rope.byte_to_line(offset);
    let line_start = rope.line_to_byte(line);
    let character = match enc {
        Encoding::Utf8 => offset - line_start,
        Encoding::Utf16 => {
            let c0 = rope.byte_to_char(line_start);
            let c1 = rope.byte_to_char(offset);
            rope.char_to_utf16_cu(c1) - rope.char_to_utf16_cu(c0)
        }
    };
    Position::new(line as u32, character as u32)
}

pub fn range(rope: &Rope, r: &Range<usize>, enc: Encoding) -> LspRange {
    LspRange::new(position(rope, r.start, enc), position(rope, r.end, enc))
}

/// A range a client asked about (not an edit): None when it starts or ends on a line the
/// document does not have, instead of clamping it to the end.
pub fn byte_range_within(rope: &Rope, r: &LspRange, enc: Encoding) -> Option<Range<usize>> {
    let lines = rope.len_lines() as u32;
    (r.start.line < lines && r.end.line < lines).then(|| byte_range(rope, r, enc))
}

pub fn byte_range(rope: &Rope, r: &LspRange, enc: Encoding) -> Range<usize> {
    let (a, b) = (offset(rope, r.start, enc), offset(rope, r.end, enc));
    a.min(b)..a.max(b)
}

/// The lines of `text` as LSP counts them (ending at `\n`, `\r\n` or a lone `\r`, and at
/// nothing else): each line's byte offset in `text` and its content without the break.
pub fn lines(text: &str) -> Vec<(usize, &str)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\n' => {
                out.push((start, &text[start..i]));
                i += 1;
                start = i;
            }
            b'\r' => {
                out.push((start, &text[start..i]));
                i += if bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            _ => i += 1,
        }
    }
    if start < bytes.len() {
        out.push((start, &text[start..]));
    }
    out
}

/// Length of `text` in the encoding's units.
pub fn units(text: &str, enc: Encoding) -> u32 {
    match enc {
        Encoding::Utf8 => text.len() as u32,
        Encoding::Utf16 => text.encode_utf16().count() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_emoji_cjk_and_crlf() {
        let text = "a😀b\r\n東京 x\n\nend";
        let rope = Rope::from_str(text);
        for enc in [Encoding::Utf8, Encoding::Utf16] {
            for (i, _) in text.char_indices() {
                if text[..i].ends_with('\r') {
                    continue; // between \r and \n: not a position
                }
                let p = position(&rope, i, enc);
                assert_eq!(offset(&rope, p, enc), i, "{enc:?} {i} {p:?}");
            }
        }
        // "b" after the emoji: UTF-16 column 3 (surrogate pair), UTF-8 column 5.
        assert_eq!(position(&rope, 5, Encoding::Utf16), Position::new(0, 3));
        assert_eq!(position(&rope, 5, Encoding::Utf8), Position::new(0, 5));
        // Past the line's end clamps before the line break.
        assert_eq!(offset(&rope, Position::new(0, 99), Encoding::Utf16), 6);
        assert_eq!(
            offset(&rope, Position::new(99, 0), Encoding::Utf16),
            text.len()
        );
    }
}
