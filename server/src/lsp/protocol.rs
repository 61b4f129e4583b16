//! What this server adds to LSP, declared once: the commands with their typed arguments, the
//! semantic-token legend, and the `promptSalience/result` notification. Documented in the README.

use salience_core::prompt_file::Granularity;
use salience_engine::salience::Method;
use serde::{Deserialize, Serialize};
use tower_lsp_server::lsp_types::notification::Notification;
use tower_lsp_server::lsp_types::{
    Range, SemanticTokenModifier, SemanticTokenType, SemanticTokensLegend, Uri,
};

pub const COMPUTE: &str = "promptSalience.compute";
pub const GENERATE: &str = "promptSalience.generate";
pub const SET_GRANULARITY: &str = "promptSalience.setGranularity";
pub const SET_GAIN: &str = "promptSalience.setGain";
pub const SET_METHOD: &str = "promptSalience.setMethod";
pub const CLEAR: &str = "promptSalience.clear";
pub const CHECK_FAITHFULNESS: &str = "promptSalience.checkFaithfulness";
pub const SHOW_DIFFERENCE: &str = "promptSalience.showDifference";
pub const COMMANDS: [&str; 8] = [
    COMPUTE,
    GENERATE,
    SET_GRANULARITY,
    SET_GAIN,
    SET_METHOD,
    CLEAR,
    CHECK_FAITHFULNESS,
    SHOW_DIFFERENCE,
];

/// A `workspace/executeCommand` request, typed: the command's name picks the variant, and its
/// first argument (one JSON object) is deserialized into that variant's arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Explain a target (the selection, else the response) by salience over the prompt.
    Compute(ComputeArgs),
    /// Generate the response and ask the client to apply it as an edit.
    Generate(DocumentArgs),
    /// Re-render the painted map at another granularity (perturbation maps recompute).
    SetGranularity(SetGranularityArgs),
    /// Re-render with another display gain.
    SetGain(SetGainArgs),
    /// Switch between the gradient methods without a run, or compute with another method.
    SetMethod(SetMethodArgs),
    /// Remove the painted map.
    Clear(DocumentArgs),
    /// The deletion test of the painted map at its segmentation (cached; also run in the
    /// background after each result unless the client turns that off).
    CheckFaithfulness(DocumentArgs),
    /// Paint the change since the previous result, or the scores again.
    ShowDifference(ShowDifferenceArgs),
}

impl Command {
    /// Parses a command's name and arguments; the message says what is wrong.
    pub fn parse(name: &str, arguments: &[serde_json::Value]) -> Result<Self, String> {
        fn args<T: serde::de::DeserializeOwned>(
            name: &str,
            arguments: &[serde_json::Value],
        ) -> Result<T, String> {
            let first = match arguments.first() {
                // A bare uri stands for `{uri}`.
                Some(serde_json::Value::String(uri)) => serde_json::json!({ "uri": uri }),
                Some(object) => object.clone(),
                None => return Err(format!("{name}: missing arguments: expected {{uri, ...}}")),
            };
            T::deserialize(first).map_err(|e| format!("{name}: {e}"))
        }
        Ok(match name {
            COMPUTE => Command::Compute(args(name, arguments)?),
            GENERATE => Command::Generate(args(name, arguments)?),
            SET_GRANULARITY => Command::SetGranularity(args(name, arguments)?),
            SET_GAIN => Command::SetGain(args(name, arguments)?),
            SET_METHOD => Command::SetMethod(args(name, arguments)?),
            CLEAR => Command::Clear(args(name, arguments)?),
            CHECK_FAITHFULNESS => Command::CheckFaithfulness(args(name, arguments)?),
            SHOW_DIFFERENCE => Command::ShowDifference(args(name, arguments)?),
            other => return Err(format!("unknown command `{other}`")),
        })
    }
}

/// `{uri}`: commands that need only the document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocumentArgs {
    pub uri: Uri,
}

/// `{uri, range?, method?, contrast?, granularity?}`: what is given here wins over the file's
/// front matter, which wins over the client's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComputeArgs {
    pub uri: Uri,
    /// The target (the editor's selection); none or empty: the whole response.
    #[serde(default)]
    pub range: Option<Range>,
    #[serde(default)]
    pub method: Option<Method>,
    /// Explain why the target rather than this text.
    #[serde(default)]
    pub contrast: Option<String>,
    #[serde(default)]
    pub granularity: Option<Granularity>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetGranularityArgs {
    pub uri: Uri,
    #[serde(alias = "value")]
    pub granularity: GranularityChoice,
}

/// A standard granularity, or `custom`: the file's `salience.separators`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum GranularityChoice {
    Standard(Granularity),
    Custom(CustomWord),
}

/// The word `custom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CustomWord {
    Custom,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetGainArgs {
    pub uri: Uri,
    #[serde(alias = "value")]
    pub gain: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetMethodArgs {
    pub uri: Uri,
    #[serde(alias = "value")]
    pub method: Method,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShowDifferenceArgs {
    pub uri: Uri,
    /// On (the default) or off.
    #[serde(default = "yes")]
    pub value: bool,
}

fn yes() -> bool {
    true
}

/// Semantic token types, in legend order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// A scored segment; its modifiers carry sign and level.
    Salience = 0,
    /// The target span being explained.
    SalienceTarget = 1,
}

/// Modifier bits: `positive`, `negative`, then `level1` .. `level8`.
pub const MOD_POSITIVE: u32 = 1 << 0;
pub const MOD_NEGATIVE: u32 = 1 << 1;
pub fn level_modifier(level: u8) -> u32 {
    if level == 0 {
        0
    } else {
        1 << (1 + level as u32)
    }
}

pub fn legend() -> SemanticTokensLegend {
    let mut modifiers = vec![
        SemanticTokenModifier::new("positive"),
        SemanticTokenModifier::new("negative"),
    ];
    for l in 1..=salience_core::segments::LEVELS {
        modifiers.push(SemanticTokenModifier::new(Box::leak(
            format!("level{l}").into_boxed_str(),
        )));
    }
    SemanticTokensLegend {
        token_types: vec![
            SemanticTokenType::new("salience"),
            SemanticTokenType::new("salienceTarget"),
        ],
        token_modifiers: modifiers,
    }
}

/// `promptSalience/result`: the painted segments, for clients that draw backgrounds.
pub enum ResultNotification {}

impl Notification for ResultNotification {
    type Params = ResultParams;
    const METHOD: &'static str = "promptSalience/result";
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultParams {
    pub uri: Uri,
    /// The document version the ranges are for (later than the one computed on when the
    /// map follows edits).
    pub version: i32,
    pub model: String,
    pub method: String,
    pub signed: bool,
    pub granularity: String,
    pub gain: f32,
    pub objective: f32,
    /// The target's range; null when the target is a response generated in memory (the file
    /// has none), whose text is then in `generatedResponse`.
    pub target: Option<Range>,
    pub generated_response: Option<String>,
    /// The contrastive alternative, when the objective is ln p(target) - ln p(contrast).
    pub contrast: Option<String>,
    /// The segments show the change since the previous result, not the scores.
    pub difference: bool,
    /// The faithfulness check's one-line verdict at this granularity, once it has run.
    pub faithfulness: Option<String>,
    /// The document changed since the map was computed: segments moved with the edits, and
    /// the ones an edit touched are `stale`.
    pub edited: bool,
    pub segments: Vec<SegmentInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SegmentInfo {
    pub range: Range,
    pub score: f32,
    pub normalized: f32,
    pub level: u8,
    pub rank: usize,
    pub share: f32,
    /// The segment's score in the previous result, when it existed there.
    pub before: Option<f32>,
    /// An edit touched the segment since the map was computed: its `level` is 0 (no colour).
    pub stale: bool,
}
