//! Segmenting the prompt at the level a person thinks in, and summing token scores into the
//! segments. Switching levels never re-runs the model: it re-aggregates the token scores.

mod blocks;

use std::ops::Range;

use serde::Serialize;
use unicode_segmentation::UnicodeSegmentation;

pub use crate::prompt_file::Granularity;

/// How a text is cut into segments: a granularity, or custom separators (a regex).
#[derive(Debug, Clone)]
pub enum Segmentation {
    Standard(Granularity),
    Custom(regex::Regex),
}

impl Segmentation {
    pub fn name(&self) -> String {
        match self {
            Segmentation::Standard(g) => g.name().to_string(),
            Segmentation::Custom(r) => format!("custom ({})", r.as_str()),
        }
    }
}

/// Shrinks a range to its non-whitespace content; None if nothing is left.
fn trimmed(text: &str, r: Range<usize>) -> Option<Range<usize>> {
    let s = &text[r.clone()];
    let lead = s.len() - s.trim_start().len();
    let trail = s.len() - s.trim_end().len();
    (lead + trail < s.len()).then(|| r.start + lead..r.end - trail)
}

/// Lines of `region` (without line breaks) as byte ranges.
fn line_ranges(text: &str, region: Range<usize>) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut pos = region.start;
    for line in text[region.clone()].split_inclusive('\n') {
        out.push(pos..pos + line.trim_end_matches(['\n', '\r']).len());
        pos += line.len();
    }
    out
}

/// The non-empty segments of `region` at a level other than `token`, in order, trimmed of
/// surrounding whitespace, never overlapping.
pub fn segment(text: &str, region: Range<usize>, level: &Segmentation) -> Vec<Range<usize>> {
    let keep = |rs: Vec<Range<usize>>| rs.into_iter().filter_map(|r| trimmed(text, r)).collect();
    match level {
        Segmentation::Standard(Granularity::Token) => keep(vec![region]),
        Segmentation::Standard(Granularity::Word) => keep(
            text[region.clone()]
                .split_word_bound_indices()
                .map(|(i, w)| region.start + i..region.start + i + w.len())
                .collect(),
        ),
        Segmentation::Standard(Granularity::Sentence) => {
            let mut out: Vec<Range<usize>> = Vec::new();
            for line in line_ranges(text, region) {
                let mut pending_marker: Option<usize> = None;
                for (i, s) in text[line.clone()].split_sentence_bound_indices() {
                    let r = line.start + i..line.start + i + s.len();
                    // "1." or "-" alone is a list marker, not a sentence: it joins the next one.
                    if is_list_marker(s.trim()) {
                        pending_marker.get_or_insert(r.start);
                        continue;
                    }
                    out.push(pending_marker.take().unwrap_or(r.start)..r.end);
                }
                if let Some(start) = pending_marker {
                    out.push(start..line.end);
                }
            }
            keep(out)
        }
        Segmentation::Standard(Granularity::Line) => keep(line_ranges(text, region)),
        Segmentation::Standard(Granularity::Paragraph) => {
            let mut out = Vec::new();
            let mut current: Option<Range<usize>> = None;
            for line in line_ranges(text, region) {
                if text[line.clone()].trim().is_empty() {
                    out.extend(current.take());
                } else {
                    current = Some(current.map_or(line.clone(), |c| c.start..line.end));
                }
            }
            out.extend(current);
            keep(out)
        }
        Segmentation::Standard(Granularity::Block) => keep(blocks::blocks(text, region)),
        Segmentation::Custom(re) => {
            let mut out = Vec::new();
            let mut start = region.start;
            for m in re.find_iter(&text[region.clone()]) {
                if m.end() == m.start() {
                    continue;
                }
                out.push(start..region.start + m.start());
                start = region.start + m.end();
            }
            out.push(start..region.end);
            keep(out)
        }
    }
}

fn is_list_marker(s: &str) -> bool {
    let digits = s.trim_end_matches(['.', ')']);
    matches!(s, "-" | "*" | "+")
        || (!digits.is_empty()
            && digits.len() < s.len()
            && digits.chars().all(|c| c.is_ascii_digit()))
}

/// One segment's result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SegmentScore {
    pub start: usize,
    pub end: usize,
    pub score: f32,
    /// score / max |score| over the level, in [-1, 1].
    pub normalized: f32,
    /// Display level 0..=LEVELS (0: no colour).
    pub level: u8,
    /// 1 = the largest |score|.
    pub rank: usize,
    /// |score| / sum of |scores| over the level.
    pub share: f32,
}

pub const LEVELS: u8 = 8;

/// A level's segments with their scores.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LevelResult {
    pub name: String,
    pub segments: Vec<SegmentScore>,
    /// Sum of the scores of tokens the template added (no place in the document).
    pub template_score: f32,
    /// Their share of the total |score| (tokens and template together).
    pub template_share: f32,
}

/// A scored token: its byte range in the document (None for template tokens) and score.
#[derive(Debug, Clone)]
pub struct TokenScore {
    pub range: Option<Range<usize>>,
    pub score: f32,
}

/// Display intensity as LIT does: 1 - (1 - |s| / D)^gamma, gamma from the gain.
pub fn intensity(normalized_abs: f32, gain: f32) -> f32 {
    let gamma = gain.max(0.05);
    1.0 - (1.0 - normalized_abs.clamp(0.0, 1.0)).powf(gamma)
}

pub fn display_level(normalized: f32, gain: f32) -> u8 {
    if normalized == 0.0 {
        return 0;
    }
    ((intensity(normalized.abs(), gain) * LEVELS as f32).ceil() as u8).clamp(1, LEVELS)
}

/// The segments of `regions` at `level`, and for each token the segment it counts for: the
/// one holding its first non-space byte (a whitespace-only token: the segment before it, else
/// after it). Template tokens (no range) count for none.
pub fn segments_and_owners(
    text: &str,
    regions: &[Range<usize>],
    token_ranges: &[Option<Range<usize>>],
    level: &Segmentation,
) -> (Vec<Range<usize>>, Vec<Option<usize>>) {
    if matches!(level, Segmentation::Standard(Granularity::Token)) {
        let mut ranges = Vec::new();
        let owners = token_ranges
            .iter()
            .map(|r| {
                r.as_ref().map(|r| {
                    ranges.push(trimmed(text, r.clone()).unwrap_or(r.clone()));
                    ranges.len() - 1
                })
            })
            .collect();
        return (ranges, owners);
    }
    let ranges: Vec<Range<usize>> = regions
        .iter()
        .flat_map(|r| segment(text, r.clone(), level))
        .collect();
    let owners = token_ranges
        .iter()
        .map(|r| {
            let r = r.as_ref()?;
            if ranges.is_empty() {
                return None;
            }
            let s = &text[r.clone()];
            let pos = r.start + (s.len() - s.trim_start().len());
            // The last segment starting at or before pos.
            let idx = ranges.partition_point(|seg| seg.start <= pos);
            Some(idx.saturating_sub(1))
        })
        .collect();
    (ranges, owners)
}

/// Sums token scores into segments, so the sum over segments equals the sum over document
/// tokens at every level.
pub fn aggregate(
    text: &str,
    regions: &[Range<usize>],
    tokens: &[TokenScore],
    level: &Segmentation,
    gain: f32,
) -> LevelResult {
    let token_ranges: Vec<Option<Range<usize>>> = tokens.iter().map(|t| t.range.clone()).collect();
    let (ranges, owners) = segments_and_owners(text, regions, &token_ranges, level);
    let mut scores = vec![0f32; ranges.len()];
    let mut template_score = 0f32;
    let mut template_abs = 0f32;
    for (t, owner) in tokens.iter().zip(&owners) {
        match owner {
            Some(i) => scores[*i] += t.score,
            None => {
                template_score += t.score;
                template_abs += t.score.abs();
            }
        }
    }
    LevelResult::from_scores(
        level.name(),
        &ranges,
        &scores,
        template_score,
        template_abs,
        gain,
    )
}

impl LevelResult {
    /// Ranks, shares and display levels of segment scores.
    pub fn from_scores(
        name: String,
        ranges: &[Range<usize>],
        scores: &[f32],
        template_score: f32,
        template_abs: f32,
        gain: f32,
    ) -> LevelResult {
        let max = scores.iter().fold(0f32, |m, s| m.max(s.abs()));
        let total_abs: f32 = scores.iter().map(|s| s.abs()).sum();
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()));
        let mut rank = vec![0; scores.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = r + 1;
        }
        let segments = ranges
            .iter()
            .zip(scores)
            .enumerate()
            .map(|(i, (r, &score))| {
                let normalized = if max > 0.0 { score / max } else { 0.0 };
                SegmentScore {
                    start: r.start,
                    end: r.end,
                    score,
                    normalized,
                    level: display_level(normalized, gain),
                    rank: rank[i],
                    share: if total_abs > 0.0 {
                        score.abs() / total_abs
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        LevelResult {
            name,
            segments,
            template_score,
            template_share: if total_abs + template_abs > 0.0 {
                template_abs / (total_abs + template_abs)
            } else {
                0.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(text: &str, level: Granularity) -> Vec<&str> {
        segment(text, 0..text.len(), &Segmentation::Standard(level))
            .into_iter()
            .map(|r| &text[r])
            .collect()
    }

    #[test]
    fn words() {
        assert_eq!(
            texts("Don't panic, Zoë! 東京 👩‍👩‍👧 ok", Granularity::Word),
            ["Don't", "panic", ",", "Zoë", "!", "東", "京", "👩‍👩‍👧", "ok"]
        );
    }

    #[test]
    fn sentences_break_at_newlines_too() {
        let text = "First one. Second one?\nNo stop here\n\nThird. 東京は大きい。次の文。";
        assert_eq!(
            texts(text, Granularity::Sentence),
            [
                "First one.",
                "Second one?",
                "No stop here",
                "Third.",
                "東京は大きい。",
                "次の文。"
            ]
        );
    }

    #[test]
    fn lines_and_paragraphs_with_crlf() {
        let text = "a b\r\nc\r\n\r\n  d\r\n";
        assert_eq!(texts(text, Granularity::Line), ["a b", "c", "d"]);
        assert_eq!(texts(text, Granularity::Paragraph), ["a b\r\nc", "d"]);
    }

    #[test]
    fn custom_separators() {
        let text = "a | b || c";
        let re = regex::Regex::new(r"\|").unwrap();
        let got: Vec<&str> = segment(text, 0..text.len(), &Segmentation::Custom(re))
            .into_iter()
            .map(|r| &text[r])
            .collect();
        assert_eq!(got, ["a", "b", "c"]);
    }

    #[test]
    fn sums_are_preserved_at_every_level() {
        let text = "Hello world. Bye now!\n\n- item one\n- item two\n";
        // Tokens roughly like a BPE: words with leading spaces, newlines on their own.
        let mut tokens = Vec::new();
        let mut pos = 0;
        for piece in [
            "Hello", " world", ".", " Bye", " now", "!", "\n\n", "-", " item", " one", "\n", "-",
            " item", " two", "\n",
        ] {
            tokens.push(TokenScore {
                range: Some(pos..pos + piece.len()),
                score: (pos as f32 * 0.37).sin(),
            });
            pos += piece.len();
        }
        tokens.push(TokenScore {
            range: None,
            score: 0.5,
        });
        let doc_total: f32 = tokens
            .iter()
            .filter(|t| t.range.is_some())
            .map(|t| t.score)
            .sum();
        for g in Granularity::ALL {
            let whole = std::slice::from_ref(&(0..text.len())).to_vec();
            let r = aggregate(text, &whole, &tokens, &Segmentation::Standard(g), 1.0);
            let sum: f32 = r.segments.iter().map(|s| s.score).sum();
            assert!(
                (sum - doc_total).abs() < 1e-5,
                "{g:?}: {sum} vs {doc_total}"
            );
            assert_eq!(r.template_score, 0.5);
            let shares: f32 = r.segments.iter().map(|s| s.share).sum();
            assert!((shares - 1.0).abs() < 1e-5);
            let mut ranks: Vec<usize> = r.segments.iter().map(|s| s.rank).collect();
            ranks.sort();
            assert_eq!(ranks, (1..=r.segments.len()).collect::<Vec<_>>());
            assert!(r
                .segments
                .iter()
                .any(|s| s.normalized.abs() == 1.0 && s.level == LEVELS));
        }
        // The first non-space byte decides: " world" belongs to the sentence "Hello world."
        let r = aggregate(
            text,
            std::slice::from_ref(&(0..text.len())),
            &tokens,
            &Segmentation::Standard(Granularity::Sentence),
            1.0,
        );
        assert_eq!(
            &text[r.segments[0].start..r.segments[0].end],
            "Hello world."
        );
        let want = tokens[0].score + tokens[1].score + tokens[2].score;
        assert!((r.segments[0].score - want).abs() < 1e-6);
    }

    #[test]
    fn gain_raises_small_intensities() {
        assert_eq!(display_level(0.0, 1.0), 0);
        assert_eq!(display_level(1.0, 1.0), LEVELS);
        assert!(display_level(0.1, 4.0) > display_level(0.1, 1.0));
        assert_eq!(display_level(-0.5, 1.0), 4);
    }
}
