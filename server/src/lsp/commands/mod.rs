//! `workspace/executeCommand`, one file per command. Commands that run the model hand their
//! work to the worker thread through [`work`] (progress, cancellation); the others re-render
//! the painted map from cached scores.
//!
//! Errors use the protocol's codes: a cancelled request answers `RequestCancelled`, a result
//! dropped because the document changed answers `ContentModified`, bad arguments
//! `InvalidParams`, and a computation that failed `RequestFailed`.

mod check_faithfulness;
mod clear;
mod compute;
mod generate;
mod set_gain;
mod set_granularity;
mod set_method;
mod show_difference;
mod work;

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::{Error, ErrorCode, Result};
use tower_lsp_server::lsp_types::{ExecuteCommandParams, LSPAny, Uri};

use super::documents::{Document, Painted};
use super::protocol::{Command, ResultNotification, ResultParams, SegmentInfo};
use super::{convert, Backend, State};
use salience_engine::EngineError;

/// LSP 3.17's `RequestFailed`: the request was valid but the work failed.
const REQUEST_FAILED: i64 = -32803;

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid_params(msg.into())
}

/// The document changed (or was repainted) while the work ran: its result is dropped.
fn content_modified(msg: &str) -> Error {
    Error {
        code: ErrorCode::ContentModified,
        message: msg.to_string().into(),
        data: None,
    }
}

fn engine_error(e: EngineError) -> Error {
    let code = match e {
        EngineError::Cancelled => ErrorCode::RequestCancelled,
        EngineError::InvalidInput(_) => ErrorCode::InvalidParams,
        _ => ErrorCode::ServerError(REQUEST_FAILED),
    };
    Error {
        code,
        message: e.to_string().into(),
        data: None,
    }
}

const NOTHING_COMPUTED: &str = "nothing computed yet: run promptSalience.compute";

impl State {
    fn document(&mut self, uri: &Uri) -> Result<&mut Document> {
        self.docs
            .map
            .get_mut(uri)
            .ok_or_else(|| invalid("document is not open"))
    }

    /// The document a finished job belongs to; if it was closed meanwhile, the result is
    /// dropped.
    fn document_after_work(&mut self, uri: &Uri) -> Result<&mut Document> {
        self.docs
            .map
            .get_mut(uri)
            .ok_or_else(|| content_modified("the document was closed"))
    }
}

impl Backend {
    pub(super) async fn execute(&self, params: ExecuteCommandParams) -> Result<Option<LSPAny>> {
        let command = Command::parse(&params.command, &params.arguments).map_err(invalid)?;
        let answer = match command {
            Command::Compute(args) => self.compute(args).await,
            Command::Generate(args) => self.generate(args).await,
            Command::SetMethod(args) => self.set_method(args).await,
            Command::CheckFaithfulness(args) => self.check_faithfulness(args.uri).await,
            Command::SetGranularity(args) => self.set_granularity(args).await,
            Command::SetGain(args) => self.set_gain(args).await,
            Command::ShowDifference(args) => self.show_difference(args).await,
            Command::Clear(args) => self.clear(args).await,
        };
        answer.map(Some)
    }

    /// Changes the painted map of `uri` (no model run), then sends it to the client.
    async fn repaint(
        &self,
        uri: &Uri,
        change: impl FnOnce(&mut Painted) -> Result<()>,
    ) -> Result<Value> {
        let params = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st.document(uri)?;
            let painted = doc
                .painted
                .as_mut()
                .ok_or_else(|| invalid(NOTHING_COMPUTED))?;
            change(painted)?;
            result_params(uri, &doc.rope, doc.version, enc, painted)
        };
        let summary = json!({
            "granularity": params.granularity,
            "gain": params.gain,
            "segments": params.segments.len(),
            "difference": params.difference,
            "method": params.method,
        });
        self.after_paint(params).await;
        Ok(summary)
    }

    pub(super) async fn after_paint(&self, params: ResultParams) {
        self.refresh_semantic_tokens().await;
        self.client
            .send_notification::<ResultNotification>(params)
            .await;
    }

    async fn refresh_semantic_tokens(&self) {
        if self.state().refresh_supported {
            let _ = self.client.semantic_tokens_refresh().await;
        }
    }
}

/// The painted map as `promptSalience/result` sends it, on the document as it is now
/// (`version`): segments moved by edits since, and the ones an edit touched marked stale.
pub(super) fn result_params(
    uri: &Uri,
    rope: &ropey::Rope,
    version: i32,
    enc: convert::Encoding,
    p: &Painted,
) -> ResultParams {
    let target = p.now(&p.analysis.target);
    ResultParams {
        uri: uri.clone(),
        version,
        model: p.analysis.model.clone(),
        method: p.analysis.method.name().into(),
        signed: p.analysis.method.is_signed(),
        granularity: p.segmentation.name(),
        gain: p.gain,
        objective: p.analysis.objective,
        target: (!p.analysis.generated_response && !target.1)
            .then(|| convert::range(rope, &target.0, enc)),
        generated_response: p
            .analysis
            .generated_response
            .then(|| p.analysis.target_text().to_string()),
        contrast: p.analysis.contrast.as_ref().map(|c| c.text.clone()),
        difference: p.difference,
        faithfulness: p.faithfulness().map(|f| f.summary()),
        edited: p.edited(),
        segments: p
            .level
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (range, stale) = p.now(&(s.start..s.end));
                SegmentInfo {
                    range: convert::range(rope, &range, enc),
                    score: s.score,
                    normalized: s.normalized,
                    level: if stale { 0 } else { s.level },
                    rank: s.rank,
                    share: s.share,
                    before: p.before_of(i),
                    stale,
                }
            })
            .collect(),
    }
}

/// Whether `running` is the work that `ours` cancels.
fn is_ours(
    running: &Option<salience_engine::CancelToken>,
    ours: &salience_engine::CancelToken,
) -> bool {
    running.as_ref().is_some_and(|r| r.same(ours))
}
