//! Input gradients by hand: the reverse of `forward.rs`, computing only d/d(inputs).

use candle_core::{Result, Tensor};

use super::decode_dot::Activations;
use super::forward::{LayerRecord, LayerTape, Past, Tape};
use super::kernels::{
    gated_backward_into, merge_heads_backward_into, rms_norm_backward, rms_norm_backward_plus,
    rms_norm_into, split_heads,
};
use super::ops::Activation;
use super::{Layer, Model};

impl Model {
    /// d objective / d input embeddings (b, t, hidden) — the scaled embeddings fed to the first
    /// layer — given d objective / d last hidden state (b * t, hidden).
    ///
    /// The tape is consumed: each layer's record is dropped once its gradient is through, so
    /// later layers' temporaries can reuse that memory instead of every record staying alive
    /// to the end. With all 30 layers of a 600-token SmolLM2 pass kept, one probe of the
    /// resident memory saw the backward pass grow it by 34 MiB instead of 44; over repeated
    /// passes the allocator's fragmentation (±30 MiB between runs) hides the difference.
    pub fn backward(
        &self,
        tape: Tape,
        grad_last_hidden: Tensor,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let (b, t) = (tape.batch, tape.seq);
        let rope = self.rope_tables(0, t)?;
        let mut g = grad_last_hidden;
        let last = self.layers.len() - 1;
        let mut records = tape.layers;
        for (i, layer) in self.layers.iter().enumerate().rev() {
            check()?;
            let record = records.pop().expect("one record per layer");
            let (cos, sin) = rope.of(layer);
            let lt = match record {
                LayerRecord::Full(lt) => lt,
                LayerRecord::Input(h) => {
                    let from = if i == last { tape.outputs_from } else { 0 };
                    let past = Past::Nothing;
                    let (_, lt) = self.layer_forward(layer, &h, (b, t), &rope, past, true, from)?;
                    lt.expect("tape requested")
                }
            };
            g = self.layer_backward(layer, &lt, g, b, t, cos, sin)?;
        }
        g.reshape((b, t, self.cfg.hidden))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        layer: &Layer,
        lt: &LayerTape,
        g_out: Tensor,
        b: usize,
        t: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (nh, nkv, hd, grp) = (c.n_head, c.n_kv_head, c.head_dim, self.group());
        // Query-side rows: positions `from..t` of each sequence (all of them but in the last
        // layer of a pass that scores only those).
        let from = lt.outputs_from;
        let tq = t - from;

        // Feed-forward block: out = h2 + norm?(down(act(gate) * up)).
        let mut g_down = g_out.clone();
        if let (Some(n), Some(pre)) = (&layer.post_ffn_norm, &lt.down_pre_norm) {
            g_down = rms_norm_backward(pre, n, c.eps, &g_down)?;
        }
        let g_act = layer.w_down.backward(&g_down)?;
        let gelu = c.activation == Activation::GeluTanh;
        let w_gate_up = &layer.w_gate_up;
        let g_m = match &lt.gate_up {
            Some(gate_up) => gated_backward_into(gate_up, &g_act, gelu, w_gate_up)?,
            None => {
                let exact = Activations::Exact;
                let gate_up = rms_norm_into(&lt.h2, &layer.ffn_norm, c.eps, w_gate_up, exact)?;
                gated_backward_into(&gate_up, &g_act, gelu, w_gate_up)?
            }
        };
        let g_h2 = rms_norm_backward_plus(&lt.h2, &layer.ffn_norm, c.eps, &g_m, &g_out)?;

        // Attention block: h2 = h + norm?(wo(attention(q, k, v))).
        let mut g_attn = g_h2.clone();
        if let (Some(n), Some(pre)) = (&layer.post_attn_norm, &lt.attn_pre_norm) {
            g_attn = rms_norm_backward(pre, n, c.eps, &g_attn)?;
        }
        let g_o = split_heads(&layer.wo.backward(&g_attn)?, (b, tq, hd), &[nh])?
            .remove(0)
            .reshape((b, nkv, grp * tq, hd))?;
        let grads = self
            .attention(layer, b, tq, t)
            .backward(&lt.q, &lt.k, &lt.v, &lt.lse, &g_o)?;
        let (g_q, g_k, g_v) = (grads.q.reshape((b, nh, tq, hd))?, grads.k, grads.v);
        // The rope is a rotation: its transpose rotates by the opposite angle.
        let rope = self.rope_of(layer);
        let (mut g_q, mut g_k) = if layer.rotary {
            let (cos_q, sin_q) = if from > 0 {
                let suffix = |x: &Tensor| x.narrow(0, from, tq)?.contiguous();
                (suffix(cos)?, suffix(sin)?)
            } else {
                (cos.clone(), sin.clone())
            };
            (
                rope.apply_transposed(&g_q, &cos_q, &sin_q)?,
                rope.apply_transposed(&g_k, cos, sin)?,
            )
        } else {
            (g_q.contiguous()?, g_k.contiguous()?)
        };
        if let (Some(n), Some(pre)) = (&layer.q_norm, &lt.q_pre_norm) {
            g_q = rms_norm_backward(pre, n, c.eps, &g_q)?;
        }
        // Positions before `from` asked nothing of their queries.
        let g_q = g_q.pad_with_zeros(2, from, 0)?;
        if let (Some(n), Some(pre)) = (&layer.k_norm, &lt.k_pre_norm) {
            g_k = rms_norm_backward(pre, n, c.eps, &g_k)?;
        }
        let g_a = merge_heads_backward_into(&[&g_q, &g_k, &g_v], (b, t, hd), &layer.w_qkv)?;
        if from == 0 {
            return rms_norm_backward_plus(&lt.h, &layer.attn_norm, c.eps, &g_a, &g_h2);
        }
        let g_h = rms_norm_backward(&lt.h, &layer.attn_norm, c.eps, &g_a)?;
        // The residual path carries gradient only to positions from `from` on.
        let hidden = g_h2.dim(1)?;
        let g_h2 = g_h2.reshape((b, tq, hidden))?.pad_with_zeros(1, from, 0)?;
        g_h2.reshape((b * t, hidden))? + g_h
    }
}
