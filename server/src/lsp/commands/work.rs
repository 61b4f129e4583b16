//! The one hand-off of model work to the worker thread: `$/progress` when the client supports
//! it (with a cancel button), and a guard that cancels the work and ends the progress if the
//! request is dropped (`$/cancelRequest`), so no spinner is ever left behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tower_lsp_server::lsp_types::notification::Progress as ProgressNotification;
use tower_lsp_server::lsp_types::request::WorkDoneProgressCreate;
use tower_lsp_server::lsp_types::*;
use tower_lsp_server::Client;

use super::super::worker::{Output, Task};
use super::super::{Backend, State};
use salience_engine::registry::FetchOptions;
use salience_engine::{CancelToken, EngineError, Progress};

static PROGRESS_ID: AtomicU64 = AtomicU64::new(1);

/// Model work in flight. Dropped before it ends (the request's future was dropped), it cancels
/// the work and ends the client's progress.
struct Work {
    /// Set once the worker has answered: nothing is left to cancel.
    answered: bool,
    cancel: CancelToken,
    progress: Option<ClientProgress>,
    client: Client,
    state: Arc<Mutex<State>>,
}

/// A `$/progress` token and the task that forwards the engine's reports to it. The task ends
/// when the worker drops its sender: awaiting it before `End` keeps every report before `End`.
struct ClientProgress {
    token: ProgressToken,
    reporter: JoinHandle<()>,
}

impl ClientProgress {
    async fn end(self, client: &Client, state: &Mutex<State>, message: &str) {
        forget_progress(state, &self.token);
        let _ = self.reporter.await;
        end_progress(client, self.token, message).await;
    }
}

impl Work {
    /// Ends the progress with `message`; the work is over and nothing is cancelled.
    async fn finish(mut self, message: &str) {
        self.answered = true;
        if let Some(p) = self.progress.take() {
            p.end(&self.client, &self.state, message).await;
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        if !self.answered {
            self.cancel.cancel();
        }
        let Some(p) = self.progress.take() else {
            return;
        };
        let (client, state) = (self.client.clone(), self.state.clone());
        tokio::spawn(async move { p.end(&client, &state, "cancelled").await });
    }
}

fn forget_progress(state: &Mutex<State>, token: &ProgressToken) {
    if let Ok(mut st) = state.lock() {
        st.progress_cancels.remove(&token_key(token));
    }
}

async fn end_progress(client: &Client, token: ProgressToken, message: &str) {
    client
        .send_notification::<ProgressNotification>(ProgressParams {
            token,
            value: ProgressParamsValue::WorkDone(WorkDoneProgress::End(WorkDoneProgressEnd {
                message: Some(message.into()),
            })),
        })
        .await;
}

pub(super) fn token_key(t: &ProgressToken) -> String {
    match t {
        NumberOrString::Number(n) => n.to_string(),
        NumberOrString::String(s) => s.clone(),
    }
}

/// What a progress report says, and how far along it is.
fn describe(p: &Progress) -> (String, Option<u32>) {
    let percent = |done: usize, of: usize| Some((100 * done / of.max(1)).min(100) as u32);
    match *p {
        Progress::Generating { done, max } => (
            format!("generating {done}/{max} tokens"),
            percent(done, max),
        ),
        Progress::Salience { .. } => ("computing salience".to_string(), None),
        Progress::IntegratedGradients { step, steps } => (
            format!("integrated gradients, step {step}/{steps}"),
            percent(step, steps),
        ),
        Progress::Perturbation { done, total } => (
            format!("perturbed prompts {done}/{total}"),
            percent(done, total),
        ),
    }
}

impl Backend {
    /// Runs `task` on the model worker with progress titled `title`; cancelled through
    /// `cancel`, the progress button, or by dropping the returned future.
    pub(super) async fn run_on_worker(
        &self,
        title: &str,
        model: String,
        task: Task,
        cancel: &CancelToken,
    ) -> Result<Output, EngineError> {
        let (client_progress, progress) = match self.start_progress(title, cancel).await {
            Some((p, tx)) => (Some(p), Some(tx)),
            None => (None, None),
        };
        let work = Work {
            answered: false,
            cancel: cancel.clone(),
            progress: client_progress,
            client: self.client.clone(),
            state: self.state.clone(),
        };
        let result = self
            .worker
            .submit(model, self.fetch_options(), task, cancel.clone(), progress)
            .await;
        work.finish(if result.is_ok() { "done" } else { "stopped" })
            .await;
        result
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

    /// Starts `$/progress` if the client supports it; returns a sender for engine progress.
    async fn start_progress(
        &self,
        title: &str,
        cancel: &CancelToken,
    ) -> Option<(ClientProgress, UnboundedSender<Progress>)> {
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
        let reporter = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let (message, percentage) = describe(&p);
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
        Some((ClientProgress { token, reporter }, tx))
    }

    /// `window/workDoneProgress/cancel`: the progress cancel button.
    pub(in super::super) async fn cancel_progress(&self, params: WorkDoneProgressCancelParams) {
        let key = token_key(&params.token);
        if let Some(c) = self.state().progress_cancels.remove(&key) {
            c.cancel();
        }
    }
}
