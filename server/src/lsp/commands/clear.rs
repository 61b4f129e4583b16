//! `promptSalience.clear`: remove the painted map.

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::Result;

use super::super::protocol::DocumentArgs;
use super::super::Backend;

impl Backend {
    pub(super) async fn clear(&self, args: DocumentArgs) -> Result<Value> {
        self.state().document(&args.uri)?.painted = None;
        self.refresh_semantic_tokens().await;
        Ok(json!({ "cleared": true }))
    }
}
