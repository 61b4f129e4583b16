//! The real server driven in-process over `tokio::io::duplex` (and once over stdio), on the
//! real default model.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use prompt_salience::lsp::test_client::{decode_semantic_tokens, Client, URI};

// Signed maps are this test's subject; the granularity is the default, sentence.
const DOC: &str = "---\nsalience:\n  max_new_tokens: 8\n  method: grad_dot_input\n---\nYou are a careful assistant. Answer in one word.\n\nWhat colour is the sky on a clear day?\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_negotiates_encoding_and_declares_features() {
    let c = Client::start(json!({}), &["utf-8", "utf-16"]).await;
    let caps = c.capabilities();
    assert_eq!(caps["positionEncoding"], "utf-8");
    assert_eq!(caps["textDocumentSync"], 2, "incremental");
    assert_eq!(
        caps["semanticTokensProvider"]["legend"]["tokenTypes"],
        json!(["salience", "salienceTarget"])
    );
    let mods = caps["semanticTokensProvider"]["legend"]["tokenModifiers"]
        .as_array()
        .unwrap();
    assert_eq!(mods.len(), 10);
    assert_eq!(caps["inlayHintProvider"], true);
    assert_eq!(mods[9], "level8");
    let cmds = caps["executeCommandProvider"]["commands"]
        .as_array()
        .unwrap();
    assert!(
        cmds.contains(&json!("promptSalience.compute"))
            && cmds.contains(&json!("promptSalience.generate"))
    );
    let c = Client::start(json!({}), &["utf-16"]).await;
    assert_eq!(c.capabilities()["positionEncoding"], "utf-16");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_point_at_front_matter_errors_and_follow_incremental_edits() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    c.open("---\nsalience:\n  method: bogus\n---\n😀 東京\r\nAsk.\n")
        .await;
    let d = c
        .wait_for("textDocument/publishDiagnostics", |_| true)
        .await;
    let diags = d["params"]["diagnostics"].as_array().unwrap();
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(diags[0]["range"]["start"]["line"], 2);
    assert!(diags[0]["message"].as_str().unwrap().contains("bogus"));
    // Fix the value with an incremental edit (UTF-16 columns), and break the model name after
    // an emoji line to check positions past surrogate pairs.
    c.notify("textDocument/didChange", json!({
        "textDocument": {"uri": URI, "version": 2},
        "contentChanges": [
            {"range": {"start": {"line": 2, "character": 10}, "end": {"line": 2, "character": 15}}, "text": "grad_l2"},
            {"range": {"start": {"line": 4, "character": 3}, "end": {"line": 4, "character": 5}}, "text": "京都"},
        ]
    })).await;
    let d = c
        .wait_for("textDocument/publishDiagnostics", |n| {
            n["params"]["version"] == 2
        })
        .await;
    assert!(
        d["params"]["diagnostics"].as_array().unwrap().is_empty(),
        "{d}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compute_paints_tokens_and_hover_and_switches_granularity_without_recompute() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    c.open(DOC).await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI}]}),
        )
        .await;
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["result"]["granularity"], "sentence");
    let note = c.wait_for("promptSalience/result", |_| true).await;
    let segs = note["params"]["segments"].as_array().unwrap();
    assert_eq!(segs.len(), 3, "three sentences: {note}");
    assert!(
        c.notifications.iter().any(|n| n["method"] == "$/progress"),
        "progress reported"
    );
    let t = c
        .request(
            "textDocument/semanticTokens/full",
            json!({"textDocument": {"uri": URI}}),
        )
        .await;
    let tokens = decode_semantic_tokens(&t["result"]["data"]);
    assert!(
        tokens.iter().any(|t| t.3 == 0 && t.4 != 0),
        "salience tokens with modifiers: {tokens:?}"
    );
    assert_eq!(
        tokens.iter().filter(|t| t.3 == 1).count(),
        0,
        "the target is a response generated in memory: it has no place in the text"
    );
    // Hover on the first sentence (line 5).
    let h = c
        .request(
            "textDocument/hover",
            json!({"textDocument": {"uri": URI}, "position": {"line": 5, "character": 4}}),
        )
        .await;
    let text = h["result"]["contents"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        text.contains("of 3 sentences") && text.contains("% of the total"),
        "{text}"
    );
    assert!(
        text.contains("grad_dot_input") && text.contains("smollm2"),
        "{text}"
    );
    // Granularity switch: re-rendered from cached scores, fast.
    let started = Instant::now();
    let r = c.request("workspace/executeCommand", json!({"command": "promptSalience.setGranularity", "arguments": [{"uri": URI, "granularity": "word"}]})).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "no model run"
    );
    assert!(r["result"]["segments"].as_u64().unwrap() > 10, "{r}");
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.setGain", "arguments": [{"uri": URI, "gain": 3.0}]}),
        )
        .await;
    assert_eq!(r["result"]["gain"], 3.0);
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.clear", "arguments": [URI]}),
        )
        .await;
    assert_eq!(r["result"]["cleared"], true);
    let t = c
        .request(
            "textDocument/semanticTokens/full",
            json!({"textDocument": {"uri": URI}}),
        )
        .await;
    assert!(t["result"]["data"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_edits_during_a_computation_never_paint_stale_results() {
    let slow = "---\nsalience:\n  method: integrated_gradients\n  ig_steps: 64\n  max_new_tokens: 4\n---\nName a fruit that is red.\n";
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    c.open(slow).await;
    // Load the model first, so cancellation is measured on model work.
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.generate", "arguments": [{"uri": URI}]}),
        )
        .await;
    assert_eq!(r["result"]["applied"], true, "{r}");
    let edit = &c.edits[0]["changes"][URI][0];
    assert!(
        edit["newText"]
            .as_str()
            .unwrap()
            .starts_with("\n<!-- response -->\n"),
        "{edit}"
    );
    // Our editor applies the edit: the document now has a response.
    let new_text = format!("{slow}{}", edit["newText"].as_str().unwrap());
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": URI, "version": 2}, "contentChanges": [{"text": new_text}]}),
    )
    .await;
    // $/cancelRequest stops the computation quickly.
    let id = c
        .send_request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI}]}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cancelled_at = Instant::now();
    c.notify("$/cancelRequest", json!({"id": id})).await;
    let r = c.wait(id).await;
    let waited = cancelled_at.elapsed();
    assert!(r.get("error").is_some(), "{r}");
    assert!(
        waited < Duration::from_millis(200),
        "cancelled after {waited:?}"
    );
    // An edit during a computation: the result is dropped, nothing is painted.
    let id = c
        .send_request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI}]}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.notify("textDocument/didChange", json!({"textDocument": {"uri": URI, "version": 3}, "contentChanges": [{"range": {"start": {"line": 6, "character": 0}, "end": {"line": 6, "character": 0}}, "text": "Please: "}]})).await;
    let r = c.wait(id).await;
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("changed")
            || r["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("cancelled"),
        "{r}"
    );
    let t = c
        .request(
            "textDocument/semanticTokens/full",
            json!({"textDocument": {"uri": URI}}),
        )
        .await;
    assert!(
        t["result"]["data"].as_array().unwrap().is_empty(),
        "no stale paint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_errors_and_the_server_stays_up() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.nope", "arguments": []}),
        )
        .await;
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown command"));
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute"}),
        )
        .await;
    assert!(r.get("error").is_some());
    let r = c.request("workspace/executeCommand", json!({"command": "promptSalience.compute", "arguments": [{"uri": "file:///not/open.prompt.md"}]})).await;
    assert!(r["error"]["message"].as_str().unwrap().contains("not open"));
    let r = c.request("workspace/executeCommand", json!({"command": "promptSalience.setGranularity", "arguments": [{"uri": URI, "granularity": "chapter"}]})).await;
    assert!(r.get("error").is_some());
    let r = c
        .request(
            "textDocument/hover",
            json!({"textDocument": {"uri": URI}, "position": {"line": 0, "character": 0}}),
        )
        .await;
    assert_eq!(r["result"], Value::Null);
    // A prompt longer than the model's context: an error, a diagnostic on the prompt, a log line.
    let long = format!("{}\n", "word ".repeat(9000));
    c.open(&long).await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI}]}),
        )
        .await;
    assert!(
        r["error"]["message"].as_str().unwrap().contains("context"),
        "{r}"
    );
    let d = c
        .wait_for("textDocument/publishDiagnostics", |n| {
            n["params"]["diagnostics"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|x| x["message"].as_str().unwrap_or("").contains("context"))
            })
        })
        .await;
    assert_eq!(d["params"]["diagnostics"][0]["range"]["start"]["line"], 0);
    c.wait_for("window/logMessage", |n| {
        n["params"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("context")
    })
    .await;
    // Still serving.
    c.notify(
        "textDocument/didClose",
        json!({"textDocument": {"uri": URI}}),
    )
    .await;
    c.open(DOC).await;
    let r = c
        .request(
            "textDocument/codeLens",
            json!({"textDocument": {"uri": URI}}),
        )
        .await;
    assert_eq!(r["result"].as_array().unwrap().len(), 2, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contrast_faithfulness_and_before_after_across_an_edit() {
    let doc = "---\nsalience:\n  granularity: sentence\n---\nYou are a careful assistant. Answer in one word. Think about the weather.\n\nWhat colour is the sky on a clear day?\n<!-- response -->\nBlue\n";
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    c.open(doc).await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI, "method": "leave_one_out", "contrast": "Red"}]}),
        )
        .await;
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["result"]["method"], "leave_one_out");
    // The faithfulness check runs in the background and comes back with the map.
    let note = c
        .wait_for("promptSalience/result", |n| {
            n["params"]["faithfulness"].is_string()
        })
        .await;
    let p = &note["params"];
    assert_eq!(p["contrast"], "Red");
    assert_eq!(p["segments"].as_array().unwrap().len(), 4, "{note}");
    let verdict = p["faithfulness"].as_str().unwrap();
    assert!(
        ["faithful: ", "not faithful: ", "inconclusive: "]
            .iter()
            .any(|v| verdict.starts_with(v))
            && verdict.contains("deleting the top"),
        "{verdict}"
    );
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.checkFaithfulness", "arguments": [{"uri": URI}]}),
        )
        .await;
    assert_eq!(r["result"]["cached"], true, "{r}");
    // Four sentences: 10, 20 and 30 % all delete one, so one point, against every deletion.
    let f = &r["result"]["faithfulness"];
    assert_eq!(f["points"].as_array().unwrap().len(), 1, "{f}");
    assert_eq!(f["points"][0]["random"]["exact"], true, "{f}");
    assert!(
        ["faithful", "not faithful", "inconclusive"].contains(&f["verdict"].as_str().unwrap()),
        "{f}"
    );
    // Another level means deleting other segments: a perturbation map is computed anew.
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.setGranularity", "arguments": [{"uri": URI, "granularity": "paragraph"}]}),
        )
        .await;
    assert_eq!(r["result"]["recomputed"], true, "{r}");
    assert_eq!(r["result"]["granularity"], "paragraph", "{r}");
    assert_eq!(r["result"]["method"], "leave_one_out", "{r}");
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.setGranularity", "arguments": [{"uri": URI, "granularity": "sentence"}]}),
        )
        .await;
    assert_eq!(r["result"]["granularity"], "sentence", "{r}");
    // Edit the third sentence and compute again: the others keep their previous scores.
    c.notify("textDocument/didChange", json!({"textDocument": {"uri": URI, "version": 2}, "contentChanges": [{"range": {"start": {"line": 4, "character": 65}, "end": {"line": 4, "character": 72}}, "text": "sea"}]})).await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI, "method": "leave_one_out", "contrast": "Red"}]}),
        )
        .await;
    assert!(r.get("error").is_none(), "{r}");
    let note = c
        .wait_for("promptSalience/result", |n| {
            n["params"]["version"] == 2 && n["params"]["edited"] == false
        })
        .await;
    let segs = note["params"]["segments"].as_array().unwrap();
    let before: Vec<bool> = segs.iter().map(|s| s["before"].is_number()).collect();
    assert_eq!(before, vec![true, true, false, true], "{note}");
    let h = c
        .request(
            "textDocument/hover",
            json!({"textDocument": {"uri": URI}, "position": {"line": 4, "character": 2}}),
        )
        .await;
    let text = h["result"]["contents"]["value"].as_str().unwrap();
    assert!(text.contains("before the last change"), "{text}");
    assert!(text.contains("contrast"), "{text}");
    let h = c
        .request(
            "textDocument/hover",
            json!({"textDocument": {"uri": URI}, "position": {"line": 4, "character": 64}}),
        )
        .await;
    let text = h["result"]["contents"]["value"].as_str().unwrap();
    assert!(text.contains("new since the previous result"), "{text}");
    // Paint the change: only the segments that still exist.
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.showDifference", "arguments": [{"uri": URI, "value": true}]}),
        )
        .await;
    assert_eq!(r["result"]["difference"], true, "{r}");
    assert_eq!(r["result"]["segments"], 3, "{r}");
    let note = c
        .wait_for("promptSalience/result", |n| {
            n["params"]["difference"] == true
        })
        .await;
    for (s, after) in note["params"]["segments"]
        .as_array()
        .unwrap()
        .iter()
        .zip(segs.iter().filter(|s| s["before"].is_number()))
    {
        let change = after["score"].as_f64().unwrap() - after["before"].as_f64().unwrap();
        assert!(
            (s["score"].as_f64().unwrap() - change).abs() < 1e-4,
            "{s} vs {after}"
        );
    }
}
