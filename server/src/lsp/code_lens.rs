//! Code lenses above the prompt and the response.

use serde_json::json;
use tower_lsp_server::lsp_types::{CodeLens, Command, Range, Uri};

use super::convert;
use super::protocol::{COMPUTE, GENERATE};
use super::State;

pub(super) fn lenses(st: &State, uri: &Uri) -> Option<Vec<CodeLens>> {
    let doc = st.docs.map.get(uri)?;
    let f = doc.parsed();
    let at = |offset: usize| {
        let p = convert::position(&doc.rope, offset, st.encoding);
        Range::new(p, p)
    };
    let lens = |range, title: &str, command: &str| CodeLens {
        range,
        command: Some(Command {
            title: title.into(),
            command: command.into(),
            arguments: Some(vec![json!({ "uri": uri })]),
        }),
        data: None,
    };
    let mut out = vec![
        lens(at(f.prompt.start), "Compute salience", COMPUTE),
        lens(
            at(f.prompt.start),
            if f.has_response() {
                "Regenerate response"
            } else {
                "Generate response"
            },
            GENERATE,
        ),
    ];
    if f.has_response() {
        out.push(lens(at(f.response.start), "Explain this response", COMPUTE));
    }
    Some(out)
}
