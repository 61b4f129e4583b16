//! The one place that resolves settings, in one order for every front end (CLI and LSP):
//! command arguments, then the prompt file's front matter, then the client's settings, then the
//! defaults. Each layer is a [`SalienceSettings`] (every field optional), so a setting means the
//! same thing wherever it was written.
//!
//! It also holds the bounds on every count and size a user can set ([`limits`]): a file, an
//! argument or a setting that asks for more is refused where it is read, with a clear message,
//! instead of allocating terabytes.

use salience_engine::generate::GenerateOptions;
use salience_engine::perturbation::SurrogateOptions;
use salience_engine::registry::DEFAULT_MODEL;
use salience_engine::salience::{IgOptions, Method};

use crate::analysis::AnalysisOptions;
use crate::prompt_file::{Granularity, SalienceSettings};
use crate::segments::Segmentation;

/// The method when nothing names one. Chosen by the faithfulness benchmark over the eight
/// shipped prompts (`docs/case-studies/run.sh`, table in `docs/case-studies/faithfulness.md`):
/// its maps passed their own deletion test in 4 of 8 cases, grad_dot_input's in 2 of 8.
/// Leave-one-out passed in 8 of 8 but needs a run per segment and per granularity; every
/// faithfulness check offers it when a gradient map fails.
pub const DEFAULT_METHOD: Method = Method::GradL2;

/// Upper bounds on what a prompt file, a command argument or a client setting may ask for.
/// Documented in the README ("Limits and safety").
pub mod limits {
    /// Tokens generated for a response.
    pub const MAX_NEW_TOKENS: usize = 4096;
    /// Integrated-gradients steps (fixed or adaptive).
    pub const IG_STEPS: usize = 512;
    /// Random ablation masks of `ablation_surrogate`.
    pub const SAMPLES: usize = 4096;
    /// Random deletions per fraction in the faithfulness check.
    pub const DRAWS: usize = 1000;
    /// Display gain.
    pub const GAIN: f32 = 100.0;
    /// Sampling temperature.
    pub const TEMPERATURE: f32 = 100.0;
    /// Stop strings, and the length of each.
    pub const STOP_STRINGS: usize = 16;
    pub const STOP_LEN: usize = 1024;
    /// A separator regex's source, and its compiled size (the regex crate's own limit).
    pub const SEPARATORS_LEN: usize = 1024;
    pub const SEPARATORS_COMPILED: usize = 1 << 20;

    /// Checks a whole number against its bound (messages leave naming the setting to the caller).
    pub fn count(n: u64, max: usize) -> Result<usize, String> {
        if n == 0 {
            return Err("expected a positive whole number, found 0".into());
        }
        if n > max as u64 {
            return Err(format!("{n} is more than the limit of {max}"));
        }
        Ok(n as usize)
    }

    /// Checks a number against `0 ..= max` (or `0 < x ..= max` when `positive`).
    pub fn number(x: f64, max: f32, positive: bool) -> Result<f32, String> {
        let low_ok = if positive { x > 0.0 } else { x >= 0.0 };
        if !x.is_finite() || !low_ok || x > max as f64 {
            let low = if positive { "> 0" } else { "≥ 0" };
            return Err(format!("expected a number {low} and ≤ {max}, found {x}"));
        }
        Ok(x as f32)
    }

    /// Compiles custom separators within the size bounds.
    pub fn separators(source: &str) -> Result<regex::Regex, String> {
        if source.len() > SEPARATORS_LEN {
            return Err(format!(
                "the regex is {} bytes, more than the limit of {SEPARATORS_LEN}",
                source.len()
            ));
        }
        regex::RegexBuilder::new(source)
            .size_limit(SEPARATORS_COMPILED)
            .build()
            .map_err(|e| format!("not a valid regex: {e}"))
    }

    /// Stop strings within their bounds.
    pub fn stop(stop: &[String]) -> Result<(), String> {
        if stop.len() > STOP_STRINGS {
            return Err(format!(
                "{} strings, more than the limit of {STOP_STRINGS}",
                stop.len()
            ));
        }
        if let Some(s) = stop.iter().find(|s| s.len() > STOP_LEN) {
            return Err(format!(
                "a string of {} bytes, more than the limit of {STOP_LEN}",
                s.len()
            ));
        }
        Ok(())
    }
}

/// Everything a front end needs to run an analysis, resolved.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Registered name, `.gguf` file, Hugging Face model directory or hub id.
    pub model: String,
    pub analysis: AnalysisOptions,
    /// The standard level asked for (or the default), even when custom separators are set.
    pub granularity: Granularity,
    /// Custom separators, when any layer set them: they win over the granularity.
    pub custom: Option<Segmentation>,
    pub gain: f32,
}

impl Resolved {
    /// The segmentation the map is shown at and perturbation methods delete.
    pub fn segmentation(&self) -> &Segmentation {
        &self.analysis.segments
    }
}

/// The layers of settings, highest priority first.
#[derive(Debug, Clone, Copy)]
pub struct Layers<'a> {
    pub arguments: &'a SalienceSettings,
    pub file: &'a SalienceSettings,
    pub client: &'a SalienceSettings,
}

impl<'a> Layers<'a> {
    /// The first layer that sets a value.
    fn first<T>(&self, get: impl Fn(&'a SalienceSettings) -> Option<T>) -> Option<T> {
        get(self.arguments)
            .or_else(|| get(self.file))
            .or_else(|| get(self.client))
    }

    /// Resolves every setting, checking the bounds of the layers that were not read from a
    /// prompt file (front matter is checked as it is parsed, with its line and column).
    pub fn resolve(&self) -> Result<Resolved, String> {
        check(self.arguments)?;
        check(self.client)?;
        let granularity = self
            .first(|s| s.granularity)
            .unwrap_or(Granularity::Sentence);
        // The first layer that chooses segments decides; within a layer, separators win.
        let chosen = self.first(|s| {
            (s.separators.is_some() || s.granularity.is_some()).then_some(s.separators.as_deref())
        });
        let custom = match chosen.flatten() {
            Some(source) => Some(Segmentation::Custom(
                limits::separators(source).map_err(|e| format!("separators: {e}"))?,
            )),
            None => None,
        };
        let method = self.first(|s| s.method).unwrap_or(DEFAULT_METHOD);
        let ig_defaults = IgOptions::default();
        let surrogate_defaults = SurrogateOptions::default();
        let analysis = AnalysisOptions {
            method,
            template: self.first(|s| s.template),
            system: self.first(|s| s.system.clone()),
            ig: IgOptions {
                baseline: self.first(|s| s.baseline).unwrap_or_default(),
                fixed_steps: self.first(|s| s.ig_steps),
                ..ig_defaults
            },
            generation: self.generation()?,
            contrast: self.first(|s| s.contrast.clone()),
            segments: custom
                .clone()
                .unwrap_or(Segmentation::Standard(granularity)),
            surrogate: SurrogateOptions {
                samples: self
                    .first(|s| s.samples)
                    .unwrap_or(surrogate_defaults.samples),
                seed: self
                    .first(|s| s.perturbation_seed)
                    .unwrap_or(surrogate_defaults.seed),
                ..surrogate_defaults
            },
        };
        Ok(Resolved {
            model: self
                .first(|s| s.model.clone())
                .unwrap_or_else(|| DEFAULT_MODEL.to_string()),
            analysis,
            granularity,
            custom,
            gain: self.first(|s| s.gain).unwrap_or(1.0),
        })
    }

    /// Generation settings alone (for `generate`, which needs no analysis).
    pub fn generation(&self) -> Result<GenerateOptions, String> {
        check(self.arguments)?;
        check(self.client)?;
        let d = GenerateOptions::default();
        Ok(GenerateOptions {
            max_new_tokens: self.first(|s| s.max_new_tokens).unwrap_or(d.max_new_tokens),
            temperature: self.first(|s| s.temperature).unwrap_or(d.temperature),
            top_p: self.first(|s| s.top_p).unwrap_or(d.top_p),
            // Without a seed, sampling is random per run (as a user who samples expects); the
            // seed drawn is reported with the result so the run can be repeated. 53 bits, so
            // that JSON readers (doubles) repeat it exactly.
            seed: self
                .first(|s| s.seed)
                .unwrap_or_else(|| rand::random::<u64>() >> 11),
            stop: self
                .first(|s| (!s.stop.is_empty()).then(|| s.stop.clone()))
                .unwrap_or(d.stop),
            ..d
        })
    }

    /// The model alone (to load it before anything else is resolved).
    pub fn model(&self) -> String {
        self.first(|s| s.model.clone())
            .unwrap_or_else(|| DEFAULT_MODEL.to_string())
    }
}

/// The bounds of [`limits`] on a layer of settings; the message starts with the setting's name.
pub fn check(s: &SalienceSettings) -> Result<(), String> {
    fn named(name: &'static str) -> impl Fn(String) -> String {
        move |e| format!("{name}: {e}")
    }
    let counts = [
        ("max_new_tokens", s.max_new_tokens, limits::MAX_NEW_TOKENS),
        ("ig_steps", s.ig_steps, limits::IG_STEPS),
        ("samples", s.samples, limits::SAMPLES),
    ];
    for (name, value, max) in counts {
        if let Some(n) = value {
            limits::count(n as u64, max).map_err(named(name))?;
        }
    }
    let numbers = [
        ("gain", s.gain, limits::GAIN, true),
        ("temperature", s.temperature, limits::TEMPERATURE, false),
        ("top_p", s.top_p, 1.0, false),
    ];
    for (name, value, max, positive) in numbers {
        if let Some(x) = value {
            limits::number(x as f64, max, positive).map_err(named(name))?;
        }
    }
    if let Some(source) = &s.separators {
        limits::separators(source).map_err(named("separators"))?;
    }
    limits::stop(&s.stop).map_err(named("stop"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(f: impl FnOnce(&mut SalienceSettings)) -> SalienceSettings {
        let mut s = SalienceSettings::default();
        f(&mut s);
        s
    }

    #[test]
    fn arguments_win_over_the_file_which_wins_over_the_client() {
        let arguments = settings(|s| s.method = Some(Method::GradL2));
        let file = settings(|s| {
            s.method = Some(Method::LeaveOneOut);
            s.granularity = Some(Granularity::Word);
            s.max_new_tokens = Some(7);
        });
        let client = settings(|s| {
            s.granularity = Some(Granularity::Line);
            s.gain = Some(2.0);
            s.max_new_tokens = Some(9);
            s.model = Some("gemma-3-270m".into());
        });
        let layers = Layers {
            arguments: &arguments,
            file: &file,
            client: &client,
        };
        let r = layers.resolve().unwrap();
        assert_eq!(r.analysis.method, Method::GradL2);
        assert_eq!(r.granularity, Granularity::Word);
        assert_eq!(r.gain, 2.0);
        assert_eq!(r.analysis.generation.max_new_tokens, 7);
        assert_eq!(r.model, "gemma-3-270m");
        assert!(r.custom.is_none());
        assert_eq!(r.segmentation().name(), "word");
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let none = SalienceSettings::default();
        let r = Layers {
            arguments: &none,
            file: &none,
            client: &none,
        }
        .resolve()
        .unwrap();
        assert_eq!(r.analysis.method, Method::GradL2);
        assert_eq!(r.granularity, Granularity::Sentence);
        assert_eq!(r.model, DEFAULT_MODEL);
        assert_eq!(r.gain, 1.0);
        assert_eq!(r.analysis.template, None, "the engine picks by the model");
    }

    #[test]
    fn the_first_layer_that_chooses_segments_decides() {
        let none = SalienceSettings::default();
        let separators = settings(|s| s.separators = Some("[;|]".into()));
        let word = settings(|s| s.granularity = Some(Granularity::Word));
        let resolve = |arguments, file, client| {
            Layers {
                arguments,
                file,
                client,
            }
            .resolve()
            .unwrap()
        };
        // Separators in the file, no choice above: custom segments.
        let r = resolve(&none, &separators, &word);
        assert_eq!(r.segmentation().name(), "custom ([;|])");
        // A granularity asked for in the arguments wins over the file's separators.
        let r = resolve(&word, &separators, &none);
        assert_eq!(r.segmentation().name(), "word");
        assert!(r.custom.is_none());
        // Within one layer, separators win over its granularity.
        let both = settings(|s| {
            s.separators = Some(";".into());
            s.granularity = Some(Granularity::Line);
        });
        let r = resolve(&none, &both, &none);
        assert_eq!(r.segmentation().name(), "custom (;)");
        assert_eq!(r.granularity, Granularity::Line);
    }

    #[test]
    fn counts_beyond_their_bounds_are_refused() {
        let none = SalienceSettings::default();
        for (bad, word) in [
            (settings(|s| s.ig_steps = Some(99_999_999_999)), "ig_steps"),
            (settings(|s| s.samples = Some(99_999_999_999)), "samples"),
            (
                settings(|s| s.max_new_tokens = Some(1 << 40)),
                "max_new_tokens",
            ),
            (settings(|s| s.gain = Some(f32::INFINITY)), "gain"),
            (settings(|s| s.top_p = Some(1.5)), "top_p"),
            (
                settings(|s| s.separators = Some("a".repeat(5000))),
                "separators",
            ),
            (settings(|s| s.stop = vec!["x".into(); 100]), "stop"),
        ] {
            let err = Layers {
                arguments: &bad,
                file: &none,
                client: &none,
            }
            .resolve()
            .unwrap_err();
            assert!(err.starts_with(word), "{err}");
        }
    }
}
