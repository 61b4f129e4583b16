//! What this server adds to LSP: command names, the semantic-token legend, and the
//! `promptSalience/result` notification. Documented in the README.

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
/// The deletion test of the painted map at its granularity (cached; also run in the
/// background after each result unless the client turns that off).
pub const CHECK_FAITHFULNESS: &str = "promptSalience.checkFaithfulness";
/// `{uri, value: bool}`: paint the change since the previous result, or the scores again.
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
    for l in 1..=crate::segments::LEVELS {
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
    /// The document version the result belongs to.
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
}
