//! `promptSalience.setGranularity`: re-render a gradient map at another level from the cached
//! token scores. A perturbation method's scores belong to the segments it deleted, so another
//! level means deleting other segments: that computes anew (keeping method and contrast).

use serde_json::Value;
use tower_lsp_server::jsonrpc::Result;

use super::super::protocol::{ComputeArgs, SetGranularityArgs};
use super::super::Backend;
use salience_core::segments::Segmentation;

impl Backend {
    pub(super) async fn set_granularity(&self, args: SetGranularityArgs) -> Result<Value> {
        let redo = {
            let mut st = self.state();
            st.document(&args.uri)?
                .painted
                .as_ref()
                .filter(|p| p.analysis.method.is_perturbation())
                .map(|p| (p.analysis.method, p.analysis.contrast.clone()))
        };
        if let Some((method, contrast)) = redo {
            let mut v = self
                .compute(ComputeArgs {
                    uri: args.uri,
                    range: None,
                    method: Some(method),
                    contrast: contrast.map(|c| c.text),
                    granularity: Some(args.granularity),
                })
                .await?;
            v["recomputed"] = true.into();
            return Ok(v);
        }
        self.repaint(&args.uri, |p| {
            p.rerender(Segmentation::Standard(args.granularity), p.gain);
            Ok(())
        })
        .await
    }
}
