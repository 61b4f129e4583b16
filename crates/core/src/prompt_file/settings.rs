//! The `salience:` key of the front matter. Other keys (description, model, mode, tools, …)
//! belong to other tools and are kept as they are.

use serde_json::Value;

use crate::options::limits;

use salience_engine::prompt::TemplateMode;
use salience_engine::salience::{Baseline, Method};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Token,
    Word,
    Sentence,
    Line,
    Paragraph,
    Block,
}

impl Granularity {
    pub const ALL: [Granularity; 6] = [
        Granularity::Token,
        Granularity::Word,
        Granularity::Sentence,
        Granularity::Line,
        Granularity::Paragraph,
        Granularity::Block,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Granularity::Token => "token",
            Granularity::Word => "word",
            Granularity::Sentence => "sentence",
            Granularity::Line => "line",
            Granularity::Paragraph => "paragraph",
            Granularity::Block => "block",
        }
    }
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Granularity::ALL
            .into_iter()
            .find(|g| g.name() == s)
            .ok_or_else(|| {
                format!("unknown granularity `{s}` (token, word, sentence, line, paragraph, block)")
            })
    }
}

/// Everything under `salience:`; None means "not set here" (the caller's default applies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SalienceSettings {
    pub model: Option<String>,
    pub template: Option<TemplateMode>,
    pub system: Option<String>,
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub method: Option<Method>,
    pub granularity: Option<Granularity>,
    /// Custom segment separators (a regex); used when granularity is not set.
    pub separators: Option<String>,
    pub gain: Option<f32>,
    pub ig_steps: Option<usize>,
    pub baseline: Option<Baseline>,
    /// A contrastive alternative: explain why the target rather than this.
    pub contrast: Option<String>,
    /// Random ablation masks for `ablation_surrogate`.
    pub samples: Option<usize>,
    /// Seed of the ablation masks (and, on the command line, of the faithfulness check).
    pub perturbation_seed: Option<u64>,
}

impl SalienceSettings {
    /// Nothing set (as `default()`, usable in a `static`).
    pub const EMPTY: SalienceSettings = SalienceSettings {
        model: None,
        template: None,
        system: None,
        max_new_tokens: None,
        temperature: None,
        top_p: None,
        seed: None,
        stop: Vec::new(),
        method: None,
        granularity: None,
        separators: None,
        gain: None,
        ig_steps: None,
        baseline: None,
        contrast: None,
        samples: None,
        perturbation_seed: None,
    };
}

/// Parses the front matter's YAML. Returns the settings that could be read, and errors as
/// (byte offset in the YAML, message).
pub fn from_front_matter(yaml: &str) -> (SalienceSettings, Vec<(usize, String)>) {
    let mut errors = Vec::new();
    let mut s = SalienceSettings::default();
    if yaml.trim().is_empty() {
        return (s, errors);
    }
    let doc: Value = match serde_saphyr::from_str(yaml) {
        Ok(v) => v,
        Err(e) => {
            let offset = e
                .location()
                .map(|l| offset_of(yaml, l.line() as usize, l.column() as usize))
                .unwrap_or(0);
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("").to_string();
            errors.push((offset, format!("front matter is not valid YAML: {first}")));
            return (s, errors);
        }
    };
    let Some(sal) = doc.get("salience") else {
        return (s, errors);
    };
    let Some(map) = sal.as_object() else {
        errors.push((
            key_offset(yaml, "salience"),
            "`salience` must be a mapping of settings".into(),
        ));
        return (s, errors);
    };
    for (key, value) in map {
        let at = key_offset(yaml, key);
        let mut err = |m: String| errors.push((at, format!("salience.{key}: {m}")));
        let as_str = |v: &Value| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_f64().map(|f| f.to_string()))
        };
        match key.as_str() {
            "model" => match as_str(value) {
                Some(m) => s.model = Some(m),
                None => err("expected a model name or a path".into()),
            },
            "template" => match value.as_str().map(str::parse::<TemplateMode>) {
                Some(Ok(t)) => s.template = Some(t),
                Some(Err(e)) => err(e),
                None => err("expected chat or raw".into()),
            },
            "system" => match value.as_str() {
                Some(t) => s.system = Some(t.to_string()),
                None => err("expected text".into()),
            },
            "contrast" => match as_str(value) {
                Some(t) if !t.trim().is_empty() => s.contrast = Some(t),
                _ => err("expected the alternative completion, as text".into()),
            },
            "seed" | "perturbation_seed" => match value.as_u64() {
                Some(n) if key == "seed" => s.seed = Some(n),
                Some(n) => s.perturbation_seed = Some(n),
                None => err(format!("expected a whole number ≥ 0, found {value}")),
            },
            "max_new_tokens" | "ig_steps" | "samples" => {
                let max = match key.as_str() {
                    "max_new_tokens" => limits::MAX_NEW_TOKENS,
                    "ig_steps" => limits::IG_STEPS,
                    _ => limits::SAMPLES,
                };
                let n = value
                    .as_u64()
                    .ok_or_else(|| format!("expected a positive whole number, found {value}"))
                    .and_then(|n| limits::count(n, max));
                match (key.as_str(), n) {
                    ("max_new_tokens", Ok(n)) => s.max_new_tokens = Some(n),
                    ("ig_steps", Ok(n)) => s.ig_steps = Some(n),
                    (_, Ok(n)) => s.samples = Some(n),
                    (_, Err(e)) => err(e),
                }
            }
            "temperature" | "top_p" | "gain" => {
                let (max, positive) = match key.as_str() {
                    "temperature" => (limits::TEMPERATURE, false),
                    "top_p" => (1.0, false),
                    _ => (limits::GAIN, true),
                };
                let x = value
                    .as_f64()
                    .ok_or_else(|| format!("expected a number, found {value}"))
                    .and_then(|x| limits::number(x, max, positive));
                match (key.as_str(), x) {
                    ("temperature", Ok(x)) => s.temperature = Some(x),
                    ("top_p", Ok(x)) => s.top_p = Some(x),
                    (_, Ok(x)) => s.gain = Some(x),
                    (_, Err(e)) => err(e),
                }
            }
            "stop" => {
                let stop = match value {
                    Value::String(t) => Some(vec![t.clone()]),
                    Value::Array(a) if a.iter().all(|v| v.is_string()) => Some(
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect(),
                    ),
                    _ => None,
                };
                match stop.map(|t| limits::stop(&t).map(|()| t)) {
                    Some(Ok(t)) => s.stop = t,
                    Some(Err(e)) => err(e),
                    None => err("expected text or a list of texts".into()),
                }
            }
            "method" => match value.as_str().map(str::parse::<Method>) {
                Some(Ok(m)) => s.method = Some(m),
                Some(Err(e)) => err(e),
                None => err("expected a method name".into()),
            },
            "granularity" => match value.as_str().map(str::parse::<Granularity>) {
                Some(Ok(g)) => s.granularity = Some(g),
                Some(Err(e)) => err(e),
                None => err("expected a granularity".into()),
            },
            "separators" => match value.as_str() {
                Some(r) => match limits::separators(r) {
                    Ok(_) => s.separators = Some(r.to_string()),
                    Err(e) => err(e),
                },
                None => err("expected a regex".into()),
            },
            "baseline" => match value.as_str().map(str::parse::<Baseline>) {
                Some(Ok(b)) => s.baseline = Some(b),
                Some(Err(e)) => err(e),
                None => err("expected zero, pad or mean".into()),
            },
            other => err(format!("unknown setting `{other}`")),
        }
    }
    (s, errors)
}

/// Byte offset of a 1-based line and column.
fn offset_of(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let col = column.saturating_sub(1);
            return offset + l.char_indices().nth(col).map_or(l.len(), |(b, _)| b);
        }
        offset += l.len();
    }
    text.len()
}

/// Where `key:` is written, to point errors at the right line.
fn key_offset(yaml: &str, key: &str) -> usize {
    let mut offset = 0;
    for l in yaml.split_inclusive('\n') {
        let trimmed = l.trim_start();
        if trimmed.starts_with(key) && trimmed[key.len()..].trim_start().starts_with(':') {
            return offset + (l.len() - trimmed.len());
        }
        offset += l.len();
    }
    0
}
