//! Inlay hints (setting `inlayHints`, off by default): the score at the end of each sentence,
//! line, paragraph or block, whichever level is shown (paragraphs when words or tokens are).

use tower_lsp_server::lsp_types::{InlayHint, InlayHintLabel, InlayHintParams};

use super::convert;
use super::State;
use salience_core::prompt_file::Granularity;
use salience_core::segments::Segmentation;

pub(super) fn hints(st: &State, params: &InlayHintParams) -> Option<Vec<InlayHint>> {
    if !st.settings.inlay_hints.unwrap_or(false) {
        return None;
    }
    let doc = st.docs.map.get(&params.text_document.uri)?;
    let p = doc.painted.as_ref()?;
    let window = convert::byte_range(&doc.rope, &params.range, st.encoding);
    let coarse;
    let level = match p.segmentation {
        Segmentation::Standard(Granularity::Token | Granularity::Word) => {
            coarse = p
                .analysis
                .level(&Segmentation::Standard(Granularity::Paragraph), p.gain);
            &coarse
        }
        _ => &p.level,
    };
    Some(
        level
            .segments
            .iter()
            .filter_map(|s| {
                let (now, stale) = p.now(&(s.start..s.end));
                (!stale && now.end > window.start && now.start < window.end).then_some((s, now))
            })
            .map(|(s, now)| InlayHint {
                position: convert::position(&doc.rope, now.end, st.encoding),
                label: InlayHintLabel::String(format!("{:+.3}", s.score)),
                kind: None,
                text_edits: None,
                tooltip: None,
                padding_left: Some(true),
                padding_right: None,
                data: None,
            })
            .collect(),
    )
}
