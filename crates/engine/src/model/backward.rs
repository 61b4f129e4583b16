//! Input gradients by hand: the reverse of `forward.rs`, computing only d/d(inputs).

use candle_core::{Result, Tensor};

use super::forward::{LayerRecord, LayerTape, Past, Tape};
use super::kernels::{gated_backward, merge_heads, rms_norm_backward, split_heads};
use super::ops::Activation;
use super::{Layer, Model};

impl Model {
    /// d objective / d input embeddings (b, t, hidden) — the scaled embeddings fed to the first
    /// layer — given d objective / d last hidden state (b * t, hidden).
    pub fn backward(
        &self,
        tape: &Tape,
        grad_last_hidden: Tensor,
        check: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let (b, t) = (tape.batch, tape.seq);
        let rope = self.rope_tables(0, t)?;
        let mut g = grad_last_hidden;
        for (layer, record) in self.layers.iter().zip(&tape.layers).rev() {
            check()?;
            let (cos, sin) = rope.of(layer);
            let recomputed;
            let lt = match record {
                LayerRecord::Full(lt) => lt,
                LayerRecord::Input(h) => {
                    let (_, lt) = self.layer_forward(layer, h, b, t, &rope, Past::Nothing, true)?;
                    recomputed = lt.expect("tape requested");
                    &recomputed
                }
            };
            g = self.layer_backward(layer, lt, g, b, t, cos, sin)?;
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

        // Feed-forward block: out = h2 + norm?(down(act(gate) * up)).
        let mut g_down = g_out.clone();
        if let (Some(n), Some(pre)) = (&layer.post_ffn_norm, &lt.down_pre_norm) {
            g_down = rms_norm_backward(pre, n, c.eps, &g_down)?;
        }
        let g_act = layer.w_down.backward(&g_down)?;
        let gelu = c.activation == Activation::GeluTanh;
        let g_gate_up = gated_backward(&lt.gate_up, &g_act, gelu)?;
        let g_m = layer.w_gate_up.backward(&g_gate_up)?;
        let g_h2 = (g_out + rms_norm_backward(&lt.h2, &layer.ffn_norm, c.eps, &g_m)?)?;

        // Attention block: h2 = h + norm?(wo(attention(q, k, v))).
        let mut g_attn = g_h2.clone();
        if let (Some(n), Some(pre)) = (&layer.post_attn_norm, &lt.attn_pre_norm) {
            g_attn = rms_norm_backward(pre, n, c.eps, &g_attn)?;
        }
        let g_o = split_heads(&layer.wo.backward(&g_attn)?, (b, t, hd), &[nh])?
            .remove(0)
            .reshape((b, nkv, grp * t, hd))?;
        let grads = self
            .attention(layer, b, t, t)
            .backward(&lt.q, &lt.k, &lt.v, &lt.lse, &g_o)?;
        let (g_q, g_k, g_v) = (grads.q.reshape((b, nh, t, hd))?, grads.k, grads.v);
        // The rope is a rotation: its transpose rotates by the opposite angle.
        let neg_sin = sin.neg()?;
        let rope = self.rope_of(layer);
        let (mut g_q, mut g_k) = if layer.rotary {
            (
                rope.apply_transposed(&g_q, cos, &neg_sin)?,
                rope.apply_transposed(&g_k, cos, &neg_sin)?,
            )
        } else {
            (g_q.contiguous()?, g_k.contiguous()?)
        };
        if let (Some(n), Some(pre)) = (&layer.q_norm, &lt.q_pre_norm) {
            g_q = rms_norm_backward(pre, n, c.eps, &g_q)?;
        }
        if let (Some(n), Some(pre)) = (&layer.k_norm, &lt.k_pre_norm) {
            g_k = rms_norm_backward(pre, n, c.eps, &g_k)?;
        }
        let g_qkv = merge_heads(&[&g_q, &g_k, &g_v], (b, t, hd))?;
        let g_a = layer.w_qkv.backward(&g_qkv)?;
        g_h2 + rms_norm_backward(&lt.h, &layer.attn_norm, c.eps, &g_a)?
    }
}
