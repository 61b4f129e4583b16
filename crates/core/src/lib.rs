//! The document layer of prompt-salience, between the engine and the front ends (CLI, LSP):
//! prompt files, their segments, an analysis of one target, its faithfulness check, comparisons
//! of two maps, and [`options`], the one place that resolves settings for every front end.
//!
//! Like the engine it knows nothing about LSP: byte offsets into the file's text, plain types.

#![deny(clippy::print_stdout)]

pub mod analysis;
pub mod compare;
pub mod faithfulness;
pub mod options;
pub mod prompt_file;
pub mod segments;
