//! Custom segments (front matter `separators:`) in the language server, as on the command
//! line: painted by default, left for a granularity, and back with `custom`.

use prompt_salience::lsp::test_client::{Client, URI};
use serde_json::json;

fn set_granularity(g: &str) -> serde_json::Value {
    json!({"command": "promptSalience.setGranularity", "arguments": [{"uri": URI, "granularity": g}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separators_from_the_front_matter_make_the_segments() {
    let doc = "---\nsalience:\n  separators: \"[;|]\"\n---\nApples are red; bananas are yellow | grapes are purple.\n<!-- response -->\nFruit\n";
    let mut c = Client::start(json!({"backgroundFaithfulness": false}), &["utf-16"]).await;
    c.open(doc).await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI}]}),
        )
        .await;
    assert_eq!(r["result"]["granularity"], "custom ([;|])", "{r}");
    assert_eq!(r["result"]["segments"], 3, "{r}");
    let r = c
        .request("workspace/executeCommand", set_granularity("word"))
        .await;
    assert_eq!(r["result"]["granularity"], "word", "{r}");
    assert!(r["result"]["segments"].as_u64().unwrap() > 3, "{r}");
    let r = c
        .request("workspace/executeCommand", set_granularity("custom"))
        .await;
    assert_eq!(r["result"]["granularity"], "custom ([;|])", "{r}");
    assert_eq!(r["result"]["segments"], 3, "{r}");
    // An explicit granularity in the command wins over the file's separators.
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI, "granularity": "sentence"}]}),
        )
        .await;
    assert_eq!(r["result"]["granularity"], "sentence", "{r}");
    // Without separators, `custom` says what is missing.
    c.open_uri("file:///tmp/plain.prompt.md", "Ask.\n").await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.setGranularity", "arguments": [{"uri": "file:///tmp/plain.prompt.md", "granularity": "custom"}]}),
        )
        .await;
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("separators"),
        "{r}"
    );
}
