//! Diagnostics: front-matter problems and settings the server cannot use.

use tower_lsp_server::lsp_types::{Diagnostic, DiagnosticSeverity};

use super::convert::{self, Encoding};
use super::documents::Document;
use salience_engine::registry::ModelSpec;

pub fn of(doc: &Document, enc: Encoding) -> Vec<Diagnostic> {
    let f = doc.parsed();
    let mut out: Vec<Diagnostic> = f
        .problems
        .iter()
        .map(|p| Diagnostic {
            range: convert::range(&doc.rope, &p.range, enc),
            severity: Some(
                if p.message.contains("YAML") || p.message.starts_with("salience.") {
                    DiagnosticSeverity::ERROR
                } else {
                    DiagnosticSeverity::WARNING
                },
            ),
            source: Some("prompt-salience".into()),
            message: p.message.clone(),
            ..Default::default()
        })
        .collect();
    if let (Some(model), Some(fm)) = (&f.settings.model, &f.front_matter) {
        if let Err(e) = ModelSpec::parse(model) {
            let yaml = &f.text[fm.clone()];
            let at = yaml.find("model:").map_or(fm.start, |p| fm.start + p);
            let end = f.text[at..].find('\n').map_or(f.text.len(), |p| at + p);
            out.push(Diagnostic {
                range: convert::range(&doc.rope, &(at..end), enc),
                severity: Some(DiagnosticSeverity::ERROR),
                source: Some("prompt-salience".into()),
                message: e.to_string(),
                ..Default::default()
            });
        }
    }
    out
}
