//! prompt-salience: which parts of a prompt drove a language model's answer.
//!
//! The engine (`salience-engine`: models, gradients, perturbation, generation) and the document
//! layer (`salience-core`: prompt files, segments, analysis, settings) are crates of their own;
//! this crate holds the front ends that people use:
//! - [`cli`]: the command line;
//! - [`lsp`]: the language server, the only place that knows lsp-types and JSON-RPC;
//! - [`report`]: terminal, JSON and HTML reports;
//! - [`template_sandbox`]: chat templates rendered in a child process with a memory limit;
//! - [`memory_pages`]: the process's page size (small pages, measured faster here).
#![deny(clippy::print_stdout)]

pub mod allocator;
pub mod cli;
pub mod lsp;
pub mod memory_pages;
pub mod report;
pub mod template_sandbox;
