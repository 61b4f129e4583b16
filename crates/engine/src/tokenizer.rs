//! A `tokenizers::Tokenizer` rebuilt from GGUF metadata, with byte offsets into the caller's text.
//!
//! candle's own GGUF tokenizer adds a prefix space for SmolLM2 ("Hello" -> "ĠHello"), which
//! breaks agreement with the reference ids, so the pipelines are assembled here by hand.

use std::ops::Range;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use super::gguf::GgufFile;
use super::EngineError;

/// GGUF `tokenizer.ggml.token_type` values.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;
const TOKEN_TYPE_BYTE: i64 = 6;

/// One token of an encoded text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedToken {
    pub id: u32,
    /// Byte range in the encoded text.
    pub range: Range<usize>,
}

pub struct PromptTokenizer {
    inner: Tokenizer,
    tokens: Vec<String>,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    /// Special tokens put before and after a prompt sent raw: the GGUF's `add_bos_token`, or
    /// what the post-processor of a `tokenizer.json` adds.
    pub raw_prefix: Vec<u32>,
    pub raw_suffix: Vec<u32>,
    special: Vec<bool>,
}

/// Control tokens that end a chat turn, though not always the file's EOS.
const TURN_ENDS: [&str; 5] = [
    "<|im_end|>",
    "<end_of_turn>",
    "<|eot_id|>",
    "<|endoftext|>",
    "<|end|>",
];

impl PromptTokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, EngineError> {
        let kind = gguf.string("tokenizer.ggml.model")?;
        let tokens = gguf.string_array("tokenizer.ggml.tokens")?;
        let types: Vec<i64> = gguf
            .number_array("tokenizer.ggml.token_type")
            .map(|v| v.into_iter().map(|x| x as i64).collect())
            .unwrap_or_else(|_| vec![1; tokens.len()]);
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut inner = match kind.as_str() {
            "gpt2" => {
                let merges = gguf.string_array("tokenizer.ggml.merges")?;
                let merges = merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| gguf.bad(format!("malformed merge `{m}`")))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .build()
                    .map_err(|e| gguf.bad(format!("cannot build BPE tokenizer: {e}")))?;
                let mut t = Tokenizer::new(bpe);
                // Same split as llama.cpp's `smollm`/`starcoder` pre-tokenizers: digits one by
                // one, then GPT-2's regex, with no prefix space.
                t.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    ByteLevel::new(false, false, true).into(),
                ])));
                t.with_decoder(Some(ByteLevelDecoder::new(false, false, true)));
                t
            }
            "llama" => {
                let scores = gguf.number_array("tokenizer.ggml.scores")?;
                let merges = merges_from_scores(&tokens, &types, &scores, &vocab);
                let unk = gguf
                    .opt_u32("tokenizer.ggml.unknown_token_id")
                    .and_then(|i| tokens.get(i as usize).cloned());
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .byte_fallback(true)
                    .fuse_unk(true);
                if let Some(unk) = unk {
                    builder = builder.unk_token(unk);
                }
                let bpe = builder
                    .build()
                    .map_err(|e| gguf.bad(format!("cannot build SentencePiece tokenizer: {e}")))?;
                let mut t = Tokenizer::new(bpe);
                let replace = Replace::new(" ", "▁")
                    .map_err(|e| gguf.bad(format!("tokenizer normalizer: {e}")))?;
                t.with_normalizer(Some(replace))
                    .map_err(|e| gguf.bad(format!("tokenizer normalizer: {e}")))?;
                let decoder: DecoderWrapper = DecoderSequence::new(vec![
                    Replace::new("▁", " ")
                        .map_err(|e| gguf.bad(format!("tokenizer decoder: {e}")))?
                        .into(),
                    ByteFallback::new().into(),
                    Fuse::new().into(),
                ])
                .into();
                t.with_decoder(Some(decoder));
                t
            }
            other => {
                return Err(EngineError::Unsupported(format!(
                    "tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        let mut special = vec![false; tokens.len()];
        let added: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
            .filter(|(i, _)| !tokens[*i].is_empty())
            .map(|(i, &t)| {
                special[i] = t == TOKEN_TYPE_CONTROL;
                AddedToken::from(tokens[i].clone(), t == TOKEN_TYPE_CONTROL)
            })
            .collect();
        inner
            .add_special_tokens(added)
            .map_err(|e| gguf.bad(format!("special tokens: {e}")))?;

        let bos_id = gguf.opt_u32("tokenizer.ggml.bos_token_id");
        let mut eos_ids: Vec<u32> = gguf
            .opt_u32("tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        add_turn_ends(&tokens, &special, &mut eos_ids);
        let add_bos = gguf
            .opt_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(kind == "llama");
        Ok(Self {
            inner,
            tokens,
            bos_id,
            eos_ids,
            raw_prefix: bos_id.filter(|_| add_bos).into_iter().collect(),
            raw_suffix: Vec::new(),
            special,
        })
    }

    /// The tokenizer of a Hugging Face model directory: `tokenizer.json` exactly as it is
    /// (added tokens, post-processor), with BOS and EOS named by `tokenizer_config.json`.
    pub fn from_hf(
        tokenizer_json: &Path,
        config: &serde_json::Value,
        extra_eos: &[u32],
    ) -> Result<Self, EngineError> {
        let bad = |reason: String| EngineError::ModelFile {
            path: tokenizer_json.to_owned(),
            reason,
        };
        let inner = Tokenizer::from_file(tokenizer_json)
            .map_err(|e| bad(format!("cannot read the tokenizer: {e}")))?;
        let size = inner.get_vocab_size(true);
        let tokens: Vec<String> = (0..size as u32)
            .map(|i| inner.id_to_token(i).unwrap_or_default())
            .collect();
        let mut special = vec![false; size];
        for (id, added) in inner.get_added_tokens_decoder() {
            if added.special {
                if let Some(s) = special.get_mut(id as usize) {
                    *s = true;
                }
            }
        }
        let named = |key: &str| -> Option<u32> {
            let v = config.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(text)
        };
        let bos_id = named("bos_token");
        let mut eos_ids: Vec<u32> = named("eos_token").into_iter().collect();
        for &id in extra_eos {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        add_turn_ends(&tokens, &special, &mut eos_ids);
        // What the post-processor wraps a single sequence in: compare a text encoded with and
        // without special tokens.
        let probe = "a";
        let plain = inner
            .encode(probe, false)
            .map_err(|e| bad(format!("the tokenizer fails on a probe text: {e}")))?;
        let wrapped = inner
            .encode(probe, true)
            .map_err(|e| bad(format!("the tokenizer fails on a probe text: {e}")))?;
        let (plain, wrapped) = (plain.get_ids(), wrapped.get_ids());
        let at = wrapped
            .windows(plain.len().max(1))
            .position(|w| w == plain)
            .ok_or_else(|| bad("the post-processor changes the text's own tokens".into()))?;
        Ok(Self {
            inner,
            tokens,
            bos_id,
            eos_ids,
            raw_prefix: wrapped[..at].to_vec(),
            raw_suffix: wrapped[at + plain.len()..].to_vec(),
            special,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Encodes `text` as it is: special-token text becomes the special token; no BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<EncodedToken>, EngineError> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(s, e))| EncodedToken { id, range: s..e })
            .collect())
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    pub fn token_text(&self, id: u32) -> String {
        if self.is_special(id) {
            return self.tokens.get(id as usize).cloned().unwrap_or_default();
        }
        self.decode(&[id])
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == text).map(|p| p as u32)
    }
}

fn add_turn_ends(tokens: &[String], special: &[bool], eos_ids: &mut Vec<u32>) {
    for name in TURN_ENDS {
        if let Some(id) = tokens.iter().position(|t| t == name) {
            if special[id] && !eos_ids.contains(&(id as u32)) {
                eos_ids.push(id as u32);
            }
        }
    }
}

/// SentencePiece BPE GGUFs carry scores instead of merges: a piece made of two pieces is a
/// merge ranked by its own score (higher merges first), as Hugging Face's converter does.
fn merges_from_scores(
    tokens: &[String],
    types: &[i64],
    scores: &[f64],
    vocab: &Vocab,
) -> Vec<(String, String)> {
    let mut merges: Vec<(f64, u32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_BYTE || ty == TOKEN_TYPE_USER_DEFINED {
            continue;
        }
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (split, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(split);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                merges.push((score, ia, ib, a.to_string(), b.to_string()));
            }
        }
    }
    merges.sort_by(|x, y| {
        y.0.partial_cmp(&x.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.1.cmp(&y.1))
            .then(x.2.cmp(&y.2))
    });
    merges.into_iter().map(|m| (m.3, m.4)).collect()
}
