//! A painted map follows edits (issue 16): segments outside an edit keep their colour and move
//! with the text; the ones an edit touched are stale (unpainted, and hover says so); a new
//! compute replaces them.

use prompt_salience::lsp::test_client::{decode_semantic_tokens, Client, URI};
use serde_json::{json, Value};

fn segment(result: &Value, line: u64, character: u64) -> &Value {
    result["params"]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["range"]["start"]["line"] == line && s["range"]["start"]["character"] == character
        })
        .unwrap_or_else(|| panic!("no segment at {line}:{character} in {result}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_move_with_edits_and_touched_ones_go_stale() {
    let doc = "You are careful. Answer in one word. Think about it.\n\nWhat colour is the sky?\n<!-- response -->\nBlue\n";
    let mut c = Client::start(json!({"backgroundFaithfulness": false}), &["utf-16"]).await;
    c.open(doc).await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI, "granularity": "sentence"}]}),
        )
        .await;
    assert!(r.get("result").is_some(), "{r}");
    let before = c
        .wait_for("promptSalience/result", |n| n["params"]["version"] == 1)
        .await;
    let third = segment(&before, 0, 37).clone();
    assert!(third["level"].as_u64().unwrap() > 0 || third["score"] == 0.0);
    // Insert "really " inside the second sentence ("Answer in one word.": columns 17..36).
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": URI, "version": 2}, "contentChanges": [
            {"range": {"start": {"line": 0, "character": 27}, "end": {"line": 0, "character": 27}}, "text": "really "}]}),
    )
    .await;
    let after = c
        .wait_for("promptSalience/result", |n| n["params"]["version"] == 2)
        .await;
    assert_eq!(after["params"]["edited"], true, "{after}");
    // Untouched and before the edit: the same place and colour.
    let first_before = segment(&before, 0, 0);
    let first_after = segment(&after, 0, 0);
    assert_eq!(first_after["range"], first_before["range"]);
    assert_eq!(first_after["level"], first_before["level"]);
    assert_eq!(first_after["stale"], false);
    // Touched: stale, unpainted, and it now covers the inserted text.
    let second = segment(&after, 0, 17);
    assert_eq!(second["stale"], true, "{after}");
    assert_eq!(second["level"], 0);
    assert_eq!(second["range"]["end"]["character"], 36 + 7);
    // After the edit: moved by the 7 inserted characters, colour kept.
    let moved = segment(&after, 0, 37 + 7);
    assert_eq!(moved["score"], third["score"]);
    assert_eq!(moved["level"], third["level"]);
    assert_eq!(moved["stale"], false);
    // The target moved down with nothing on its line changed.
    assert_eq!(after["params"]["target"]["start"]["line"], 4);
    // Hover on the stale sentence says it was edited.
    let h = c
        .request(
            "textDocument/hover",
            json!({"textDocument": {"uri": URI}, "position": {"line": 0, "character": 20}}),
        )
        .await;
    let text = h["result"]["contents"]["value"].as_str().unwrap();
    assert!(text.contains("Edited since computed"), "{text}");
    // Semantic tokens: nothing on the stale sentence; the moved one at its new column.
    let t = c
        .request(
            "textDocument/semanticTokens/full",
            json!({"textDocument": {"uri": URI}}),
        )
        .await;
    let starts: Vec<(u64, u64)> = decode_semantic_tokens(&t["result"]["data"])
        .into_iter()
        .map(|t| (t.0, t.1))
        .collect();
    assert!(!starts.contains(&(0, 17)), "{starts:?}");
    if moved["level"].as_u64().unwrap() > 0 {
        assert!(starts.contains(&(0, 44)), "{starts:?}");
    }
    // A new compute replaces the map: nothing stale.
    c.request(
        "workspace/executeCommand",
        json!({"command": "promptSalience.compute", "arguments": [{"uri": URI, "granularity": "sentence"}]}),
    )
    .await;
    let fresh = c
        .wait_for("promptSalience/result", |n| {
            n["params"]["version"] == 2 && n["params"]["edited"] == false
        })
        .await;
    assert!(fresh["params"]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["stale"] == false));
}
