//! `prompt-salience lsp`: the language server. Only this module knows lsp-types and JSON-RPC;
//! `convert.rs` is its only door to byte offsets. One file per LSP feature.
//!
//! Handlers that change state (`did_open`, `did_change`, …) apply it synchronously under the
//! lock before any `.await`; model work goes to the worker thread (`worker.rs`).

mod client_process;
mod code_lens;
mod commands;
pub mod convert;
mod diagnostics;
mod documents;
mod hover;
mod inlay_hints;
pub mod protocol;
mod semantic_tokens;
mod settings;
pub mod test_client;
mod transport;
mod worker;

use std::sync::{Arc, Mutex, MutexGuard};

use tower_lsp_server::jsonrpc::Result;
use tower_lsp_server::lsp_types::*;
use tower_lsp_server::{Client, LanguageServer, LspService, Server};

use convert::Encoding;
use documents::{Document, Documents};
use settings::ClientSettings;

#[derive(Clone)]
pub struct Backend {
    client: Client,
    state: Arc<Mutex<State>>,
    worker: worker::Worker,
}

#[derive(Default)]
struct State {
    docs: Documents,
    encoding: Encoding,
    settings: ClientSettings,
    progress_supported: bool,
    refresh_supported: bool,
    /// Running work by `$/progress` token, for the progress cancel button.
    progress_cancels: std::collections::HashMap<String, salience_engine::CancelToken>,
}

impl Backend {
    fn new(client: Client) -> Self {
        Self {
            client,
            state: Arc::new(Mutex::new(State::default())),
            worker: worker::Worker::spawn(),
        }
    }

    /// The state lock; a panic elsewhere never poisons the server for good.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs a handler body, turning a panic into a JSON-RPC error instead of a dead server.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!("{what} panicked");
        Err(tower_lsp_server::jsonrpc::Error::internal_error())
    })
}

impl LanguageServer for Backend {
    async fn initialize(&self, params: InitializeParams) -> Result<InitializeResult> {
        let enc = Encoding::negotiate(
            params
                .capabilities
                .general
                .as_ref()
                .and_then(|g| g.position_encodings.as_deref()),
        );
        {
            let mut st = self.state();
            st.encoding = enc;
            st.progress_supported = params
                .capabilities
                .window
                .as_ref()
                .and_then(|w| w.work_done_progress)
                .unwrap_or(false);
            st.refresh_supported = params
                .capabilities
                .workspace
                .as_ref()
                .and_then(|w| w.semantic_tokens.as_ref())
                .and_then(|s| s.refresh_support)
                .unwrap_or(false);
            if let Some(opts) = params.initialization_options {
                st.settings.merge_json(&opts);
            }
        }
        if let Some(pid) = params.process_id {
            client_process::watch(pid);
        }
        Ok(InitializeResult {
            server_info: Some(ServerInfo {
                name: "prompt-salience".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            }),
            capabilities: ServerCapabilities {
                position_encoding: Some(enc.kind()),
                text_document_sync: Some(TextDocumentSyncCapability::Kind(
                    TextDocumentSyncKind::INCREMENTAL,
                )),
                hover_provider: Some(HoverProviderCapability::Simple(true)),
                inlay_hint_provider: Some(OneOf::Left(true)),
                code_lens_provider: Some(CodeLensOptions {
                    resolve_provider: Some(false),
                }),
                execute_command_provider: Some(ExecuteCommandOptions {
                    commands: protocol::COMMANDS.iter().map(|c| c.to_string()).collect(),
                    ..Default::default()
                }),
                semantic_tokens_provider: Some(
                    SemanticTokensServerCapabilities::SemanticTokensOptions(
                        SemanticTokensOptions {
                            legend: protocol::legend(),
                            full: Some(SemanticTokensFullOptions::Bool(true)),
                            range: Some(true),
                            ..Default::default()
                        },
                    ),
                ),
                ..Default::default()
            },
        })
    }

    async fn initialized(&self, _: InitializedParams) {
        // In its own task: a client that never answers must not keep the server from
        // finishing its handlers (and from exiting on `exit`).
        let this = self.clone();
        tokio::spawn(async move { this.pull_configuration().await });
    }

    async fn shutdown(&self) -> Result<()> {
        let st = self.state();
        for doc in st.docs.map.values() {
            if let Some(c) = &doc.running {
                c.cancel();
            }
        }
        Ok(())
    }

    async fn did_open(&self, params: DidOpenTextDocumentParams) {
        let doc = params.text_document;
        let diags = {
            let mut st = self.state();
            let d = Document::new(&doc.text, doc.version);
            let diags = diagnostics::of(&d, st.encoding);
            st.docs.map.insert(doc.uri.clone(), d);
            diags
        };
        self.client
            .publish_diagnostics(doc.uri, diags, Some(doc.version))
            .await;
    }

    async fn did_change(&self, params: DidChangeTextDocumentParams) {
        let uri = params.text_document.uri;
        let version = params.text_document.version;
        // Applied under the lock before any await: edits are never reordered or lost.
        let size = {
            let mut st = self.state();
            let enc = st.encoding;
            let Some(doc) = st.docs.map.get_mut(&uri) else {
                tracing::warn!("change to a document that is not open: {}", uri.as_str());
                return;
            };
            if version <= doc.version {
                tracing::warn!("stale change (version {version} <= {})", doc.version);
            }
            doc.apply(version, params.content_changes, enc);
            doc.len()
        };
        // In its own task: the notification never waits on the client (semantic-token
        // refresh is a request to it); a later edit supersedes this one's work.
        let this = self.clone();
        tokio::spawn(async move {
            if size > DEBOUNCE_ABOVE {
                tokio::time::sleep(DEBOUNCE).await;
            }
            this.after_edit(uri, version).await;
        });
    }

    async fn did_close(&self, params: DidCloseTextDocumentParams) {
        let uri = params.text_document.uri;
        if let Some(doc) = self.state().docs.map.remove(&uri) {
            if let Some(c) = doc.running {
                c.cancel();
            }
        }
        self.client.publish_diagnostics(uri, Vec::new(), None).await;
    }

    async fn did_change_configuration(&self, params: DidChangeConfigurationParams) {
        {
            let mut st = self.state();
            let v = params
                .settings
                .get("promptSalience")
                .unwrap_or(&params.settings);
            st.settings.merge_json(v);
        }
        let this = self.clone();
        tokio::spawn(async move { this.pull_configuration().await });
    }

    async fn semantic_tokens_full(
        &self,
        params: SemanticTokensParams,
    ) -> Result<Option<SemanticTokensResult>> {
        let st = self.state();
        guarded("semanticTokens/full", || {
            Ok(semantic_tokens::full(&st, &params.text_document.uri, None))
        })
    }

    async fn semantic_tokens_range(
        &self,
        params: SemanticTokensRangeParams,
    ) -> Result<Option<SemanticTokensRangeResult>> {
        let st = self.state();
        guarded("semanticTokens/range", || {
            Ok(
                semantic_tokens::full(&st, &params.text_document.uri, Some(params.range)).map(
                    |r| match r {
                        SemanticTokensResult::Tokens(t) => SemanticTokensRangeResult::Tokens(t),
                        SemanticTokensResult::Partial(p) => SemanticTokensRangeResult::Partial(p),
                    },
                ),
            )
        })
    }

    async fn hover(&self, params: HoverParams) -> Result<Option<Hover>> {
        let st = self.state();
        guarded("hover", || Ok(hover::hover(&st, &params)))
    }

    async fn inlay_hint(&self, params: InlayHintParams) -> Result<Option<Vec<InlayHint>>> {
        let st = self.state();
        guarded("inlayHint", || Ok(inlay_hints::hints(&st, &params)))
    }

    async fn code_lens(&self, params: CodeLensParams) -> Result<Option<Vec<CodeLens>>> {
        let st = self.state();
        guarded("codeLens", || {
            Ok(code_lens::lenses(&st, &params.text_document.uri))
        })
    }

    async fn execute_command(&self, params: ExecuteCommandParams) -> Result<Option<LSPAny>> {
        self.execute(params).await
    }
}

/// Documents larger than this are parsed for diagnostics only after a pause in typing.
const DEBOUNCE_ABOVE: usize = 64 << 10;
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(200);

impl Backend {
    /// After an edit (if `uri` is still at `version`: a later edit does its own): the
    /// diagnostics, and the painted map as it follows the text.
    async fn after_edit(&self, uri: Uri, version: i32) {
        let (diags, painted) = {
            let st = self.state();
            match st.docs.map.get(&uri) {
                Some(doc) if doc.version == version => (
                    diagnostics::of(doc, st.encoding),
                    doc.painted
                        .as_ref()
                        .map(|p| commands::result_params(&uri, &doc.rope, version, st.encoding, p)),
                ),
                _ => return,
            }
        };
        self.client
            .publish_diagnostics(uri, diags, Some(version))
            .await;
        if let Some(p) = painted {
            self.after_paint(p).await;
        }
    }

    /// Asks the client for the `promptSalience` section of its configuration.
    async fn pull_configuration(&self) {
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
}

pub fn service() -> (LspService<Backend>, tower_lsp_server::ClientSocket) {
    // tower-lsp-server has no handler for the progress cancel button yet: add it here.
    LspService::build(Backend::new)
        .custom_method("window/workDoneProgress/cancel", Backend::cancel_progress)
        .finish()
}

/// How many messages the server works on at once. Model work waits on the worker, not here
/// (at most [`worker::MAX_QUEUED`] jobs are accepted), so notifications, cancels and quick
/// requests are never queued behind long computations.
const CONCURRENCY: usize = 64;

/// How long the server may still finish its work once the client has closed its input.
pub const GRACE_AFTER_INPUT_ENDS: std::time::Duration = std::time::Duration::from_secs(3);

/// Serves LSP on `input`/`output` until the client exits, or until `GRACE_AFTER_INPUT_ENDS`
/// after the client has closed its input. Every frame is checked first (`transport.rs`): a
/// malformed one is answered and the next one served.
pub async fn serve<I, O>(input: I, output: O)
where
    I: tokio::io::AsyncRead + Unpin + Send + 'static,
    O: tokio::io::AsyncWrite + Unpin,
{
    let (service, socket) = service();
    let (to_server, server_input) = tokio::io::duplex(1 << 16);
    let (server_output, from_server) = tokio::io::duplex(1 << 16);
    let (answers_tx, answers_rx) = tokio::sync::mpsc::unbounded_channel();
    let reading = tokio::spawn(transport::forward_input(input, to_server, answers_tx));
    let server = Server::new(server_input, server_output, socket)
        .concurrency_level(CONCURRENCY)
        .serve(service);
    let serving = async move {
        tokio::join!(
            server,
            transport::forward_output(from_server, answers_rx, output)
        );
    };
    if !until_input_ends(serving, reading, GRACE_AFTER_INPUT_ENDS).await {
        tracing::warn!(
            "the client closed its input and work was still running {} s later: stopping",
            GRACE_AFTER_INPUT_ENDS.as_secs()
        );
    }
}

/// Runs `serving` until it ends, or until `grace` after `reading` (the task that forwards the
/// client's input) has ended; then stops reading. Returns whether `serving` ended.
///
/// tower-lsp stops serving at the end of its input only once every handler in flight has
/// finished, and a handler can wait forever on a client that is gone (one server outlived its
/// VS Code that way, reparented to init, its input closed, its threads idle).
async fn until_input_ends(
    serving: impl std::future::Future<Output = ()>,
    mut reading: tokio::task::JoinHandle<()>,
    grace: std::time::Duration,
) -> bool {
    let served = {
        let input_closed = async {
            let _ = (&mut reading).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            () = serving => true,
            () = input_closed => false,
        }
    };
    // After `exit` the client may keep its end open: stop reading it.
    reading.abort();
    served
}

pub fn run_stdio() {
    client_process::exit_with_client();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(tokio::io::stdin(), tokio::io::stdout()));
    // A read of stdin may still be blocked in its thread: do not wait for it.
    rt.shutdown_background();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const GRACE: Duration = Duration::from_millis(200);

    /// A task that reads "input" until `end` fires (or forever), and reports through the
    /// returned receiver when it is dropped: ended or aborted.
    fn reading_until(
        end: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _dropped = dropped_tx;
            match end {
                Some(end) => {
                    let _ = end.await;
                }
                None => std::future::pending().await,
            }
        });
        (task, dropped_rx)
    }

    #[tokio::test]
    async fn a_handler_that_never_ends_does_not_outlive_the_input_by_more_than_the_grace() {
        let (end_tx, end_rx) = tokio::sync::oneshot::channel();
        let (reading, _) = reading_until(Some(end_rx));
        let start = Instant::now();
        let stopping = tokio::spawn(until_input_ends(std::future::pending(), reading, GRACE));
        tokio::time::sleep(3 * GRACE).await;
        assert!(!stopping.is_finished(), "stopped while the input was open");
        end_tx.send(()).unwrap();
        let served = tokio::time::timeout(10 * GRACE, stopping).await;
        assert!(!served.expect("stopped").unwrap(), "reported as served");
        assert!(start.elapsed() >= 4 * GRACE);
    }

    #[tokio::test]
    async fn serving_that_ends_stops_reading_the_input() {
        let (reading, dropped) = reading_until(None);
        assert!(until_input_ends(async {}, reading, GRACE).await);
        // The reading task was aborted: its end of the channel is gone.
        tokio::time::timeout(GRACE, dropped)
            .await
            .expect("the reading task ended")
            .unwrap_err();
    }

    #[tokio::test]
    async fn work_that_finishes_within_the_grace_is_served() {
        let (reading, _) = reading_until(Some(tokio::sync::oneshot::channel().1));
        let serving = tokio::time::sleep(GRACE / 2);
        assert!(until_input_ends(serving, reading, 4 * GRACE).await);
    }

    #[tokio::test]
    async fn the_server_stops_when_the_client_closes_its_input() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let (server_read, server_write) = tokio::io::split(server);
        let serving = tokio::spawn(serve(server_read, server_write));
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"capabilities":{}}}"#;
        let frame = format!("Content-Length: {}\r\n\r\n{body}", body.len());
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client_write.write_all(frame.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 64];
        let n = client_read.read(&mut answer).await.unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).starts_with("Content-Length"));
        client_write.shutdown().await.unwrap();
        drop(client_write);
        tokio::time::timeout(GRACE_AFTER_INPUT_ENDS + Duration::from_secs(5), serving)
            .await
            .expect("the server stopped")
            .unwrap();
    }
}
