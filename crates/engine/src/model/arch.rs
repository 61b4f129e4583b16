//! The architectures the decoder runs, and what sets each apart: a table, not copies.

use super::ops::Activation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 1–3.x, SmolLM2, Mistral.
    Llama,
    /// Llama-shaped, with no rotary embedding in every fourth layer.
    SmolLM3,
    /// Qwen 2 and 2.5.
    Qwen2,
    Qwen3,
    /// Phi-3, Phi-3.5, Phi-4-mini.
    Phi3,
    Gemma2,
    Gemma3,
}

/// What sets an architecture apart from the shared decoder.
#[derive(Debug, Clone, Copy)]
pub struct ArchTraits {
    /// `general.architecture` in GGUF files.
    pub gguf_name: &'static str,
    /// `model_type` values in Hugging Face `config.json`.
    pub hf_model_types: &'static [&'static str],
    pub activation: Activation,
    /// Biases on the q, k and v projections.
    pub qkv_bias: bool,
    /// RMSNorm on each query and key head before the rope.
    pub qk_norm: bool,
    /// Norms after attention and after the MLP as well as before (Gemma).
    pub sandwich_norms: bool,
    /// Hugging Face checkpoints store norm weights as w with the norm scaling by (1 + w).
    pub norm_plus_one: bool,
    /// Input embeddings are scaled by sqrt(hidden).
    pub scaled_embeddings: bool,
    /// llama.cpp stores q and k rows permuted for its interleaved rope.
    pub gguf_interleaved_rope: bool,
}

impl ArchTraits {
    /// What input embeddings are multiplied by before the first layer.
    pub fn embed_scale(&self, hidden: usize) -> f32 {
        if self.scaled_embeddings {
            (hidden as f32).sqrt()
        } else {
            1.0
        }
    }
}

impl Arch {
    pub const ALL: [Arch; 7] = [
        Arch::Llama,
        Arch::SmolLM3,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
        Arch::Gemma2,
        Arch::Gemma3,
    ];

    pub fn traits(self) -> ArchTraits {
        let base = ArchTraits {
            gguf_name: "llama",
            hf_model_types: &["llama", "mistral"],
            activation: Activation::Silu,
            qkv_bias: false,
            qk_norm: false,
            sandwich_norms: false,
            norm_plus_one: false,
            scaled_embeddings: false,
            gguf_interleaved_rope: false,
        };
        let gemma = ArchTraits {
            activation: Activation::GeluTanh,
            sandwich_norms: true,
            norm_plus_one: true,
            scaled_embeddings: true,
            ..base
        };
        match self {
            Arch::Llama => ArchTraits {
                gguf_interleaved_rope: true,
                ..base
            },
            Arch::SmolLM3 => ArchTraits {
                gguf_name: "smollm3",
                hf_model_types: &["smollm3"],
                gguf_interleaved_rope: true,
                ..base
            },
            Arch::Qwen2 => ArchTraits {
                gguf_name: "qwen2",
                hf_model_types: &["qwen2"],
                qkv_bias: true,
                ..base
            },
            Arch::Qwen3 => ArchTraits {
                gguf_name: "qwen3",
                hf_model_types: &["qwen3"],
                qk_norm: true,
                ..base
            },
            Arch::Phi3 => ArchTraits {
                gguf_name: "phi3",
                hf_model_types: &["phi3"],
                ..base
            },
            Arch::Gemma2 => ArchTraits {
                gguf_name: "gemma2",
                hf_model_types: &["gemma2"],
                ..gemma
            },
            Arch::Gemma3 => ArchTraits {
                gguf_name: "gemma3",
                hf_model_types: &["gemma3_text"],
                qk_norm: true,
                ..gemma
            },
        }
    }

    pub fn name(self) -> &'static str {
        self.traits().gguf_name
    }

    pub fn from_gguf_name(name: &str) -> Option<Arch> {
        Self::ALL.into_iter().find(|a| a.traits().gguf_name == name)
    }

    pub fn from_hf_model_type(model_type: &str) -> Option<Arch> {
        Self::ALL
            .into_iter()
            .find(|a| a.traits().hf_model_types.contains(&model_type))
    }
}

/// The `general.architecture` values this engine runs.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "smollm3", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
];

/// The `model_type` values of Hugging Face directories this engine runs.
pub const SUPPORTED_HF_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "smollm3",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
];
