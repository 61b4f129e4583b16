//! Two salience maps of (possibly different) texts, aligned segment by segment: a result
//! before and after an edit, two prompt files, or two models on one file.
//!
//! Segments are matched by their text (whitespace-insensitive): first in order, by a diff,
//! then segments that moved. A segment that was edited has no match: it no longer exists.

use std::collections::HashMap;

use similar::{capture_diff_slices, Algorithm, DiffOp};

use crate::segments::LevelResult;

/// One row of an alignment: a segment of the first map, of the second, or of both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub before: Option<usize>,
    pub after: Option<usize>,
}

fn normalized(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Aligns two lists of segment texts; rows follow the order of `after`, with segments only
/// in `before` where the diff put them.
pub fn align<S: AsRef<str>>(before: &[S], after: &[S]) -> Vec<Row> {
    let a: Vec<String> = before.iter().map(|s| normalized(s.as_ref())).collect();
    let b: Vec<String> = after.iter().map(|s| normalized(s.as_ref())).collect();
    let mut rows = Vec::new();
    for op in capture_diff_slices(Algorithm::Myers, &a, &b) {
        match op {
            DiffOp::Equal {
                old_index,
                new_index,
                len,
            } => rows.extend((0..len).map(|k| Row {
                before: Some(old_index + k),
                after: Some(new_index + k),
            })),
            DiffOp::Delete {
                old_index, old_len, ..
            } => rows.extend((old_index..old_index + old_len).map(|i| Row {
                before: Some(i),
                after: None,
            })),
            DiffOp::Insert {
                new_index, new_len, ..
            } => rows.extend((new_index..new_index + new_len).map(|j| Row {
                before: None,
                after: Some(j),
            })),
            DiffOp::Replace {
                old_index,
                old_len,
                new_index,
                new_len,
            } => {
                rows.extend((old_index..old_index + old_len).map(|i| Row {
                    before: Some(i),
                    after: None,
                }));
                rows.extend((new_index..new_index + new_len).map(|j| Row {
                    before: None,
                    after: Some(j),
                }));
            }
        }
    }
    // Segments that moved: an unmatched `before` with the same text as an unmatched `after`.
    let mut unmatched_before: HashMap<&str, Vec<usize>> = HashMap::new();
    for (r, row) in rows.iter().enumerate() {
        if let (Some(i), None) = (row.before, row.after) {
            unmatched_before.entry(a[i].as_str()).or_default().push(r);
        }
    }
    let mut merged_away = vec![false; rows.len()];
    for r in 0..rows.len() {
        if let (None, Some(j)) = (rows[r].before, rows[r].after) {
            if let Some(candidates) = unmatched_before.get_mut(b[j].as_str()) {
                if !candidates.is_empty() {
                    let from = candidates.remove(0);
                    rows[r].before = rows[from].before;
                    merged_away[from] = true;
                }
            }
        }
    }
    rows.into_iter()
        .zip(merged_away)
        .filter(|(_, gone)| !gone)
        .map(|(row, _)| row)
        .collect()
}

/// Aligns the segments of two levels, each on its own text.
pub fn align_levels(
    before_text: &str,
    before: &LevelResult,
    after_text: &str,
    after: &LevelResult,
) -> Vec<Row> {
    let texts = |text: &str, l: &LevelResult| -> Vec<String> {
        l.segments
            .iter()
            .map(|s| text[s.start..s.end].to_string())
            .collect()
    };
    align(&texts(before_text, before), &texts(after_text, after))
}

/// For each segment of `after`, its score in `before` when it still exists there.
pub fn previous_scores(
    before_text: &str,
    before: &LevelResult,
    after_text: &str,
    after: &LevelResult,
) -> Vec<Option<f32>> {
    let mut out = vec![None; after.segments.len()];
    for row in align_levels(before_text, before, after_text, after) {
        if let (Some(i), Some(j)) = (row.before, row.after) {
            out[j] = Some(before.segments[i].score);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(rows: &[Row]) -> Vec<(Option<usize>, Option<usize>)> {
        rows.iter().map(|r| (r.before, r.after)).collect()
    }

    #[test]
    fn an_edit_keeps_the_segments_around_it() {
        let before = ["Be brief.", "Answer in French.", "Use a list."];
        let after = [
            "Be brief.",
            "Answer in  German.",
            "Use a list.",
            "Cite sources.",
        ];
        assert_eq!(
            pairs(&align(&before, &after)),
            vec![
                (Some(0), Some(0)),
                (Some(1), None),
                (None, Some(1)),
                (Some(2), Some(2)),
                (None, Some(3)),
            ]
        );
    }

    #[test]
    fn moved_segments_are_matched_and_whitespace_does_not_matter() {
        let before = ["Principle A.", "Principle B.", "Question?"];
        let after = ["Question?", "Principle A.", "Principle\nB."];
        let rows = align(&before, &after);
        let mut matched: Vec<(usize, usize)> = rows
            .iter()
            .filter_map(|r| Some((r.before?, r.after?)))
            .collect();
        matched.sort();
        assert_eq!(matched, vec![(0, 1), (1, 2), (2, 0)]);
        assert_eq!(rows.len(), 3);
    }

    #[test]
    fn repeated_segments_match_one_to_one() {
        let before = ["Yes.", "Yes.", "No."];
        let after = ["Yes.", "No."];
        let rows = align(&before, &after);
        let matched = rows
            .iter()
            .filter(|r| r.before.is_some() && r.after.is_some())
            .count();
        assert_eq!(matched, 2);
        assert_eq!(rows.len(), 3);
    }
}
