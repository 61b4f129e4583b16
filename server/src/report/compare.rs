//! Two maps side by side (two prompt files, or two models on one file), aligned by segment,
//! each with its target and faithfulness figures: JSON, terminal and one static HTML page.

use serde_json::{json, Value};

use super::colors::heat_rgb;
use super::html::escape;
use salience_core::analysis::Analysis;
use salience_core::compare::{align_levels, Row};
use salience_core::faithfulness::Faithfulness;
use salience_core::segments::{intensity, LevelResult};

/// One map of a comparison.
pub struct Side<'a> {
    /// What tells the two apart: a file name, a model name.
    pub label: String,
    pub analysis: &'a Analysis,
    pub level: &'a LevelResult,
    pub faithfulness: Option<&'a Faithfulness>,
}

fn rows(a: &Side, b: &Side) -> Vec<Row> {
    align_levels(&a.analysis.text, a.level, &b.analysis.text, b.level)
}

fn side_json(s: &Side) -> Value {
    json!({
        "label": s.label,
        "model": s.analysis.model,
        "method": s.analysis.method.name(),
        "objective": s.analysis.objective,
        "objective_text": s.analysis.objective_text(),
        "target": s.analysis.target_text(),
        "granularity": s.level.name,
        "faithfulness": s.faithfulness,
        "segments": s.level.segments.iter().map(|g| json!({
            "start": g.start, "end": g.end, "text": &s.analysis.text[g.start..g.end],
            "score": g.score, "rank": g.rank, "share": g.share,
        })).collect::<Vec<_>>(),
    })
}

pub fn json(a: &Side, b: &Side) -> Value {
    json!({
        "schema": "prompt-salience/compare",
        "version": 1,
        "a": side_json(a),
        "b": side_json(b),
        "rows": rows(a, b).iter().map(|r| json!({"a": r.before, "b": r.after})).collect::<Vec<_>>(),
    })
}

fn one_line(s: &str, max: usize) -> String {
    let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        flat.chars().take(max - 1).collect::<String>() + "…"
    } else {
        flat
    }
}

pub fn terminal(a: &Side, b: &Side) -> String {
    let mut out = String::new();
    for (name, s) in [("A", a), ("B", b)] {
        out.push_str(&format!(
            "{name}: {} — {} · {} · target {:?}\n",
            s.label,
            s.analysis.method.name(),
            s.analysis.objective_text(),
            one_line(s.analysis.target_text(), 50)
        ));
        if let Some(f) = s.faithfulness {
            out.push_str(&format!("   faithfulness: {}\n", f.summary()));
        }
    }
    out.push_str(&format!(
        "\n{:>9} {:>4}  {:>9} {:>4}  {}\n",
        "A score", "rank", "B score", "rank", a.level.name
    ));
    let cell = |s: &Side, i: Option<usize>| match i {
        Some(i) => format!(
            "{:>+9.4} {:>4}",
            s.level.segments[i].score, s.level.segments[i].rank
        ),
        None => format!("{:>9} {:>4}", "—", ""),
    };
    for r in rows(a, b) {
        let text = match (r.after, r.before) {
            (Some(j), _) => {
                let g = &b.level.segments[j];
                &b.analysis.text[g.start..g.end]
            }
            (None, Some(i)) => {
                let g = &a.level.segments[i];
                &a.analysis.text[g.start..g.end]
            }
            (None, None) => "",
        };
        out.push_str(&format!(
            "{}  {}  {}\n",
            cell(a, r.before),
            cell(b, r.after),
            one_line(text, 70)
        ));
    }
    out
}

/// The terminal report's heat colour, on a scale shared by both maps.
fn colour(score: f32, max: f32, signed: bool) -> String {
    if max <= 0.0 {
        return "transparent".into();
    }
    let shade = intensity((score / max).abs().min(1.0), 1.0) * score.signum();
    let (r, g, b) = heat_rgb(shade, signed);
    format!("rgb({r},{g},{b})")
}

fn painted(s: &Side, max: f32) -> String {
    let a = s.analysis;
    let signed = a.method.is_signed();
    let mut out = String::new();
    let mut pos = a.prompt.start;
    for g in &s.level.segments {
        out.push_str(&escape(&a.text[pos..g.start]));
        out.push_str(&format!(
            r#"<span style="background:{}" title="score {:+.4} · rank {} · {:.1}%">{}</span>"#,
            colour(g.score, max, signed),
            g.score,
            g.rank,
            g.share * 100.0,
            escape(&a.text[g.start..g.end])
        ));
        pos = g.end;
    }
    out.push_str(&escape(&a.text[pos..a.target.start.max(pos)]));
    out.push_str(&format!(
        r#"<span class="target">{}</span>"#,
        escape(a.target_text())
    ));
    out
}

fn faithfulness_html(f: Option<&Faithfulness>) -> String {
    let Some(f) = f else {
        return "<p class=meta>faithfulness: not checked</p>".into();
    };
    let mut out = format!(
        "<p class=meta>faithfulness ({}s, seed {}): {}</p><table><tr><th>deleted</th><th>top: drop in F</th><th>random: mean ± sd</th></tr>",
        escape(&f.level),
        f.seed,
        escape(&f.summary())
    );
    for p in &f.points {
        out.push_str(&format!(
            "<tr><td>{:.0} % ({} of {})</td><td>{:.3}</td><td>{:.3} ± {:.3}</td></tr>",
            p.fraction * 100.0,
            p.deleted,
            f.segments,
            p.top_drop,
            p.random_mean,
            p.random_sd
        ));
    }
    out.push_str("</table>");
    out
}

pub fn html(a: &Side, b: &Side) -> String {
    let max = a
        .level
        .segments
        .iter()
        .chain(&b.level.segments)
        .fold(0f32, |m, g| m.max(g.score.abs()));
    let column = |name: &str, s: &Side| {
        format!(
            "<section><h2>{name}: {}</h2><p class=meta>model {} · method {} · {} · target “{}”</p>{}<div class=text>{}</div></section>",
            escape(&s.label),
            escape(&s.analysis.model),
            s.analysis.method.name(),
            escape(&s.analysis.objective_text()),
            escape(&one_line(s.analysis.target_text(), 80)),
            faithfulness_html(s.faithfulness),
            painted(s, max)
        )
    };
    let mut table = String::from(
        "<table class=rows><tr><th>A score</th><th>A rank</th><th>B score</th><th>B rank</th><th>B − A</th><th>segment</th></tr>",
    );
    for r in rows(a, b) {
        let sa = r.before.map(|i| &a.level.segments[i]);
        let sb = r.after.map(|j| &b.level.segments[j]);
        let text = match (sb, sa) {
            (Some(g), _) => &b.analysis.text[g.start..g.end],
            (None, Some(g)) => &a.analysis.text[g.start..g.end],
            (None, None) => "",
        };
        let num = |g: Option<&salience_core::segments::SegmentScore>| {
            g.map_or(("—".to_string(), String::new()), |g| {
                (format!("{:+.4}", g.score), g.rank.to_string())
            })
        };
        let ((a_s, a_r), (b_s, b_r)) = (num(sa), num(sb));
        let delta = match (sa, sb) {
            (Some(x), Some(y)) => format!("{:+.4}", y.score - x.score),
            _ => String::new(),
        };
        table.push_str(&format!(
            "<tr><td>{a_s}</td><td>{a_r}</td><td>{b_s}</td><td>{b_r}</td><td>{delta}</td><td>{}</td></tr>",
            escape(&one_line(text, 100))
        ));
    }
    table.push_str("</table>");
    format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>prompt-salience: {title}</title>
<style>
body {{ font: 14px/1.55 system-ui, sans-serif; margin: 1.5rem; color: #222; }}
main {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1.5rem; }}
h2 {{ font-size: 1.05rem; margin: 0 0 .3rem; }}
.text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; border: 1px solid #ddd; border-radius: 6px; padding: .8rem; }}
.target {{ outline: 2px solid #333; border-radius: 3px; font-weight: 600; }}
.meta {{ color: #555; font-size: 12.5px; margin: .2rem 0; }}
table {{ border-collapse: collapse; font-size: 12.5px; margin: .4rem 0; }}
td, th {{ padding: 2px 8px; text-align: left; border-bottom: 1px solid #eee; }}
</style></head><body>
<h1 style="font-size:1.25rem">{title}</h1>
<p class=meta>Colours share one scale across both maps (the largest |score| of either); green raises the target's probability, red lowers it. Segments are aligned by their text; a segment that changed has no partner.</p>
<main>{col_a}{col_b}</main>
<h2 style="margin-top:1.2rem">Aligned {level}s</h2>
{table}
</body></html>
"#,
        title = escape(&format!("{} vs {}", a.label, b.label)),
        col_a = column("A", a),
        col_b = column("B", b),
        level = escape(&b.level.name),
    )
}
