//! Latency of hover and semantic tokens on a 5,000-line document, idle and while a long
//! computation runs on another document. `cargo bench --bench lsp_latency`.

use std::time::{Duration, Instant};

use prompt_salience::lsp::test_client::Client;
use serde_json::json;

const BIG: &str = "file:///tmp/big.prompt.md";
const BUSY: &str = "file:///tmp/busy.prompt.md";

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn measure(c: &mut Client, rounds: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut hover, mut tokens) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let t = Instant::now();
        let h = c
            .request("textDocument/hover", json!({"textDocument": {"uri": BIG}, "position": {"line": 9 + (i % 30) as u32, "character": 12}}))
            .await;
        hover.push(t.elapsed());
        assert!(h["result"]["contents"]["value"].as_str().is_some(), "{h}");
        let t = Instant::now();
        let s = c
            .request(
                "textDocument/semanticTokens/full",
                json!({"textDocument": {"uri": BIG}}),
            )
            .await;
        tokens.push(t.elapsed());
        assert!(!s["result"]["data"].as_array().unwrap().is_empty());
    }
    (hover, tokens)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    // A short prompt and a 5,000-line response; the target is response line 40, so the 40
    // lines before it are scored too (about 800 tokens, about 600 words painted).
    let mut big = String::from("---\nsalience:\n  granularity: word\n---\nSummarise the log below in one line. Mention errors first.\nBe brief.\n\n<!-- response -->\n");
    for i in 0..5000 {
        big.push_str(&format!(
            "line {i}: everything nominal, 東京 node {i} 😀 ok\n"
        ));
    }
    c.open_uri(BIG, &big).await;
    let r = c
        .request("workspace/executeCommand", json!({"command": "promptSalience.compute", "arguments": [{"uri": BIG, "range": {"start": {"line": 48, "character": 0}, "end": {"line": 48, "character": 10}}}]}))
        .await;
    assert!(r.get("error").is_none(), "{r}");
    let rounds = 200;
    let (mut h_idle, mut t_idle) = measure(&mut c, rounds).await;
    // A long computation on another document.
    c.open_uri(BUSY, "---\nsalience:\n  method: integrated_gradients\n  ig_steps: 256\n---\nName three red fruits.\n\n<!-- response -->\nApple, cherry, strawberry.\n").await;
    let busy = c
        .send_request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": BUSY}]}),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut h_busy, mut t_busy) = measure(&mut c, rounds).await;
    c.notify("$/cancelRequest", json!({"id": busy})).await;
    println!("LSP latency on a 5,000-line document ({rounds} requests each):");
    println!("| request | idle p50 | idle p99 | during compute p50 | during compute p99 |");
    println!("|---|---|---|---|---|");
    for (name, idle, busy) in [
        ("hover", &mut h_idle, &mut h_busy),
        ("semanticTokens/full", &mut t_idle, &mut t_busy),
    ] {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            percentile(idle, 0.5).as_secs_f64() * 1e3,
            percentile(idle, 0.99).as_secs_f64() * 1e3,
            percentile(busy, 0.5).as_secs_f64() * 1e3,
            percentile(busy, 0.99).as_secs_f64() * 1e3,
        );
    }
}
