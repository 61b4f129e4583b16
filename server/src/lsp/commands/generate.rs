//! `promptSalience.generate`: run the model and ask the client to apply a `WorkspaceEdit` that
//! replaces only the response section (undoable like any edit); not applied if the document
//! changed meanwhile.

use std::collections::HashMap;

use serde_json::{json, Value};
use tower_lsp_server::jsonrpc::{Error, Result};
use tower_lsp_server::lsp_types::{TextEdit, WorkspaceEdit};

use super::super::protocol::DocumentArgs;
use super::super::worker::{Output, Task};
use super::super::{convert, Backend};
use super::{content_modified, engine_error, invalid};
use salience_core::options::Layers;
use salience_core::prompt_file::{write, SalienceSettings};
use salience_engine::CancelToken;

impl Backend {
    // lsp-types' Uri caches its parse internally, which clippy reads as a mutable key; its
    // hash and equality depend only on the text.
    #[allow(clippy::mutable_key_type)]
    pub(super) async fn generate(&self, args: DocumentArgs) -> Result<Value> {
        let uri = args.uri;
        let cancel = CancelToken::new();
        let (file, version, model, generation) = {
            let mut st = self.state();
            let client = st.settings.layer();
            let doc = st.document(&uri)?;
            let file = doc.parsed().clone();
            if file.prompt.is_empty() {
                return Err(invalid("the prompt is empty"));
            }
            let layers = Layers {
                arguments: &SalienceSettings::EMPTY,
                file: &file.settings,
                client: &client,
            };
            let generation = layers.generation().map_err(invalid)?;
            (file.clone(), doc.version, layers.model(), generation)
        };
        let task = Task::Generate {
            template: file.settings.template,
            system: file.settings.system.clone(),
            file: file.clone(),
            generation,
        };
        let (text, seed) = match self
            .run_on_worker("Generating response", model, task, &cancel)
            .await
        {
            Ok(Output::Generated(t, seed)) => (t, seed),
            Ok(_) => return Err(Error::internal_error()),
            Err(e) => return Err(engine_error(e)),
        };
        // The edit replaces only the response section of the text it was generated for.
        let edit = {
            let mut st = self.state();
            let enc = st.encoding;
            let doc = st.document(&uri)?;
            if doc.version != version {
                return Err(content_modified(
                    "the document changed while generating: not applying the response",
                ));
            }
            let new_text = write::with_response(&file, &text);
            let keep = file.marker.as_ref().map_or(file.text.len(), |m| m.end);
            debug_assert!(new_text.starts_with(&file.text[..keep]));
            TextEdit {
                range: convert::range(&doc.rope, &(keep..file.text.len()), enc),
                new_text: new_text[keep..].to_string(),
            }
        };
        let changes = HashMap::from([(uri.clone(), vec![edit])]);
        let applied = self
            .client
            .apply_edit(WorkspaceEdit {
                changes: Some(changes),
                ..Default::default()
            })
            .await
            .map(|r| r.applied)
            .unwrap_or(false);
        // A sampled response names its seed, so that the user can repeat it (`seed:` in the
        // front matter).
        Ok(json!({ "applied": applied, "response": text, "seed": seed }))
    }
}
