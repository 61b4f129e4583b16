//! `promptSalience.compute`: explain a target (the selection, else the response) by salience
//! over the prompt, paint it, and start the background faithfulness check.

use std::sync::Arc;

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::{Error, Result};
use tower_lsp_server::lsp_types::{Diagnostic, DiagnosticSeverity, MessageType, Uri};

use super::super::protocol::ComputeArgs;
use super::super::worker::{Output, Task};
use super::super::{convert, diagnostics, Backend};
use super::{content_modified, engine_error, invalid, is_ours, result_params};
use salience_core::analysis::Target;
use salience_core::options::Layers;
use salience_core::prompt_file::SalienceSettings;
use salience_engine::{CancelToken, EngineError};

impl Backend {
    pub(super) async fn compute(&self, args: ComputeArgs) -> Result<Value> {
        if args.contrast.as_ref().is_some_and(|c| c.trim().is_empty()) {
            return Err(invalid(
                "contrast: expected the alternative completion as text",
            ));
        }
        let uri = args.uri;
        let cancel = CancelToken::new();
        // Snapshot under the lock; a newer compute on this document supersedes a running one.
        let (file, version, target, resolved) = {
            let mut st = self.state();
            // One model thread: a background deletion test on any document must not delay a
            // map someone asked for. It can be run again with checkFaithfulness.
            for other in st.docs.map.values_mut() {
                if let Some(check) = other.checking.take() {
                    check.cancel();
                }
            }
            let enc = st.encoding;
            let client = st.settings.layer();
            let doc = st.document(&uri)?;
            let target = match &args.range {
                Some(r) => {
                    let bytes = convert::byte_range_within(&doc.rope, r, enc)
                        .ok_or_else(|| invalid("range: outside the document"))?;
                    if bytes.is_empty() {
                        Target::Response
                    } else {
                        Target::Bytes(bytes)
                    }
                }
                None => Target::Response,
            };
            let arguments = SalienceSettings {
                method: args.method,
                granularity: args.granularity,
                contrast: args.contrast.clone(),
                ..SalienceSettings::default()
            };
            let resolved = Layers {
                arguments: &arguments,
                file: &doc.parsed().settings,
                client: &client,
            }
            .resolve()
            .map_err(invalid)?;
            if let Some(old) = doc.running.replace(cancel.clone()) {
                old.cancel();
            }
            (doc.parsed().clone(), doc.version, target, resolved)
        };
        let task = Task::Analyse {
            file,
            target,
            options: Box::new(resolved.analysis.clone()),
        };
        let result = self
            .run_on_worker("Computing salience", resolved.model.clone(), task, &cancel)
            .await;
        let analysis = match result {
            Ok(Output::Analysis(a)) => Arc::new(*a),
            Ok(_) => return Err(Error::internal_error()),
            Err(e) => return Err(self.failed(&uri, version, &cancel, e).await),
        };
        // Paint only on the text it was computed for.
        let notification = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st.document_after_work(&uri)?;
            if is_ours(&doc.running, &cancel) {
                doc.running = None;
            }
            if doc.version != version || cancel.is_cancelled() {
                return Err(content_modified(
                    "the document changed during the computation: result dropped (run it again)",
                ));
            }
            let segmentation = resolved.segmentation().clone();
            doc.paint(
                version,
                analysis,
                resolved.model,
                segmentation,
                resolved.gain,
            );
            let painted = doc.painted.as_ref().expect("painted");
            result_params(&uri, &doc.rope, doc.version, enc, painted)
        };
        self.after_paint(notification.clone()).await;
        if self.state().settings.background_faithfulness != Some(false) {
            let this = self.clone();
            let uri = uri.clone();
            tokio::spawn(async move {
                if let Err(e) = this.check_faithfulness(uri).await {
                    tracing::info!("background faithfulness check: {}", e.message);
                }
            });
        }
        Ok(json!({
            "model": notification.model,
            "method": notification.method,
            "objective": notification.objective,
            "granularity": notification.granularity,
            "segments": notification.segments.len(),
            "target": notification.target,
        }))
    }

    /// A computation that failed: a prompt longer than the model's context is the file's
    /// problem (a diagnostic on the prompt, beside the error); other failures are logged.
    async fn failed(&self, uri: &Uri, version: i32, cancel: &CancelToken, e: EngineError) -> Error {
        let too_long = {
            let mut st = self.state();
            let enc = st.encoding;
            st.docs.map.get_mut(uri).and_then(|doc| {
                if is_ours(&doc.running, cancel) {
                    doc.running = None;
                }
                let overflow = matches!(e, EngineError::ContextOverflow { .. });
                (doc.version == version && overflow).then(|| {
                    let mut diags = diagnostics::of(doc, enc);
                    diags.push(Diagnostic {
                        range: convert::range(&doc.rope, &doc.parsed().prompt, enc),
                        severity: Some(DiagnosticSeverity::ERROR),
                        source: Some("prompt-salience".into()),
                        message: e.to_string(),
                        ..Default::default()
                    });
                    diags
                })
            })
        };
        if let Some(diags) = too_long {
            self.client
                .publish_diagnostics(uri.clone(), diags, Some(version))
                .await;
        }
        if !matches!(e, EngineError::Cancelled) {
            self.client
                .log_message(MessageType::ERROR, format!("compute {}: {e}", uri.as_str()))
                .await;
        }
        engine_error(e)
    }
}
