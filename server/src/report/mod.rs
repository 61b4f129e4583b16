//! Reports of an analysis: terminal (24-bit colour), JSON (versioned schema), HTML (one
//! self-contained file with every level embedded).

pub mod colors;
pub mod compare;
mod html;

use serde_json::{json, Value};

use salience_core::analysis::Analysis;
use salience_core::faithfulness::Faithfulness;
use salience_core::prompt_file::Granularity;
use salience_core::segments::{intensity, LevelResult, Segmentation};

pub use html::html;

pub const SCHEMA_VERSION: u32 = 1;

/// Every standard level, plus the custom one when given.
pub fn all_levels(a: &Analysis, custom: Option<&Segmentation>, gain: f32) -> Vec<LevelResult> {
    let mut out: Vec<LevelResult> = Granularity::ALL
        .iter()
        .map(|g| a.level(&Segmentation::Standard(*g), gain))
        .collect();
    if let Some(c) = custom {
        out.push(a.level(c, gain));
    }
    out
}

fn level_json(a: &Analysis, l: &LevelResult) -> Value {
    json!({
        "name": l.name,
        "template_score": l.template_score,
        "template_share": l.template_share,
        "segments": l.segments.iter().map(|s| json!({
            "start": s.start,
            "end": s.end,
            "text": &a.text[s.start..s.end],
            "score": s.score,
            "normalized": s.normalized,
            "level": s.level,
            "rank": s.rank,
            "share": s.share,
        })).collect::<Vec<_>>(),
    })
}

/// The JSON report (schema in docs/json-schema.md).
pub fn json(
    a: &Analysis,
    file: &str,
    selected: &Segmentation,
    custom: Option<&Segmentation>,
    gain: f32,
    faithfulness: Option<&Faithfulness>,
) -> Value {
    let levels: serde_json::Map<String, Value> = all_levels(a, custom, gain)
        .iter()
        .map(|l| (l.name.clone(), level_json(a, l)))
        .collect();
    json!({
        "schema": "prompt-salience/compute",
        "version": SCHEMA_VERSION,
        "file": file,
        "model": a.model,
        "method": a.method.name(),
        "signed": a.method.is_signed(),
        "template": a.template,
        "objective": a.objective,
        "objective_text": a.objective_text(),
        "contrast": a.contrast.as_ref().map(|c| json!({
            "text": c.text,
            "log_probs": c.log_probs,
        })),
        "perturbation": a.perturbation,
        "faithfulness": faithfulness,
        "seconds": a.seconds,
        "gain": gain,
        "granularity": selected.name(),
        "prompt": {"start": a.prompt.start, "end": a.prompt.end},
        "response": {"start": a.response.start, "end": a.response.end, "generated": a.generated_response},
        "target": {
            "start": a.target.start,
            "end": a.target.end,
            "text": a.target_text(),
            "log_probs": a.target_log_probs,
        },
        "ig": a.ig,
        "ig_unreliable": a.ig.as_ref().map(|ig| ig.completeness_gap > UNRELIABLE_GAP),
        "tokens": a.tokens.iter().map(|t| json!({
            "id": t.id,
            "text": t.text,
            "start": t.range.as_ref().map(|r| r.start),
            "end": t.range.as_ref().map(|r| r.end),
            "score": t.score,
        })).collect::<Vec<_>>(),
        "levels": levels,
        "text": a.text,
    })
}

/// The prompt (and any response before the target) with coloured segments, the target
/// underlined, a legend, the top segments and a summary.
pub fn terminal(a: &Analysis, level: &LevelResult, gain: f32) -> String {
    let signed = a.method.is_signed();
    let mut pieces: Vec<(String, Option<f32>)> = Vec::new();
    let mut pos = a.prompt.start;
    for s in &level.segments {
        if s.start > pos {
            pieces.push((a.text[pos..s.start].to_string(), None));
        }
        let shade = intensity(s.normalized.abs(), gain) * s.normalized.signum();
        pieces.push((a.text[s.start..s.end].to_string(), Some(shade)));
        pos = s.end;
    }
    if a.target.start > pos {
        pieces.push((a.text[pos..a.target.start].to_string(), None));
    }
    let mut out = colors::render(&pieces, signed);
    out.push_str(&format!(
        "\x1b[1;4m{}\x1b[0m\n\n",
        &a.text[a.target.clone()]
    ));
    out.push_str(&colors::legend(signed));
    out.push('\n');
    let mut top: Vec<_> = level.segments.iter().collect();
    top.sort_by_key(|s| s.rank);
    out.push_str(&format!("top {}s:\n", level.name));
    for s in top.iter().take(5) {
        let text: String = a.text[s.start..s.end].chars().take(70).collect();
        out.push_str(&format!(
            "  {:>2}. {:+.4}  {:>5.1}%  {:?}\n",
            s.rank,
            s.score,
            s.share * 100.0,
            text.replace('\n', " ")
        ));
    }
    if level.template_share > 0.0 {
        out.push_str(&format!(
            "template tokens: {:+.4} ({:.1}% of |score|)\n",
            level.template_score,
            level.template_share * 100.0
        ));
    }
    let target: String = a.target_text().chars().take(60).collect();
    out.push_str(&format!(
        "target: {target:?}{}\nmodel: {}  method: {}  granularity: {}  {}  salience: {:.2}s",
        if a.generated_response {
            " (generated, not saved)"
        } else {
            ""
        },
        a.model,
        a.method.name(),
        level.name,
        a.objective_text(),
        a.seconds
    ));
    if let Some(p) = &a.perturbation {
        out.push_str(&format!(
            "\n{} {}s deleted in {} forward passes",
            p.segments, p.level, p.forward_passes
        ));
        if let Some(s) = &p.surrogate {
            out.push_str(&format!(
                "; surrogate from {} masks, held-out R² {:.2} ({} masks)",
                s.samples, s.held_out_r2, s.held_out
            ));
        }
    }
    if let Some(ig) = &a.ig {
        out.push_str(&format!(
            "  IG: {} gradients, {:?} baseline, completeness gap {:.1}%",
            ig.steps,
            ig.baseline,
            ig.completeness_gap * 100.0
        ));
        if ig.completeness_gap > UNRELIABLE_GAP {
            out.push_str(&format!(
                "\nwarning: the attributions miss F(input) - F(baseline) by {:.0} %: this integrated-gradients map is not reliable (more --max-steps, or another method)",
                ig.completeness_gap * 100.0
            ));
        }
    }
    out.push('\n');
    out
}

/// Above this completeness gap, reports warn that an integrated-gradients map is unreliable.
pub const UNRELIABLE_GAP: f32 = 0.25;

/// The deletion test as a few lines: the verdict and the curve.
pub fn faithfulness_text(f: &Faithfulness) -> String {
    let mut out = format!("faithfulness: {}\n", f.summary());
    for p in &f.points {
        let baseline = if p.random.exact {
            format!("all {} deletions", p.random.drops.len())
        } else {
            format!(
                "{} random, s.e. {:.3}",
                p.random.drops.len(),
                p.random.standard_error
            )
        };
        out.push_str(&format!(
            "  delete {:>2} {}s: top {:+.3} (as good: {:>3.0} %)",
            p.deleted,
            f.level,
            p.top.drop,
            100.0 * p.top.as_good
        ));
        if let Some(b) = &p.bottom {
            out.push_str(&format!(
                "   most negative {:+.3} (as good: {:>3.0} %)",
                b.drop,
                100.0 * b.as_good
            ));
        }
        out.push_str(&format!(
            "   random {:+.3} ± {:.3} ({baseline})\n",
            p.random.mean, p.random.sd
        ));
    }
    out.push_str("  (a drop is F(full) − F(without those segments): positive lowers F)\n");
    out
}
