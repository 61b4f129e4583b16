//! `promptSalience.showDifference`: paint each segment's change since the previous result
//! (segments matched by their text), or the scores again.

use serde_json::Value;
use tower_lsp_server::jsonrpc::Result;

use super::super::protocol::ShowDifferenceArgs;
use super::super::Backend;
use super::invalid;

impl Backend {
    pub(super) async fn show_difference(&self, args: ShowDifferenceArgs) -> Result<Value> {
        self.repaint(&args.uri, |p| {
            if args.value && p.previous.is_none() {
                return Err(invalid(p.incomparable.clone().unwrap_or_else(|| {
                    "no previous result to compare with: compute, edit, and compute again".into()
                })));
            }
            p.set_difference(args.value);
            Ok(())
        })
        .await
    }
}
