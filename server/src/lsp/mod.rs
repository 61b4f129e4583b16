//! `prompt-salience lsp`: the language server. Only this module knows lsp-types and JSON-RPC;
//! `convert.rs` is its only door to byte offsets. One file per LSP feature.
//!
//! Handlers that change state (`did_open`, `did_change`, …) apply it synchronously under the
//! lock before any `.await`; model work goes to the worker thread (`worker.rs`).

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
    progress_cancels: std::collections::HashMap<String, crate::engine::CancelToken>,
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
        self.pull_configuration().await;
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
        let diags = {
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
            diagnostics::of(doc, enc)
        };
        self.client
            .publish_diagnostics(uri, diags, Some(version))
            .await;
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
        self.pull_configuration().await;
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

pub fn service() -> (LspService<Backend>, tower_lsp_server::ClientSocket) {
    // tower-lsp-server has no handler for the progress cancel button yet: add it here.
    LspService::build(Backend::new)
        .custom_method("window/workDoneProgress/cancel", Backend::cancel_progress)
        .finish()
}

/// Serves LSP on stdin/stdout until the client exits.
pub async fn serve<I, O>(input: I, output: O)
where
    I: tokio::io::AsyncRead + Unpin,
    O: tokio::io::AsyncWrite,
{
    let (service, socket) = service();
    Server::new(input, output, socket).serve(service).await;
}

pub fn run_stdio() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(serve(tokio::io::stdin(), tokio::io::stdout()));
}
