//! `promptSalience.setGranularity`: re-render a gradient map at another level from the cached
//! token scores (`custom`: the file's `salience.separators`). A perturbation method's scores
//! belong to the segments it deleted, so another level means deleting other segments: that
//! computes anew (keeping method and contrast).

use serde_json::Value;
use tower_lsp_server::jsonrpc::Result;

use super::super::protocol::{ComputeArgs, GranularityChoice, SetGranularityArgs};
use super::super::Backend;
use super::invalid;
use salience_core::options::limits;
use salience_core::segments::Segmentation;

impl Backend {
    pub(super) async fn set_granularity(&self, args: SetGranularityArgs) -> Result<Value> {
        let (segmentation, redo) = {
            let mut st = self.state();
            let doc = st.document(&args.uri)?;
            let segmentation = match args.granularity {
                GranularityChoice::Standard(g) => Segmentation::Standard(g),
                GranularityChoice::Custom(_) => {
                    let source = doc.parsed().settings.separators.clone().ok_or_else(|| {
                        invalid("custom segments need `salience.separators` (a regex) in the front matter")
                    })?;
                    Segmentation::Custom(
                        limits::separators(&source)
                            .map_err(|e| invalid(format!("separators: {e}")))?,
                    )
                }
            };
            let redo = doc
                .painted
                .as_ref()
                .filter(|p| p.analysis.method.is_perturbation())
                .map(|p| (p.analysis.method, p.analysis.contrast.clone()));
            (segmentation, redo)
        };
        if let Some((method, contrast)) = redo {
            let granularity = match args.granularity {
                GranularityChoice::Standard(g) => Some(g),
                // No granularity argument: the file's separators apply.
                GranularityChoice::Custom(_) => None,
            };
            let mut v = self
                .compute(ComputeArgs {
                    uri: args.uri,
                    range: None,
                    method: Some(method),
                    contrast: contrast.map(|c| c.text),
                    granularity,
                })
                .await?;
            v["recomputed"] = true.into();
            return Ok(v);
        }
        self.repaint(&args.uri, |p| {
            p.rerender(segmentation, p.gain);
            Ok(())
        })
        .await
    }
}
