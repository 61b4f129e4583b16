//! prompt-salience: which parts of a prompt drove a language model's answer.
//!
//! - [`engine`]: models, tokenization, generation and salience — plain types, byte offsets.
//! - [`cli`]: the command line.
#![deny(clippy::print_stdout)]

pub mod analysis;
pub mod cli;
pub mod compare;
pub mod engine;
pub mod faithfulness;
pub mod lsp;
pub mod prompt_file;
pub mod report;
pub mod segments;
