//! Text generation with a KV cache that is reused across runs sharing a prompt prefix.

use std::ops::Range;
use std::time::Instant;

use rand::{Rng, SeedableRng};

use super::model::KvCache;
use super::{CancelToken, Engine, EngineError, Progress, ProgressFn};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Keep generating past an end-of-sequence token (benchmarks, as llama.cpp's `--ignore-eos`).
    pub ignore_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfSequence,
    StopString,
    MaxTokens,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids, the end-of-sequence token included when the model produced one.
    pub ids: Vec<u32>,
    /// The decoded text, without the end-of-sequence token and cut at a stop string.
    pub text: String,
    /// Byte range of each generated token in `text` (empty past its end).
    pub token_ranges: Vec<Range<usize>>,
    pub stop_reason: StopReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the previous run's cache.
    pub reused_prefix: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// The sampler's seed, when the temperature was above 0 (None: greedy).
    pub seed: Option<u64>,
}

impl Generation {
    pub fn tokens_per_second(&self) -> f64 {
        if self.decode_seconds > 0.0 {
            self.ids.len().saturating_sub(1) as f64 / self.decode_seconds
        } else {
            0.0
        }
    }
}

/// The KV cache of the last generation and the ids it holds.
#[derive(Default)]
pub struct PrefixCache {
    ids: Vec<u32>,
    cache: KvCache,
}

impl Engine {
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        progress: ProgressFn,
        cancel: &CancelToken,
    ) -> Result<Generation, EngineError> {
        if prompt_ids.is_empty() {
            return Err(EngineError::InvalidInput("empty prompt".into()));
        }
        let ctx = self.model.cfg.context_length;
        if prompt_ids.len() >= ctx {
            return Err(EngineError::ContextOverflow {
                tokens: prompt_ids.len(),
                limit: ctx,
            });
        }
        let started = Instant::now();
        let mut shared = self
            .generation_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Reuse the longest common prefix, keeping at least one token to run so there are logits.
        let common = shared
            .ids
            .iter()
            .zip(prompt_ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt_ids.len() - 1);
        let mut cache = std::mem::take(&mut shared.cache);
        cache.truncate(common);
        let mut cache_ids = prompt_ids[..common].to_vec();
        let run = |cache: &mut KvCache, ids: &[u32]| -> Result<Vec<f32>, EngineError> {
            cancel
                .check()
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            let h = self
                .model
                .forward_cached(ids, cache)
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            let logits = self
                .model
                .decoding_logits(&h)
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))?;
            logits
                .squeeze(0)
                .and_then(|l| l.to_vec1::<f32>())
                .map_err(|e| EngineError::candle_or_cancel(e, cancel))
        };
        // On a pool thread, each product's parallel split is pushed to that thread's own queue
        // instead of being injected from outside and waking a sleeping worker (measured: half
        // of a decoding step went to those wake-ups).
        let result = crate::threads::on_pool(|| {
            // Prefill in chunks so cancellation stays responsive on long prompts.
            let mut logits = Vec::new();
            for chunk in prompt_ids[common..].chunks(256) {
                logits = run(&mut cache, chunk)?;
                cache_ids.extend_from_slice(chunk);
            }
            let prefill_seconds = started.elapsed().as_secs_f64();
            let decode_started = Instant::now();
            let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
            let mut ids = Vec::new();
            let mut stop_reason = StopReason::MaxTokens;
            let max = opts.max_new_tokens.min(ctx - prompt_ids.len());
            while ids.len() < max {
                let next = sample(&logits, opts, &mut rng);
                ids.push(next);
                progress(Progress::Generating {
                    done: ids.len(),
                    max,
                });
                if !opts.ignore_eos && self.tokenizer.eos_ids.contains(&next) {
                    stop_reason = StopReason::EndOfSequence;
                    break;
                }
                if !opts.stop.is_empty() {
                    let text = self.tokenizer.decode(&ids);
                    if opts
                        .stop
                        .iter()
                        .any(|s| !s.is_empty() && text.contains(s.as_str()))
                    {
                        stop_reason = StopReason::StopString;
                        break;
                    }
                }
                if ids.len() == max {
                    break;
                }
                logits = run(&mut cache, &[next])?;
                cache_ids.push(next);
            }
            Ok((
                ids,
                stop_reason,
                prefill_seconds,
                decode_started.elapsed().as_secs_f64(),
            ))
        });
        shared.ids = cache_ids;
        shared.cache = cache;
        let (ids, stop_reason, prefill_seconds, decode_seconds) = result?;
        let (text, token_ranges) = self.decode_with_ranges(&ids, &opts.stop);
        Ok(Generation {
            ids,
            text,
            token_ranges,
            stop_reason,
            prompt_tokens: prompt_ids.len(),
            reused_prefix: common,
            prefill_seconds,
            decode_seconds,
            seed: (opts.temperature > 0.0).then_some(opts.seed),
        })
    }

    /// Decodes generated ids (dropping a final end-of-sequence token) and cuts at the first
    /// stop string; returns each token's byte range in the text.
    pub fn decode_with_ranges(&self, ids: &[u32], stop: &[String]) -> (String, Vec<Range<usize>>) {
        let content: &[u32] = match ids.last() {
            Some(last) if self.tokenizer.eos_ids.contains(last) => &ids[..ids.len() - 1],
            _ => ids,
        };
        let mut ranges = Vec::with_capacity(ids.len());
        let mut prev = 0;
        for i in 1..=content.len() {
            // Decoding prefixes keeps multi-byte characters split across tokens intact.
            let len = self.tokenizer.decode(&content[..i]).len();
            ranges.push(prev..len.max(prev));
            prev = len.max(prev);
        }
        let mut text = self.tokenizer.decode(content);
        if let Some(cut) = stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        let end = text.len();
        for r in &mut ranges {
            r.start = r.start.min(end);
            r.end = r.end.min(end);
        }
        while ranges.len() < ids.len() {
            ranges.push(end..end);
        }
        (text, ranges)
    }
}

fn sample(logits: &[f32], opts: &GenerateOptions, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if opts.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l - max) / opts.temperature).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut kept = Vec::new();
    let mut acc = 0.0;
    for p in probs {
        acc += p.1 / total;
        kept.push(p);
        if acc >= opts.top_p {
            break;
        }
    }
    let kept_total: f32 = kept.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * kept_total;
    for (i, p) in &kept {
        r -= p;
        if r <= 0.0 {
            return *i as u32;
        }
    }
    kept.last().map(|p| p.0 as u32).unwrap_or_else(argmax)
}
