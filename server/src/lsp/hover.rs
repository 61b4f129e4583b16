//! Hover on a scored span: score, rank, share, what the sign means, method, model, target.

use tower_lsp_server::lsp_types::{Hover, HoverContents, HoverParams, MarkupContent, MarkupKind};

use super::convert;
use super::State;

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn ago(secs: u64) -> String {
    match secs {
        0..=4 => "just now".into(),
        5..=119 => format!("{secs} s ago"),
        _ => format!("{} min ago", secs / 60),
    }
}

pub(super) fn hover(st: &State, params: &HoverParams) -> Option<Hover> {
    let tdp = &params.text_document_position_params;
    let doc = st.docs.map.get(&tdp.text_document.uri)?;
    let p = doc.painted.as_ref()?;
    let at = convert::offset(&doc.rope, tdp.position, st.encoding);
    let a = &p.analysis;
    let target: String = a.target_text().chars().take(80).collect();
    let ellipsis = if a.target_text().chars().count() > 80 {
        "…"
    } else {
        ""
    };
    let mut footer = format!(
        "method `{}` · model `{}` · computed {}",
        a.method.name(),
        a.model,
        ago(p.computed_at.elapsed().as_secs())
    );
    if p.edited() {
        footer.push_str(" · the text was edited since: segments moved with it");
    }
    if let Some(c) = &a.contrast {
        footer.push_str(&format!(
            "\n\ncontrast: why the target rather than \"{}\" — {}",
            c.text.replace('\n', " "),
            a.objective_text()
        ));
    }
    if let Some(ig) = &a.ig {
        footer.push_str(&format!(
            "\n\nintegrated gradients: {} gradients, completeness gap {:.1} %{}",
            ig.steps,
            ig.completeness_gap * 100.0,
            if ig.completeness_gap > crate::report::UNRELIABLE_GAP {
                " — **not reliable**"
            } else {
                ""
            }
        ));
    }
    if let Some(f) = p.faithfulness() {
        footer.push_str(&format!("\n\nfaithfulness: {}", f.summary()));
    }
    let (target_now, target_stale) = p.now(&a.target);
    if !a.generated_response && !target_stale && target_now.contains(&at) {
        return Some(markdown(
            format!(
                "**Salience target** — log p = {:.4} over {} tokens\n\n{footer}",
                a.target_log_probs.iter().sum::<f32>(),
                a.target_log_probs.len()
            ),
            convert::range(&doc.rope, &target_now, st.encoding),
        ));
    }
    let (index, seg, now) = p
        .level
        .segments
        .iter()
        .enumerate()
        .map(|(i, s)| (i, s, p.now(&(s.start..s.end))))
        .find(|(_, _, (now, _))| now.start <= at && at < now.end)?;
    let (now, stale) = now;
    if stale {
        return Some(markdown(
            format!(
                "**Edited since computed** — this {} was {:+.4} before the edit; run *Compute salience* again\n\n{footer}",
                p.level.name, seg.score
            ),
            convert::range(&doc.rope, &now, st.encoding),
        ));
    }
    let n = p.level.segments.len();
    if p.difference {
        let before = p.before_of(index).unwrap_or(0.0);
        let text = format!(
            "**Change since the previous result** {:+.4}\n\nbefore {:+.4} → now {:+.4}\n\n{footer}",
            seg.score,
            before,
            before + seg.score
        );
        return Some(markdown(text, convert::range(&doc.rope, &now, st.encoding)));
    }
    let before = match p.before_of(index) {
        Some(b) => format!(
            "\n\nbefore the last change: {b:+.4} → now {:+.4} ({:+.4})",
            seg.score,
            seg.score - b
        ),
        None if p.previous.is_some() => "\n\nnew since the previous result".to_string(),
        None if p.incomparable.is_some() => {
            format!("\n\n{}", p.incomparable.as_deref().unwrap_or_default())
        }
        None => String::new(),
    };
    let sign = match (&a.contrast, seg.score >= 0.0) {
        _ if !a.method.is_signed() => "gradient magnitude (unsigned)".to_string(),
        (Some(c), true) => format!("**favours** the target over \"{}\"", c.text),
        (Some(c), false) => format!("**favours** \"{}\" over the target", c.text),
        (None, true) => "**raises** the target's probability".to_string(),
        (None, false) => "**lowers** the target's probability".to_string(),
    };
    let text = format!(
        "**Salience** {:+.4} (normalized {:+.2})\n\n{} of {} {}s · {:.1}% of the total |score| · {}{}\n\ntarget{}: \"{}{}\"\n\n{}",
        seg.score,
        seg.normalized,
        ordinal(seg.rank),
        n,
        p.level.name,
        seg.share * 100.0,
        sign,
        before,
        if a.generated_response { " (generated response, not in the file)" } else { "" },
        target.replace('\n', " "),
        ellipsis,
        footer
    );
    Some(markdown(text, convert::range(&doc.rope, &now, st.encoding)))
}

fn markdown(value: String, range: tower_lsp_server::lsp_types::Range) -> Hover {
    Hover {
        contents: HoverContents::Markup(MarkupContent {
            kind: MarkupKind::Markdown,
            value,
        }),
        range: Some(range),
    }
}
