//! Semantic tokens: each scored segment as `salience` with sign and level modifiers (split
//! per line, as the protocol requires), and the target as `salienceTarget`.

use std::ops::Range;

use tower_lsp_server::lsp_types::{
    Range as LspRange, SemanticToken, SemanticTokens, SemanticTokensResult, Uri,
};

use super::convert;
use super::protocol::{level_modifier, TokenType, MOD_NEGATIVE, MOD_POSITIVE};
use super::State;

pub(super) fn full(
    st: &State,
    uri: &Uri,
    within: Option<LspRange>,
) -> Option<SemanticTokensResult> {
    let doc = st.docs.map.get(uri)?;
    let enc = st.encoding;
    let mut data = Vec::new();
    let Some(p) = &doc.painted else {
        return Some(SemanticTokensResult::Tokens(SemanticTokens {
            result_id: None,
            data,
        }));
    };
    let window = within.map(|r| convert::byte_range(&doc.rope, &r, enc));
    let signed = p.analysis.method.is_signed();
    // Where the segments are now; the ones an edit touched are not painted.
    let mut spans: Vec<(Range<usize>, u32, u32)> = p
        .level
        .segments
        .iter()
        .filter(|s| s.level > 0)
        .filter_map(|s| {
            let (now, stale) = p.now(&(s.start..s.end));
            (!stale).then_some((s, now))
        })
        .map(|(s, now)| {
            let sign = if !signed {
                0
            } else if s.score >= 0.0 {
                MOD_POSITIVE
            } else {
                MOD_NEGATIVE
            };
            (
                now,
                TokenType::Salience as u32,
                sign | level_modifier(s.level),
            )
        })
        .collect();
    let (target, target_stale) = p.now(&p.analysis.target);
    if !target_stale && !p.analysis.generated_response {
        spans.push((target, TokenType::SalienceTarget as u32, 0));
    }
    spans.sort_by_key(|s| s.0.start);
    let (mut prev_line, mut prev_start) = (0u32, 0u32);
    for (range, ty, mods) in spans {
        if let Some(w) = &window {
            if range.end <= w.start || range.start >= w.end {
                continue;
            }
        }
        // One token per line of the span, as LSP counts lines.
        let end = range.end.min(doc.rope.len_bytes());
        let range = range.start.min(end)..end;
        let text = doc.rope.byte_slice(range.clone()).to_string();
        for (at, content) in convert::lines(&text) {
            if !content.trim().is_empty() {
                let pos = convert::position(&doc.rope, range.start + at, enc);
                let delta_line = pos.line - prev_line;
                let delta_start = if delta_line == 0 {
                    pos.character - prev_start
                } else {
                    pos.character
                };
                data.push(SemanticToken {
                    delta_line,
                    delta_start,
                    length: convert::units(content, enc),
                    token_type: ty,
                    token_modifiers_bitset: mods,
                });
                prev_line = pos.line;
                prev_start = pos.character;
            }
        }
    }
    Some(SemanticTokensResult::Tokens(SemanticTokens {
        result_id: None,
        data,
    }))
}
