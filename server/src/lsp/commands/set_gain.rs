//! `promptSalience.setGain`: re-render with another display gain (no model run).

use serde_json::Value;
use tower_lsp_server::jsonrpc::Result;

use super::super::protocol::SetGainArgs;
use super::super::Backend;
use super::invalid;
use salience_core::options::limits;

impl Backend {
    pub(super) async fn set_gain(&self, args: SetGainArgs) -> Result<Value> {
        let gain = limits::number(args.gain as f64, limits::GAIN, true)
            .map_err(|e| invalid(format!("gain: {e}")))?;
        self.repaint(&args.uri, |p| {
            p.rerender(p.segmentation.clone(), gain);
            Ok(())
        })
        .await
    }
}
