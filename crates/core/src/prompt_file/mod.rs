//! `.prompt.md` files: optional YAML front matter, a Markdown prompt, and after a line
//! `<!-- response -->` the model's response. Every range is a byte range in the file's text.

mod settings;
pub mod write;

use std::ops::Range;

pub use settings::{Granularity, SalienceSettings};

pub const RESPONSE_MARKER: &str = "<!-- response -->";

/// A problem in the file that does not stop it from being used.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub range: Range<usize>,
    /// 1-based line and column, for people.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct PromptFile {
    pub text: String,
    /// The YAML between the `---` lines, if any.
    pub front_matter: Option<Range<usize>>,
    pub settings: SalienceSettings,
    /// The prompt: the body before the marker, without surrounding blank lines.
    pub prompt: Range<usize>,
    /// The marker line (with its line break), if present.
    pub marker: Option<Range<usize>>,
    /// The response after the marker, without surrounding blank lines (empty if none).
    pub response: Range<usize>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "{path}:{line}:{column}: not UTF-8 text (an invalid byte at line {line}, column {column})"
    )]
    NotUtf8 {
        path: String,
        line: usize,
        column: usize,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub fn read(path: &std::path::Path) -> Result<(PromptFile, Vec<u8>), FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let text = String::from_utf8(bytes.clone()).map_err(|e| {
        let valid = &bytes[..e.utf8_error().valid_up_to()];
        let valid = std::str::from_utf8(valid).expect("valid_up_to ends a valid prefix");
        let (line, column) = line_col(valid, valid.len());
        FileError::NotUtf8 {
            path: path.display().to_string(),
            line,
            column,
        }
    })?;
    Ok((parse(&text), bytes))
}

/// Lines with their byte ranges, line breaks included.
fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.split_inclusive('\n').scan(0, |pos, line| {
        let start = *pos;
        *pos += line.len();
        Some((start, line))
    })
}

fn line_content(line: &str) -> &str {
    line.trim_end_matches(['\n', '\r'])
}

/// Shrinks a range to exclude leading and trailing whitespace.
pub fn trim_range(text: &str, range: Range<usize>) -> Range<usize> {
    let s = &text[range.clone()];
    let start = range.start + (s.len() - s.trim_start().len());
    let end = range.end - (s.len() - s.trim_end().len());
    if start >= end {
        start..start
    } else {
        start..end
    }
}

/// 1-based line and column (in characters, as editors count them for people) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn problem(text: &str, range: Range<usize>, message: String) -> Problem {
    let (line, column) = line_col(text, range.start);
    Problem {
        range,
        line,
        column,
        message,
    }
}

pub fn parse(text: &str) -> PromptFile {
    let mut problems = Vec::new();
    let text_owned = text.to_string();
    let mut body_start = 0;
    let mut front_matter = None;
    let mut settings = SalienceSettings::default();

    // Front matter: a first line `---`, up to the next `---` (or `...`) line.
    let mut it = lines(text);
    if let Some((_, first)) = it.next() {
        if line_content(first.trim_start_matches('\u{feff}')) == "---" {
            let yaml_start = first.len();
            let close = lines(text)
                .skip(1)
                .find(|(_, l)| matches!(line_content(l).trim_end(), "---" | "..."));
            match close {
                Some((close_start, close_line)) => {
                    front_matter = Some(yaml_start..close_start);
                    body_start = close_start + close_line.len();
                    let (s, errors) =
                        settings::from_front_matter(&text[yaml_start..close_start]);
                    settings = s;
                    for (offset, message) in errors {
                        let at = (yaml_start + offset).min(close_start);
                        let end = text[at..close_start]
                            .find('\n')
                            .map_or(close_start, |p| at + p);
                        problems.push(problem(text, at..end, message));
                    }
                }
                None => problems.push(problem(
                    text,
                    0..first.len(),
                    "front matter is not closed (no `---` line after it): the whole file is read as the prompt".into(),
                )),
            }
        }
    }

    // The response marker: the first line that is exactly the marker.
    let markers: Vec<Range<usize>> = lines(&text[body_start..])
        .filter(|(_, l)| line_content(l).trim() == RESPONSE_MARKER)
        .map(|(s, l)| body_start + s..body_start + s + l.len())
        .collect();
    for extra in markers.iter().skip(1) {
        problems.push(problem(
            text,
            extra.start..extra.start + line_content(&text[extra.clone()]).len(),
            "a second response marker: only the first one splits prompt and response; this one is part of the response".into(),
        ));
    }
    let marker = markers.first().cloned();
    let (prompt, response) = match &marker {
        Some(m) => (
            trim_range(text, body_start..m.start),
            trim_range(text, m.end..text.len()),
        ),
        None => (
            trim_range(text, body_start..text.len()),
            text.len()..text.len(),
        ),
    };
    if prompt.is_empty() {
        problems.push(problem(text, prompt.clone(), "the prompt is empty".into()));
    }
    PromptFile {
        text: text_owned,
        front_matter,
        settings,
        prompt,
        marker,
        response,
        problems,
    }
}

impl PromptFile {
    pub fn prompt_text(&self) -> &str {
        &self.text[self.prompt.clone()]
    }
    pub fn response_text(&self) -> &str {
        &self.text[self.response.clone()]
    }
    pub fn has_response(&self) -> bool {
        !self.response.is_empty()
    }
    /// The byte range of lines `first..=last` (1-based).
    pub fn line_range(&self, first: usize, last: usize) -> Option<Range<usize>> {
        let all: Vec<(usize, &str)> = lines(&self.text).collect();
        if first == 0 || first > last || last > all.len() {
            return None;
        }
        let start = all[first - 1].0;
        let (s, l) = all[last - 1];
        Some(trim_range(&self.text, start..s + l.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_count_characters_not_bytes() {
        let text = "ab\nçé x\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 3), (2, 1));
        // 'x' is at byte 8 (ç and é take two bytes each) but is the 4th character.
        assert_eq!(line_col(text, 8), (2, 4));
        // Inside a character: its start.
        assert_eq!(line_col(text, 4), (2, 1));
        assert_eq!(line_col(text, 99), (3, 1));
    }

    #[test]
    fn no_front_matter_and_no_marker() {
        let f = parse("\nHello there.\n\n");
        assert_eq!(f.prompt_text(), "Hello there.");
        assert!(f.front_matter.is_none() && f.marker.is_none() && !f.has_response());
        assert!(f.problems.is_empty());
    }

    #[test]
    fn front_matter_settings_and_response() {
        let text = "---\ndescription: menu\nmode: agent\ntools: [a, b]\nsalience:\n  model: gemma-3-270m\n  template: raw\n  method: grad_l2\n  granularity: word\n  max_new_tokens: 12\n  temperature: 0\n  system: Be brief.\n---\nRecommend a dish.\n<!-- response -->\nSoup.\n";
        let f = parse(text);
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!(f.settings.model.as_deref(), Some("gemma-3-270m"));
        assert_eq!(f.settings.max_new_tokens, Some(12));
        assert_eq!(f.settings.system.as_deref(), Some("Be brief."));
        assert_eq!(f.settings.granularity, Some(Granularity::Word));
        assert_eq!(f.prompt_text(), "Recommend a dish.");
        assert_eq!(f.response_text(), "Soup.");
    }

    #[test]
    fn front_matter_errors_have_line_and_column_and_defaults_still_work() {
        let text = "---\nsalience:\n  method: nonsense\n  max_new_tokens: [1\n---\nHi\n";
        let f = parse(text);
        assert_eq!(f.prompt_text(), "Hi");
        assert!(!f.problems.is_empty());
        assert!(f.problems[0].line >= 2, "{:?}", f.problems);
        let f = parse("---\nsalience:\n  method: nonsense\n---\nHi\n");
        assert_eq!(f.problems.len(), 1, "{:?}", f.problems);
        assert_eq!(f.problems[0].line, 3, "{:?}", f.problems);
        assert!(f.problems[0].message.contains("nonsense"));
        assert_eq!(f.settings.method, None);
    }

    #[test]
    fn unclosed_front_matter_is_a_problem_not_a_failure() {
        let f = parse("---\ntitle: x\nHello\n");
        assert_eq!(f.problems.len(), 1);
        assert!(f.problems[0].message.contains("not closed"));
        assert!(f.prompt_text().contains("Hello"));
    }

    #[test]
    fn crlf_files() {
        let f = parse("---\r\nsalience:\r\n  method: grad_l2\r\n---\r\nAsk.\r\n<!-- response -->\r\nAnswer.\r\n");
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!(f.prompt_text(), "Ask.");
        assert_eq!(f.response_text(), "Answer.");
    }

    #[test]
    fn second_marker_belongs_to_the_response() {
        let f = parse("Q\n<!-- response -->\nA\n<!-- response -->\nB\n");
        assert_eq!(f.prompt_text(), "Q");
        assert_eq!(f.response_text(), "A\n<!-- response -->\nB");
        assert_eq!(f.problems.len(), 1);
        assert_eq!(f.problems[0].line, 4);
    }

    #[test]
    fn non_utf8_files_are_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.prompt.md");
        // Columns count characters, not bytes: "é" is two bytes and one column.
        std::fs::write(
            &p,
            "first\nHé \u{2028}"
                .as_bytes()
                .iter()
                .chain(b"\xff")
                .copied()
                .collect::<Vec<u8>>(),
        )
        .unwrap();
        let err = read(&p).unwrap_err().to_string();
        assert!(
            err.contains("not UTF-8") && err.contains("line 2, column 5"),
            "{err}"
        );
    }

    #[test]
    fn line_ranges() {
        let f = parse("one\ntwo\nthree\n");
        assert_eq!(&f.text[f.line_range(2, 3).unwrap()], "two\nthree");
        assert!(f.line_range(3, 9).is_none());
    }
}
