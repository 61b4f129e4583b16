//! Markdown blocks: the units people move around when they edit prompts. A heading with the
//! prose under it, each list item, each code block, each other top-level block; and blocks
//! that open with a label seen on several blocks ("Review:", "Q:", "Input:") start a few-shot
//! example that runs until the next one.

use std::ops::Range;

use pulldown_cmark::{Event, Parser, Tag, TagEnd};

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Heading,
    Paragraph,
    Other,
}

pub fn blocks(text: &str, region: Range<usize>) -> Vec<Range<usize>> {
    let src = &text[region.clone()];
    let mut raw: Vec<(Range<usize>, Kind)> = Vec::new();
    let mut depth = 0usize;
    let mut in_list = false;
    for (event, range) in Parser::new(src).into_offset_iter() {
        let r = region.start + range.start..region.start + range.end;
        match event {
            Event::Start(tag) => {
                if depth == 0 {
                    match tag {
                        Tag::List(_) => in_list = true,
                        Tag::Heading { .. } => raw.push((r, Kind::Heading)),
                        Tag::Paragraph => raw.push((r, Kind::Paragraph)),
                        _ => raw.push((r, Kind::Other)),
                    }
                } else if depth == 1 && in_list && matches!(tag, Tag::Item) {
                    raw.push((r, Kind::Other));
                }
                depth += 1;
            }
            Event::End(tag) => {
                depth = depth.saturating_sub(1);
                if depth == 0 && matches!(tag, TagEnd::List(_)) {
                    in_list = false;
                }
            }
            Event::Rule | Event::Html(_) if depth == 0 => raw.push((r, Kind::Other)),
            _ => {}
        }
    }
    let label = example_label(text, &raw);
    let mut out: Vec<Range<usize>> = Vec::new();
    // Whether the last output block may absorb the next: a heading's section takes prose, a
    // few-shot example takes everything up to the next example.
    let mut open: Option<Kind> = None;
    for (r, kind) in raw {
        let starts_example = label
            .as_deref()
            .is_some_and(|l| label_of(&text[r.clone()]) == Some(l));
        let absorb = match (&open, &kind) {
            _ if starts_example => false,
            (_, Kind::Heading) => false,
            (Some(Kind::Heading), Kind::Paragraph) => true,
            (Some(Kind::Other), _) if label.is_some() && open_example(&out, text, &label) => true,
            _ => false,
        };
        if absorb {
            let last = out.last_mut().expect("open block");
            last.end = r.end;
        } else {
            out.push(r);
            open = Some(if starts_example {
                Kind::Other
            } else {
                kind.clone()
            });
            if !starts_example && kind == Kind::Other {
                open = None;
            }
            if kind == Kind::Paragraph && !starts_example {
                open = None;
            }
        }
    }
    out
}

fn open_example(out: &[Range<usize>], text: &str, label: &Option<String>) -> bool {
    out.last()
        .is_some_and(|r| label_of(&text[r.clone()]) == label.as_deref())
}

/// "Review: ..." -> "Review"; list markers before the label are skipped.
fn label_of(block: &str) -> Option<&str> {
    let s = block
        .trim_start()
        .trim_start_matches(['-', '*', '+', '>', ' ']);
    let colon = s.find(':')?;
    let label = &s[..colon];
    (!label.is_empty()
        && label.len() <= 24
        && label.chars().next().is_some_and(char::is_alphabetic)
        && label
            .chars()
            .all(|c| c.is_alphanumeric() || c == ' ' || c == '_'))
    .then_some(label)
}

/// The label that opens the most blocks, if at least two.
fn example_label(text: &str, raw: &[(Range<usize>, Kind)]) -> Option<String> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for (r, kind) in raw {
        if *kind == Kind::Heading {
            continue;
        }
        if let Some(l) = label_of(&text[r.clone()]) {
            match counts.iter_mut().find(|(x, _)| x == l) {
                Some((_, n)) => *n += 1,
                None => counts.push((l.to_string(), 1)),
            }
        }
    }
    // The earliest label among the most frequent opens each example.
    let max = counts.iter().map(|c| c.1).max()?;
    (max >= 2).then(|| counts.into_iter().find(|c| c.1 == max).expect("max").0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(text: &str) -> Vec<&str> {
        blocks(text, 0..text.len())
            .into_iter()
            .map(|r| text[r].trim_end())
            .collect()
    }

    #[test]
    fn headings_take_their_prose_lists_split_into_items_code_stays_whole() {
        let text = "# Task\nDo this.\n\nAnd that.\n\n- one\n- two\n\n```\nlet x = 1;\n\nlet y = 2;\n```\n\n## Notes\nBe kind.\n";
        assert_eq!(
            texts(text),
            [
                "# Task\nDo this.\n\nAnd that.",
                "- one",
                "- two",
                "```\nlet x = 1;\n\nlet y = 2;\n```",
                "## Notes\nBe kind."
            ]
        );
    }

    #[test]
    fn few_shot_examples_are_grouped() {
        let text = "Classify the review.\n\nReview: great\n\nLabel: positive\n\nReview: awful\n\nLabel: negative\n\nReview: fine\n";
        assert_eq!(
            texts(text),
            [
                "Classify the review.",
                "Review: great\n\nLabel: positive",
                "Review: awful\n\nLabel: negative",
                "Review: fine"
            ]
        );
    }
}
