//! `promptSalience.setMethod`: switch between `grad_l2` and `grad_dot_input` from the cached
//! scores (one gradient gives both); any other switch computes with the new method.

use std::sync::Arc;

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::Result;

use super::super::protocol::{ComputeArgs, SetMethodArgs};
use super::super::Backend;
use super::result_params;

impl Backend {
    pub(super) async fn set_method(&self, args: SetMethodArgs) -> Result<Value> {
        let switched = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st.document(&args.uri)?;
            let switch = doc.painted.as_ref().and_then(|p| {
                let a = p.analysis.switched_to(args.method)?;
                Some((
                    p.version,
                    a,
                    p.model.clone(),
                    p.segmentation.clone(),
                    p.gain,
                ))
            });
            switch.map(|(version, a, model, segmentation, gain)| {
                doc.paint(version, Arc::new(a), model, segmentation, gain);
                let painted = doc.painted.as_ref().expect("painted");
                result_params(&args.uri, &doc.rope, doc.version, enc, painted)
            })
        };
        match switched {
            Some(p) => {
                let summary = json!({
                    "method": p.method,
                    "recomputed": false,
                    "segments": p.segments.len(),
                });
                self.after_paint(p).await;
                Ok(summary)
            }
            None => {
                let mut v = self
                    .compute(ComputeArgs {
                        uri: args.uri,
                        range: None,
                        method: Some(args.method),
                        contrast: None,
                        granularity: None,
                    })
                    .await?;
                v["recomputed"] = true.into();
                Ok(v)
            }
        }
    }
}
