//! One self-contained HTML file: no network, every level embedded, granularity switch and
//! gain slider in a few lines of script. User text only ever reaches the page through
//! `textContent` or as escaped JSON.

use serde_json::Value;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON that is safe inside a <script> element.
fn script_json(v: &Value) -> String {
    serde_json::to_string(v)
        .expect("json")
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

pub fn html(report: &Value) -> String {
    let title = format!(
        "prompt-salience: {}",
        report["file"].as_str().unwrap_or("prompt")
    );
    format!(
        r##"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 15px/1.6 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; color: #222; }}
header {{ display: flex; flex-wrap: wrap; gap: 1rem 2rem; align-items: center; margin-bottom: 1rem; }}
#text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 14px; border: 1px solid #ddd; border-radius: 6px; padding: 1rem; }}
.seg {{ border-radius: 3px; cursor: help; }}
.target {{ outline: 2px solid #333; border-radius: 3px; font-weight: 600; }}
.meta {{ color: #555; font-size: 13px; }}
.legend span {{ display: inline-block; padding: 0 .5em; margin-right: 2px; border-radius: 3px; font-size: 12px; }}
table {{ border-collapse: collapse; font-size: 13px; margin-top: 1rem; }}
td, th {{ padding: 2px 8px; text-align: left; border-bottom: 1px solid #eee; }}
</style></head>
<body>
<h1 style="font-size:1.3rem">{title_escaped}</h1>
<header>
<label>Granularity <select id="granularity"></select></label>
<label>Gain <input id="gain" type="range" min="0.25" max="6" step="0.25"> <span id="gainValue"></span></label>
<span class="legend" id="legend"></span>
</header>
<div id="text"></div>
<p class="meta" id="summary"></p>
<div id="faithfulness"></div>
<table id="top"><thead><tr><th>rank</th><th>score</th><th>share</th><th>segment</th></tr></thead><tbody></tbody></table>
<script id="data" type="application/json">{data}</script>
<script>
const R = JSON.parse(document.getElementById('data').textContent);
const signed = R.signed;
const sel = document.getElementById('granularity'), gain = document.getElementById('gain');
for (const name of Object.keys(R.levels)) {{ const o = document.createElement('option'); o.value = o.textContent = name; sel.appendChild(o); }}
sel.value = R.granularity in R.levels ? R.granularity : 'sentence';
gain.value = R.gain;
function colour(norm, g) {{
  const a = 1 - Math.pow(1 - Math.min(1, Math.abs(norm)), Math.max(0.05, g));
  const rgb = !signed ? '40,110,220' : (norm >= 0 ? '30,160,70' : '210,50,50');
  return `rgba(${{rgb}},${{(0.85 * a).toFixed(3)}})`;
}}
function ordinal(n) {{ const s = ['th','st','nd','rd'], v = n % 100; return n + (s[(v - 20) % 10] || s[v] || s[0]); }}
function render() {{
  const L = R.levels[sel.value], g = parseFloat(gain.value);
  document.getElementById('gainValue').textContent = g.toFixed(2);
  const box = document.getElementById('text'); box.textContent = '';
  let pos = R.prompt.start;
  const plain = (a, b) => {{ if (b > a) box.appendChild(document.createTextNode(R.text.slice(a, b))); }};
  // Offsets are UTF-8 bytes: slice on an encoded copy.
  const bytes = new TextEncoder().encode(R.text), dec = new TextDecoder();
  const slice = (a, b) => dec.decode(bytes.slice(a, b));
  const text = (a, b) => {{ if (b > a) box.appendChild(document.createTextNode(slice(a, b))); }};
  for (const s of L.segments) {{
    text(pos, s.start);
    const span = document.createElement('span');
    span.className = 'seg'; span.textContent = slice(s.start, s.end);
    span.style.background = colour(s.normalized, g);
    span.title = `score ${{s.score.toFixed(4)}} (normalized ${{s.normalized.toFixed(2)}})\n${{ordinal(s.rank)}} of ${{L.segments.length}} ${{L.name}}s, ${{(100 * s.share).toFixed(1)}}% of total |score|` + (signed ? (s.score >= 0 ? '\nraises' : '\nlowers') + ' the target\'s probability' : '');
    box.appendChild(span); pos = s.end;
  }}
  text(pos, R.target.start);
  const t = document.createElement('span'); t.className = 'target'; t.title = 'target';
  t.textContent = slice(R.target.start, R.target.end); box.appendChild(t);
  const tb = document.querySelector('#top tbody'); tb.textContent = '';
  for (const s of [...L.segments].sort((a, b) => a.rank - b.rank).slice(0, 8)) {{
    const tr = document.createElement('tr');
    for (const v of [s.rank, s.score.toFixed(4), (100 * s.share).toFixed(1) + '%', slice(s.start, s.end).slice(0, 90)]) {{
      const td = document.createElement('td'); td.textContent = v; tr.appendChild(td);
    }}
    tb.appendChild(tr);
  }}
  const lg = document.getElementById('legend'); lg.textContent = '';
  for (const v of signed ? [-1, -0.5, 0, 0.5, 1] : [0, 0.25, 0.5, 0.75, 1]) {{
    const sp = document.createElement('span'); sp.style.background = colour(v, g); sp.textContent = v.toFixed(2); lg.appendChild(sp);
  }}
  let sum = `model ${{R.model}} · method ${{R.method}} · ${{R.objective_text}} · ${{R.seconds.toFixed(2)}} s` +
    (signed ? ' · green raises the target\'s probability, red lowers it' : ' · gradient magnitude') +
    ` · template tokens: ${{(100 * L.template_share).toFixed(1)}}% of |score|`;
  if (R.ig) sum += ` · IG: ${{R.ig.steps}} gradients, completeness gap ${{(100 * R.ig.completeness_gap).toFixed(1)}}%` +
    (R.ig_unreliable ? ' (not reliable: the attributions miss F(input) − F(baseline) by that much)' : '');
  if (R.response.generated) sum += ' · response generated for this report (not in the file)';
  if (R.perturbation) sum += ` · ${{R.perturbation.segments}} ${{R.perturbation.level}}s deleted in ${{R.perturbation.forward_passes}} forward passes` +
    (R.perturbation.surrogate ? `, surrogate held-out R² ${{R.perturbation.surrogate.held_out_r2.toFixed(2)}}` : '');
  document.getElementById('summary').textContent = sum;
  const F = R.faithfulness, fb = document.getElementById('faithfulness'); fb.textContent = '';
  if (F) {{
    const p = document.createElement('p'); p.className = 'meta';
    p.textContent = `Faithfulness (${{F.level}}s, seed ${{F.seed}}): ${{F.verdict}}: ${{F.reason}}`; fb.appendChild(p);
    const tbl = document.createElement('table'); tbl.id = 'deletion';
    const head = tbl.createTHead().insertRow();
    for (const h of ['deleted', 'top segments: drop in F', 'random: mean ± sd']) {{ const th = document.createElement('th'); th.textContent = h; head.appendChild(th); }}
    for (const q of F.points) {{
      const row = tbl.insertRow();
      for (const v of [`${{(100 * q.fraction).toFixed(0)}} % (${{q.deleted}} of ${{F.segments}})`, q.top_drop.toFixed(3), `${{q.random_mean.toFixed(3)}} ± ${{q.random_sd.toFixed(3)}}`]) row.insertCell().textContent = v;
    }}
    fb.appendChild(tbl);
  }}
}}
sel.addEventListener('change', render); gain.addEventListener('input', render); render();
</script>
</body></html>
"##,
        title = escape(&title),
        title_escaped = escape(&title),
        data = script_json(report),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_text_cannot_break_out() {
        let v =
            serde_json::json!({"file": "<b>x</b>", "text": "</script><script>alert(1)</script>"});
        let page = html(&v);
        assert!(!page.contains("</script><script>alert"));
        assert!(!page.contains("<b>x</b>"));
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt;"));
    }
}
