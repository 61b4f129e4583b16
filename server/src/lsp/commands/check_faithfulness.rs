//! `promptSalience.checkFaithfulness`: the deletion test of the painted map at its
//! segmentation, from the cache or run on the model (cancelled by an edit or a new
//! computation). The result is kept with the map and sent again in `promptSalience/result`.

use std::sync::Arc;

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::{Error, Result};
use tower_lsp_server::lsp_types::Uri;

use super::super::worker::{Output, Task};
use super::super::Backend;
use super::{content_modified, engine_error, invalid, is_ours, result_params, NOTHING_COMPUTED};
use salience_engine::CancelToken;

impl Backend {
    pub(in super::super) async fn check_faithfulness(&self, uri: Uri) -> Result<Value> {
        let cancel = CancelToken::new();
        let (analysis, model, segmentation) = {
            let mut st = self.state();
            let doc = st.document(&uri)?;
            let p = doc
                .painted
                .as_ref()
                .ok_or_else(|| invalid(NOTHING_COMPUTED))?;
            if let Some(f) = p.faithfulness() {
                return Ok(json!({ "cached": true, "faithfulness": f }));
            }
            let snapshot = (p.analysis.clone(), p.model.clone(), p.segmentation.clone());
            if let Some(old) = doc.checking.replace(cancel.clone()) {
                old.cancel();
            }
            snapshot
        };
        let task = Task::Faithfulness {
            analysis: analysis.clone(),
            segmentation: segmentation.clone(),
        };
        let faithfulness = match self
            .run_on_worker("Checking faithfulness", model, task, &cancel)
            .await
        {
            Ok(Output::Faithfulness(f)) => *f,
            Ok(_) => return Err(Error::internal_error()),
            Err(e) => return Err(engine_error(e)),
        };
        let params = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st.document_after_work(&uri)?;
            if is_ours(&doc.checking, &cancel) {
                doc.checking = None;
            }
            // Kept only with the map it was computed for.
            match doc.painted.as_mut() {
                Some(p) if Arc::ptr_eq(&p.analysis, &analysis) => {
                    p.faithfulness
                        .insert(segmentation.name(), faithfulness.clone());
                    result_params(&uri, &doc.rope, doc.version, enc, p)
                }
                _ => {
                    return Err(content_modified(
                        "the map changed during the faithfulness check: result dropped",
                    ))
                }
            }
        };
        self.after_paint(params).await;
        Ok(json!({ "cached": false, "faithfulness": faithfulness }))
    }
}
