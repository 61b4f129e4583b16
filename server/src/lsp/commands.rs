//! `workspace/executeCommand`: compute and generate (model work on the worker thread, with
//! progress and cancellation), and re-rendering commands that never re-run the model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::{Error, Result};
use tower_lsp_server::lsp_types::notification::Progress as ProgressNotification;
use tower_lsp_server::lsp_types::request::WorkDoneProgressCreate;
use tower_lsp_server::lsp_types::*;

use super::convert;
use super::documents::Painted;
use super::protocol::{self, ResultNotification, ResultParams, SegmentInfo};
use super::worker::{Output, Task};
use super::Backend;
use crate::analysis::{AnalysisOptions, Target};
use crate::engine::generate::GenerateOptions;
use crate::engine::perturbation::SurrogateOptions;
use crate::engine::registry::{FetchOptions, DEFAULT_MODEL};
use crate::engine::salience::{IgOptions, Method};
use crate::engine::{CancelToken, EngineError, Progress};
use crate::prompt_file::{write, Granularity};
use crate::segments::Level;

/// Model work in flight. If the request's future is dropped (`$/cancelRequest`), it cancels
/// the work and still ends the client's progress, so no spinner is left behind.
struct Work {
    cancel: CancelToken,
    token: Option<ProgressToken>,
    client: tower_lsp_server::Client,
    state: Arc<std::sync::Mutex<super::State>>,
}

impl Drop for Work {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(token) = self.token.take() {
            if let Ok(mut st) = self.state.lock() {
                st.progress_cancels.remove(&token_key(&token));
            }
            let client = self.client.clone();
            tokio::spawn(async move {
                client
                    .send_notification::<ProgressNotification>(ProgressParams {
                        token,
                        value: ProgressParamsValue::WorkDone(WorkDoneProgress::End(
                            WorkDoneProgressEnd {
                                message: Some("cancelled".into()),
                            },
                        )),
                    })
                    .await;
            });
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid_params(msg.into())
}

fn engine_error(e: EngineError) -> Error {
    Error {
        code: tower_lsp_server::jsonrpc::ErrorCode::ServerError(
            if matches!(e, EngineError::Cancelled) {
                -32800
            } else {
                -32001
            },
        ),
        message: e.to_string().into(),
        data: None,
    }
}

/// The first argument: `{uri, ...}` or a bare uri string.
fn first_arg(args: &[Value]) -> Result<(Uri, Value)> {
    let a = args
        .first()
        .ok_or_else(|| invalid("missing arguments: expected {uri}"))?;
    let uri_text = match a {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("uri")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("missing `uri`"))?
            .to_string(),
        _ => return Err(invalid("expected {uri} or a uri string")),
    };
    let uri: Uri = uri_text
        .parse()
        .map_err(|_| invalid(format!("not a uri: {uri_text}")))?;
    let rest = match (a, args.get(1)) {
        (Value::Object(_), _) => a.clone(),
        (_, Some(v)) => json!({ "value": v }),
        _ => json!({}),
    };
    Ok((uri, rest))
}

static PROGRESS_ID: AtomicU64 = AtomicU64::new(1);

impl Backend {
    pub(super) async fn pull_configuration(&self) {
        let item = ConfigurationItem {
            scope_uri: None,
            section: Some("promptSalience".into()),
        };
        if let Ok(values) = self.client.configuration(vec![item]).await {
            if let Some(v) = values.first().filter(|v| v.is_object()) {
                self.state().settings.merge_json(v);
            }
        }
    }

    pub(super) async fn execute(&self, params: ExecuteCommandParams) -> Result<Option<LSPAny>> {
        match params.command.as_str() {
            protocol::COMPUTE => self.compute(&params.arguments).await.map(Some),
            protocol::GENERATE => self.generate(&params.arguments).await.map(Some),
            protocol::SET_METHOD => self.set_method(&params.arguments).await.map(Some),
            protocol::CHECK_FAITHFULNESS => {
                let (uri, _) = first_arg(&params.arguments)?;
                self.check_faithfulness(uri).await.map(Some)
            }
            protocol::SET_GRANULARITY
            | protocol::SET_GAIN
            | protocol::CLEAR
            | protocol::SHOW_DIFFERENCE => self
                .rerender(&params.command, &params.arguments)
                .await
                .map(Some),
            other => Err(invalid(format!("unknown command `{other}`"))),
        }
    }

    /// `window/workDoneProgress/cancel`: the progress cancel button.
    pub(super) async fn cancel_progress(&self, params: WorkDoneProgressCancelParams) {
        let key = token_key(&params.token);
        if let Some(c) = self.state().progress_cancels.remove(&key) {
            c.cancel();
        }
    }

    /// Model work about to start: its progress (when the client supports it) and a guard that
    /// cancels it and ends the progress if the request is dropped.
    async fn begin_work(
        &self,
        title: &str,
        cancel: &CancelToken,
    ) -> (Work, Option<tokio::sync::mpsc::UnboundedSender<Progress>>) {
        let (token, tx) = match self.start_progress(title, cancel).await {
            Some((t, tx)) => (Some(t), Some(tx)),
            None => (None, None),
        };
        let work = Work {
            cancel: cancel.clone(),
            token,
            client: self.client.clone(),
            state: self.state.clone(),
        };
        (work, tx)
    }

    /// Starts `$/progress` if the client supports it; returns a sender for engine progress.
    async fn start_progress(
        &self,
        title: &str,
        cancel: &CancelToken,
    ) -> Option<(ProgressToken, tokio::sync::mpsc::UnboundedSender<Progress>)> {
        if !self.state().progress_supported {
            return None;
        }
        let token = NumberOrString::String(format!(
            "prompt-salience/{}",
            PROGRESS_ID.fetch_add(1, Ordering::Relaxed)
        ));
        let created = self
            .client
            .send_request::<WorkDoneProgressCreate>(WorkDoneProgressCreateParams {
                token: token.clone(),
            })
            .await;
        if created.is_err() {
            return None;
        }
        self.state()
            .progress_cancels
            .insert(token_key(&token), cancel.clone());
        self.client
            .send_notification::<ProgressNotification>(ProgressParams {
                token: token.clone(),
                value: ProgressParamsValue::WorkDone(WorkDoneProgress::Begin(
                    WorkDoneProgressBegin {
                        title: title.into(),
                        cancellable: Some(true),
                        message: Some("loading model".into()),
                        percentage: None,
                    },
                )),
            })
            .await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let client = self.client.clone();
        let t = token.clone();
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let (message, percentage) = match p {
                    Progress::Generating { done, max } => (
                        format!("generating {done}/{max} tokens"),
                        Some((100 * done / max.max(1)) as u32),
                    ),
                    Progress::Salience { .. } => ("computing salience".to_string(), None),
                    Progress::IntegratedGradients { step, steps } => (
                        format!("integrated gradients, step {step}/{steps}"),
                        Some((100 * step / steps.max(1)).min(100) as u32),
                    ),
                    Progress::Perturbation { done, total } => (
                        format!("perturbed prompts {done}/{total}"),
                        Some((100 * done / total.max(1)).min(100) as u32),
                    ),
                };
                client
                    .send_notification::<ProgressNotification>(ProgressParams {
                        token: t.clone(),
                        value: ProgressParamsValue::WorkDone(WorkDoneProgress::Report(
                            WorkDoneProgressReport {
                                cancellable: Some(true),
                                message: Some(message),
                                percentage,
                            },
                        )),
                    })
                    .await;
            }
        });
        Some((token, tx))
    }

    async fn end_progress(&self, token: Option<ProgressToken>, message: String) {
        if let Some(token) = token {
            self.state().progress_cancels.remove(&token_key(&token));
            self.client
                .send_notification::<ProgressNotification>(ProgressParams {
                    token,
                    value: ProgressParamsValue::WorkDone(WorkDoneProgress::End(
                        WorkDoneProgressEnd {
                            message: Some(message),
                        },
                    )),
                })
                .await;
        }
    }

    fn fetch_options(&self) -> FetchOptions {
        let st = self.state();
        let mut o = FetchOptions::default();
        if let Some(d) = &st.settings.cache_dir {
            o.cache_dir = d.into();
        }
        if let Some(n) = st.settings.allow_network {
            o.allow_network = n;
        }
        o
    }

    /// Switches method from the cached scores when the last run computed them too
    /// (grad_l2 and grad_dot_input share a gradient); otherwise computes with it.
    async fn set_method(&self, args: &[Value]) -> Result<Value> {
        let (uri, rest) = first_arg(args)?;
        let method: Method = rest
            .get("method")
            .or_else(|| rest.get("value"))
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("expected a method"))?
            .parse()
            .map_err(invalid)?;
        let switched = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st
                .docs
                .map
                .get_mut(&uri)
                .ok_or_else(|| invalid("document is not open"))?;
            match doc.painted.as_ref().and_then(|p| {
                let a = p.analysis.switched_to(method)?;
                Some((p.version, a, p.model.clone(), p.granularity, p.gain))
            }) {
                Some((version, a, model, granularity, gain)) => {
                    doc.paint(version, Arc::new(a), model, granularity, gain);
                    let painted = doc.painted.as_ref().expect("painted");
                    Some(result_params(&uri, &doc.rope, enc, painted))
                }
                None => None,
            }
        };
        match switched {
            Some(p) => {
                let summary = json!({ "method": p.method, "recomputed": false, "segments": p.segments.len() });
                self.after_paint(p).await;
                Ok(summary)
            }
            None => {
                let mut v = self
                    .compute(&[json!({ "uri": uri, "method": method.name() })])
                    .await?;
                v["recomputed"] = json!(true);
                Ok(v)
            }
        }
    }

    async fn compute(&self, args: &[Value]) -> Result<Value> {
        let (uri, rest) = first_arg(args)?;
        let method_override: Option<Method> = match rest.get("method").and_then(Value::as_str) {
            Some(m) => Some(m.parse().map_err(invalid)?),
            None => None,
        };
        let range: Option<Range> = match rest.get("range") {
            None | Some(Value::Null) => None,
            Some(r) => Some(
                serde_json::from_value(r.clone()).map_err(|e| invalid(format!("range: {e}")))?,
            ),
        };
        let contrast: Option<String> = match rest.get("contrast") {
            None | Some(Value::Null) => None,
            Some(Value::String(b)) if !b.trim().is_empty() => Some(b.clone()),
            Some(_) => {
                return Err(invalid(
                    "contrast: expected the alternative completion as text",
                ))
            }
        };
        let granularity_override: Option<Granularity> =
            match rest.get("granularity").and_then(Value::as_str) {
                Some(g) => Some(g.parse().map_err(invalid)?),
                None => None,
            };
        let cancel = CancelToken::new();
        // Snapshot under the lock; a newer compute on this document supersedes a running one.
        let (file, version, target, model, options, granularity, gain) = {
            let mut st = self.state();
            // One model thread: a background deletion test on any document must not delay a
            // map someone asked for. It can be run again with checkFaithfulness.
            for other in st.docs.map.values_mut() {
                if let Some(check) = other.checking.take() {
                    check.cancel();
                }
            }
            let enc = st.encoding;
            let settings = st.settings.clone();
            let doc = st
                .docs
                .map
                .get_mut(&uri)
                .ok_or_else(|| invalid("document is not open"))?;
            if let Some(old) = doc.running.replace(cancel.clone()) {
                old.cancel();
            }

            let f = doc.parsed.clone();
            let target = match range {
                Some(r) => {
                    let bytes = convert::byte_range(&doc.rope, &r, enc);
                    if bytes.is_empty() {
                        Target::Response
                    } else {
                        Target::Bytes(bytes)
                    }
                }
                None => Target::Response,
            };
            let s = &f.settings;
            let method = method_override
                .or(s.method)
                .or_else(|| {
                    settings
                        .method
                        .as_deref()
                        .and_then(|m| m.parse::<Method>().ok())
                })
                .unwrap_or(Method::GradDotInput);
            let granularity = granularity_override
                .or(s.granularity)
                .or_else(|| settings.granularity.as_deref().and_then(|g| g.parse().ok()))
                .unwrap_or(Granularity::Sentence);
            let gain = s.gain.or(settings.gain).unwrap_or(1.0);
            let options = AnalysisOptions {
                method,
                template: s.template.unwrap_or_default(),
                system: s.system.clone(),
                ig: IgOptions {
                    baseline: s.baseline.unwrap_or_default(),
                    fixed_steps: s.ig_steps.or(settings.ig_steps),
                    ..IgOptions::default()
                },
                generation: generation_options(s, &settings),
                contrast: contrast.or_else(|| s.contrast.clone()),
                segments: Level::Standard(granularity),
                surrogate: SurrogateOptions {
                    samples: s.samples.unwrap_or(SurrogateOptions::default().samples),
                    ..SurrogateOptions::default()
                },
            };
            let model = model_name(s, settings);
            (f, doc.version, target, model, options, granularity, gain)
        };
        let (mut work, tx) = self.begin_work("Computing salience", &cancel).await;
        let task = Task::Analyse {
            file,
            target,
            options: Box::new(options),
        };
        let result = self
            .worker
            .submit(
                model.clone(),
                self.fetch_options(),
                task,
                cancel.clone(),
                tx,
            )
            .await;
        self.end_progress(
            work.token.take(),
            if result.is_ok() {
                "done".into()
            } else {
                "stopped".into()
            },
        )
        .await;
        let analysis = match result {
            Ok(Output::Analysis(a)) => Arc::new(*a),
            Ok(_) => return Err(Error::internal_error()),
            Err(e) => {
                let too_long = {
                    let mut st = self.state();
                    let enc = st.encoding;
                    st.docs.map.get_mut(&uri).and_then(|doc| {
                        if cancel_is(&doc.running, &cancel) {
                            doc.running = None;
                        }
                        // A prompt longer than the model's context is the file's problem: a
                        // diagnostic on the prompt, beside the error.
                        (doc.version == version && e.to_string().contains("context")).then(|| {
                            let mut diags = super::diagnostics::of(doc, enc);
                            diags.push(Diagnostic {
                                range: convert::range(&doc.rope, &doc.parsed.prompt, enc),
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
                return Err(engine_error(e));
            }
        };
        // Paint only on the text it was computed for.
        let notification = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st
                .docs
                .map
                .get_mut(&uri)
                .ok_or_else(|| invalid("document was closed"))?;
            if cancel_is(&doc.running, &cancel) {
                doc.running = None;
            }
            if doc.version != version || cancel.is_cancelled() {
                return Err(engine_error(EngineError::InvalidInput(
                    "the document changed during the computation: result dropped (run it again)"
                        .into(),
                )));
            }
            doc.paint(version, analysis, model, granularity, gain);
            let painted = doc.painted.as_ref().expect("painted");
            result_params(&uri, &doc.rope, enc, painted)
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

    /// The deletion test of the painted map at its granularity: from the cache, or run on the
    /// model (cancelled by an edit or a new computation). The result is kept with the map and
    /// sent again in `promptSalience/result`.
    async fn check_faithfulness(&self, uri: Uri) -> Result<Value> {
        let cancel = CancelToken::new();
        let (analysis, model, granularity) = {
            let mut st = self.state();
            let doc = st
                .docs
                .map
                .get_mut(&uri)
                .ok_or_else(|| invalid("document is not open"))?;
            let p = doc
                .painted
                .as_ref()
                .ok_or_else(|| invalid("nothing computed yet: run promptSalience.compute"))?;
            if let Some(f) = p.faithfulness.get(&p.granularity) {
                return Ok(json!({ "cached": true, "faithfulness": f }));
            }
            let snapshot = (p.analysis.clone(), p.model.clone(), p.granularity);
            if let Some(old) = doc.checking.replace(cancel.clone()) {
                old.cancel();
            }
            snapshot
        };
        let (mut work, tx) = self.begin_work("Checking faithfulness", &cancel).await;
        let task = Task::Faithfulness {
            analysis: analysis.clone(),
            level: Level::Standard(granularity),
        };
        let result = self
            .worker
            .submit(model, self.fetch_options(), task, cancel.clone(), tx)
            .await;
        self.end_progress(work.token.take(), "done".into()).await;
        let faithfulness = match result {
            Ok(Output::Faithfulness(f)) => *f,
            Ok(_) => return Err(Error::internal_error()),
            Err(e) => return Err(engine_error(e)),
        };
        let params = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st
                .docs
                .map
                .get_mut(&uri)
                .ok_or_else(|| invalid("document was closed"))?;
            if cancel_is(&doc.checking, &cancel) {
                doc.checking = None;
            }
            // Keep it only with the map it was computed for.
            match doc.painted.as_mut() {
                Some(p) if Arc::ptr_eq(&p.analysis, &analysis) => {
                    p.faithfulness.insert(granularity, faithfulness.clone());
                    Some(result_params(&uri, &doc.rope, enc, p))
                }
                _ => None,
            }
        };
        match params {
            Some(p) => self.after_paint(p).await,
            None => {
                return Err(engine_error(EngineError::InvalidInput(
                    "the map changed during the faithfulness check: result dropped".into(),
                )))
            }
        }
        Ok(json!({ "cached": false, "faithfulness": faithfulness }))
    }

    async fn after_paint(&self, params: ResultParams) {
        let refresh = self.state().refresh_supported;
        if refresh {
            let _ = self.client.semantic_tokens_refresh().await;
        }
        self.client
            .send_notification::<ResultNotification>(params)
            .await;
    }

    async fn rerender(&self, command: &str, args: &[Value]) -> Result<Value> {
        let (uri, rest) = first_arg(args)?;
        let value = rest
            .get("value")
            .or_else(|| rest.get("granularity"))
            .or_else(|| rest.get("gain"))
            .cloned();
        // A perturbation method's scores belong to the segments it deleted: another level
        // means deleting other segments, so it computes anew (keeping the method and contrast).
        if command == protocol::SET_GRANULARITY {
            let redo = {
                let st = self.state();
                st.docs
                    .map
                    .get(&uri)
                    .and_then(|d| d.painted.as_ref())
                    .filter(|p| p.analysis.method.is_perturbation())
                    .map(|p| (p.analysis.method, p.analysis.contrast.clone()))
            };
            if let (Some((method, contrast)), Some(g)) =
                (redo, value.as_ref().and_then(Value::as_str))
            {
                let g: Granularity = g.parse().map_err(invalid)?;
                let mut args =
                    json!({ "uri": uri, "method": method.name(), "granularity": g.name() });
                if let Some(c) = contrast {
                    args["contrast"] = json!(c.text);
                }
                let mut v = self.compute(&[args]).await?;
                v["recomputed"] = json!(true);
                return Ok(v);
            }
        }
        let params =
            {
                let mut st = self.state();
                let enc = st.encoding;
                let doc = st
                    .docs
                    .map
                    .get_mut(&uri)
                    .ok_or_else(|| invalid("document is not open"))?;
                if command == protocol::CLEAR {
                    doc.painted = None;
                    None
                } else if command == protocol::SHOW_DIFFERENCE {
                    let on = value.as_ref().and_then(Value::as_bool).unwrap_or(true);
                    let p = doc.painted.as_mut().ok_or_else(|| {
                        invalid("nothing computed yet: run promptSalience.compute")
                    })?;
                    if on && p.previous.is_none() {
                        return Err(invalid(
                            "no previous result to compare with: compute, edit, and compute again",
                        ));
                    }
                    p.set_difference(on);
                    Some(result_params(&uri, &doc.rope, enc, p))
                } else {
                    let p = doc.painted.as_mut().ok_or_else(|| {
                        invalid("nothing computed yet: run promptSalience.compute")
                    })?;
                    let (mut g, mut gain) = (p.granularity, p.gain);
                    if command == protocol::SET_GRANULARITY {
                        g = value
                            .as_ref()
                            .and_then(Value::as_str)
                            .ok_or_else(|| invalid("expected a granularity"))?
                            .parse()
                            .map_err(invalid)?;
                    } else {
                        gain = value
                            .as_ref()
                            .and_then(Value::as_f64)
                            .filter(|x| *x > 0.0 && x.is_finite())
                            .ok_or_else(|| invalid("expected a gain > 0"))?
                            as f32;
                    }
                    p.rerender(g, gain);
                    Some(result_params(
                        &uri,
                        &doc.rope,
                        enc,
                        doc.painted.as_ref().expect("painted"),
                    ))
                }
            };
        match params {
            Some(p) => {
                let summary = json!({ "granularity": p.granularity, "gain": p.gain, "segments": p.segments.len(), "difference": p.difference });
                self.after_paint(p).await;
                Ok(summary)
            }
            None => {
                if self.state().refresh_supported {
                    let _ = self.client.semantic_tokens_refresh().await;
                }
                Ok(json!({ "cleared": true }))
            }
        }
    }

    // lsp-types' Uri caches its parse internally, which clippy reads as a mutable key; its
    // hash and equality depend only on the text.
    #[allow(clippy::mutable_key_type)]
    async fn generate(&self, args: &[Value]) -> Result<Value> {
        let (uri, _) = first_arg(args)?;
        let cancel = CancelToken::new();
        let (file, version, model, generation) = {
            let st = self.state();
            let settings = st.settings.clone();
            let doc = st
                .docs
                .map
                .get(&uri)
                .ok_or_else(|| invalid("document is not open"))?;
            let f = doc.parsed.clone();
            if f.prompt.is_empty() {
                return Err(invalid("the prompt is empty"));
            }
            let s = &f.settings;
            let generation = generation_options(s, &settings);
            let model = model_name(s, settings);
            (f, doc.version, model, generation)
        };
        let (mut work, tx) = self.begin_work("Generating response", &cancel).await;
        let task = Task::Generate {
            file: file.clone(),
            template: file.settings.template,
            system: file.settings.system.clone(),
            generation,
        };
        let result = self
            .worker
            .submit(model, self.fetch_options(), task, cancel, tx)
            .await;
        self.end_progress(work.token.take(), "done".into()).await;
        let text = match result {
            Ok(Output::Generated(t)) => t,
            Ok(_) => return Err(Error::internal_error()),
            Err(e) => return Err(engine_error(e)),
        };
        // The edit replaces only the response section of the text it was generated for.
        let edit = {
            let st = self.state();
            let enc = st.encoding;
            let doc = st
                .docs
                .map
                .get(&uri)
                .ok_or_else(|| invalid("document was closed"))?;
            if doc.version != version {
                return Err(engine_error(EngineError::InvalidInput(
                    "the document changed while generating: not applying the response".into(),
                )));
            }
            let new_text = write::with_response(&file, &text);
            let keep = file.marker.as_ref().map_or(file.text.len(), |m| m.end);
            debug_assert!(new_text.starts_with(&file.text[..keep]));
            let range = convert::range(&doc.rope, &(keep..file.text.len()), enc);
            TextEdit {
                range,
                new_text: new_text[keep..].to_string(),
            }
        };
        let mut changes = std::collections::HashMap::new();
        changes.insert(uri.clone(), vec![edit]);
        let applied = self
            .client
            .apply_edit(WorkspaceEdit {
                changes: Some(changes),
                ..Default::default()
            })
            .await
            .map(|r| r.applied)
            .unwrap_or(false);
        Ok(json!({ "applied": applied, "response": text }))
    }
}

/// The file's setting first, then the client's, then the default.
fn generation_options(
    s: &crate::prompt_file::SalienceSettings,
    client: &super::settings::ClientSettings,
) -> GenerateOptions {
    let d = GenerateOptions::default();
    GenerateOptions {
        max_new_tokens: s
            .max_new_tokens
            .or(client.max_new_tokens)
            .unwrap_or(d.max_new_tokens),
        temperature: s.temperature.unwrap_or(d.temperature),
        top_p: s.top_p.unwrap_or(d.top_p),
        seed: s.seed.unwrap_or(d.seed),
        stop: s.stop.clone(),
    }
}

fn model_name(
    s: &crate::prompt_file::SalienceSettings,
    client: super::settings::ClientSettings,
) -> String {
    s.model
        .clone()
        .or(client.model)
        .unwrap_or_else(|| DEFAULT_MODEL.into())
}

fn token_key(t: &ProgressToken) -> String {
    match t {
        NumberOrString::Number(n) => n.to_string(),
        NumberOrString::String(s) => s.clone(),
    }
}

fn cancel_is(running: &Option<CancelToken>, ours: &CancelToken) -> bool {
    running.as_ref().is_some_and(|r| r.same(ours))
}

fn result_params(
    uri: &Uri,
    rope: &ropey::Rope,
    enc: convert::Encoding,
    p: &Painted,
) -> ResultParams {
    ResultParams {
        uri: uri.clone(),
        version: p.version,
        model: p.analysis.model.clone(),
        method: p.analysis.method.name().into(),
        signed: p.analysis.method.is_signed(),
        granularity: p.granularity.name().into(),
        gain: p.gain,
        objective: p.analysis.objective,
        target: (!p.analysis.generated_response)
            .then(|| convert::range(rope, &p.analysis.target, enc)),
        generated_response: p
            .analysis
            .generated_response
            .then(|| p.analysis.target_text().to_string()),
        contrast: p.analysis.contrast.as_ref().map(|c| c.text.clone()),
        difference: p.difference,
        faithfulness: p
            .faithfulness
            .get(&p.granularity)
            .map(|f| f.verdict.clone()),
        segments: p
            .level
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| SegmentInfo {
                range: convert::range(rope, &(s.start..s.end), enc),
                score: s.score,
                normalized: s.normalized,
                level: s.level,
                rank: s.rank,
                share: s.share,
                before: p.before_of(i),
            })
            .collect(),
    }
}
