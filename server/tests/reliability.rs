//! The server stays up and in step with the editor whatever a client sends (issue 13): the
//! real server in-process over `tokio::io::duplex`, and once over real stdio.

use std::time::{Duration, Instant};

use prompt_salience::lsp::test_client::{decode_semantic_tokens, Client, URI};
use serde_json::{json, Value};

fn compute(uri: &str) -> Value {
    json!({"command": "promptSalience.compute", "arguments": [{"uri": uri}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_parse_errors_and_the_next_one_is_served() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    c.send_body(b"{this is not json").await;
    c.send_body(&[0xff, 0xfe, 0x7b]).await;
    c.send_body(br#"{"jsonrpc":"2.0","id":{},"method":"textDocument/hover"}"#)
        .await;
    let mut parse_errors = 0;
    while parse_errors < 3 {
        let m = tokio::time::timeout(Duration::from_secs(5), c.read_message())
            .await
            .expect("an answer to each malformed message");
        if m["error"]["code"] == -32700 {
            parse_errors += 1;
        }
    }
    // Still serving, with its state.
    c.open("Ask me.\n").await;
    let r = c
        .request(
            "textDocument/codeLens",
            json!({"textDocument": {"uri": URI}}),
        )
        .await;
    assert!(r["result"].as_array().is_some_and(|l| !l.is_empty()), "{r}");
}

/// The real binary serving LSP on its stdin and stdout.
fn stdio_server() -> std::process::Child {
    use std::process::{Command, Stdio};
    Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
        .arg("lsp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_server_on_stdio_exits_once_its_client_process_is_gone_though_its_input_stays_open() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    // The "editor" is a shell that starts the server on the test's pipes and prints its id;
    // killing the shell leaves the server's input open (the test holds it).
    let mut editor = Command::new("sh")
        .arg("-c")
        .arg(format!(
            // An asynchronous command's input is /dev/null unless redirected from a copy.
            "exec 3<&0; '{}' lsp <&3 3<&- & echo $!; wait",
            env!("CARGO_BIN_EXE_prompt-salience")
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = editor.stdin.take().unwrap();
    let mut stdout = BufReader::new(editor.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let server: u32 = line.trim().parse().expect("the server's process id");
    let running = || std::path::Path::new(&format!("/proc/{server}")).exists();
    for msg in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"processId": editor.id(), "capabilities": {}}}),
        json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}),
    ] {
        let body = msg.to_string();
        write!(stdin, "Content-Length: {}\r\n\r\n{}", body.len(), body).unwrap();
    }
    stdin.flush().unwrap();
    // While the editor runs, so does the server.
    std::thread::sleep(Duration::from_secs(3));
    assert!(running(), "the server stopped early");
    editor.kill().unwrap();
    editor.wait().unwrap();
    let start = Instant::now();
    while running() {
        if start.elapsed() > Duration::from_secs(15) {
            // SAFETY: a plain kill of the process this test started.
            unsafe { libc::kill(server as i32, libc::SIGKILL) };
            panic!("the server kept running after its client exited");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((stdin, stdout));
}

#[test]
fn a_server_on_stdio_exits_soon_after_its_input_closes_though_a_request_waits_on_the_client() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    // No model in reach: the computation needs none to wait on the client, which never
    // answers the server's request to show progress.
    let cache = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_prompt-salience"))
        .arg("lsp")
        .env("PROMPT_SALIENCE_CACHE", cache.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = server.stdin.take().unwrap();
    let uri = "file:///tmp/waiting.prompt.md";
    for msg in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "processId": null, "capabilities": {"window": {"workDoneProgress": true}}}}),
        json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}),
        json!({"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": {
            "uri": uri, "languageId": "markdown", "version": 1, "text": "Ask me.\n"}}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "workspace/executeCommand",
               "params": compute(uri)}),
    ] {
        let body = msg.to_string();
        write!(stdin, "Content-Length: {}\r\n\r\n{}", body.len(), body).unwrap();
    }
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The editor goes away: its end of the pipe closes, nothing more is read.
    drop(stdin);
    let start = Instant::now();
    let limit = prompt_salience::lsp::GRACE_AFTER_INPUT_ENDS + Duration::from_secs(10);
    loop {
        if let Some(status) = server.try_wait().unwrap() {
            assert!(status.code().is_some(), "{status:?}");
            break;
        }
        if start.elapsed() > limit {
            server.kill().unwrap();
            panic!("the server kept running after its input closed");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn stdio_server_speaks_only_protocol_on_stdout() {
    use std::io::{Read, Write};
    let mut child = stdio_server();
    let mut stdin = child.stdin.take().unwrap();
    for msg in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}),
        json!({"jsonrpc": "2.0", "method": "initialized", "params": {}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}),
        json!({"jsonrpc": "2.0", "method": "exit"}),
    ] {
        let body = msg.to_string();
        write!(stdin, "Content-Length: {}\r\n\r\n{}", body.len(), body).unwrap();
    }
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    // Every byte is a framed message.
    let mut rest = out.as_str();
    let mut n = 0;
    while !rest.is_empty() {
        let header_end = rest.find("\r\n\r\n").expect("header");
        let len: usize = rest[..header_end]
            .trim_start_matches("Content-Length: ")
            .parse()
            .unwrap();
        let body: Value =
            serde_json::from_str(&rest[header_end + 4..header_end + 4 + len]).unwrap();
        assert_eq!(body["jsonrpc"], "2.0");
        rest = &rest[header_end + 4 + len..];
        n += 1;
    }
    assert!(n >= 2, "{out}");
}

#[test]
fn over_stdio_a_malformed_body_is_answered_and_the_server_goes_on() {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut child = stdio_server();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut send = |body: &str| {
        write!(stdin, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        stdin.flush().unwrap();
    };
    let mut read = || -> Value {
        let mut len = 0;
        loop {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            match line.trim_end().strip_prefix("Content-Length: ") {
                Some(n) => len = n.parse().unwrap(),
                None if line.trim_end().is_empty() && len > 0 => break,
                None => {}
            }
        }
        let mut body = vec![0; len];
        stdout.read_exact(&mut body).unwrap();
        serde_json::from_slice(&body).unwrap()
    };
    send(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}})
            .to_string(),
    );
    assert!(read()["result"]["capabilities"].is_object());
    send("{\"jsonrpc\": \"2.0\", \"id\": 9, \"method\": ");
    let answer = read();
    assert_eq!(answer["error"]["code"], -32700, "{answer}");
    send(&json!({"jsonrpc": "2.0", "id": 2, "method": "shutdown"}).to_string());
    let answer = read();
    assert_eq!(answer["id"], 2, "{answer}");
    assert!(answer.get("error").is_none(), "{answer}");
    send(&json!({"jsonrpc": "2.0", "method": "exit"}).to_string());
    // The server exits on `exit` even though the client keeps its end open.
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still running after exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    drop(stdin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_with_invalid_params_is_reported_not_silently_dropped() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    c.open("Ask me.\n").await;
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": URI}, "contentChanges": "nope"}),
    )
    .await;
    let m = c
        .wait_for("window/showMessage", |n| {
            n["params"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("didChange")
        })
        .await;
    assert_eq!(m["params"]["type"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_beyond_their_bounds_are_refused_with_a_clear_message() {
    // Front matter: a diagnostic, and the setting is not used.
    let mut c = Client::start(json!({"igSteps": 99_999_999_999u64}), &["utf-16"]).await;
    c.open("---\nsalience:\n  samples: 99999999999\n  method: ablation_surrogate\n---\nAsk.\n")
        .await;
    let d = c
        .wait_for("textDocument/publishDiagnostics", |n| {
            n["params"]["diagnostics"]
                .as_array()
                .is_some_and(|d| !d.is_empty())
        })
        .await;
    let message = d["params"]["diagnostics"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("samples") && message.contains("limit"),
        "{message}"
    );
    // Client settings: the request is refused before any model work.
    let started = Instant::now();
    let r = c.request("workspace/executeCommand", compute(URI)).await;
    let error = r["error"]["message"].as_str().unwrap_or("");
    assert!(error.contains("ig_steps") && error.contains("limit"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_outside_the_document_is_refused() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    c.open("Ask me.\n<!-- response -->\nNo.\n").await;
    let r = c
        .request(
            "workspace/executeCommand",
            json!({"command": "promptSalience.compute", "arguments": [{"uri": URI,
                "range": {"start": {"line": 40, "character": 0}, "end": {"line": 41, "character": 0}}}]}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("outside"));
}

/// A lone CR ends a line in LSP: no token may run past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semantic_tokens_stay_within_lsp_lines() {
    let text = "---\nsalience:\n  granularity: paragraph\n---\nAlpha beta gamma\rdelta epsilon zeta\u{2028}eta theta\n\nIs the sky blue?\n<!-- response -->\nYes.\n";
    let mut c = Client::start(json!({"backgroundFaithfulness": false}), &["utf-16"]).await;
    c.open(text).await;
    let r = c.request("workspace/executeCommand", compute(URI)).await;
    assert!(r.get("result").is_some(), "{r}");
    let t = c
        .request(
            "textDocument/semanticTokens/full",
            json!({"textDocument": {"uri": URI}}),
        )
        .await;
    // LSP lines: split at \n, \r\n and \r only (U+2028 is inside a line).
    let lines: Vec<&str> = text.split(['\n', '\r']).collect();
    let toks = decode_semantic_tokens(&t["result"]["data"]);
    assert!(!toks.is_empty());
    for (line, start, len, _, _) in toks {
        let units = lines[line as usize].encode_utf16().count() as u64;
        assert!(start + len <= units, "line {line}: {start}+{len} > {units}");
    }
    // The line after the lone CR holds the U+2028 and is one line for the server too.
    let hover = c
        .request(
            "textDocument/hover",
            json!({"textDocument": {"uri": URI}, "position": {"line": 5, "character": 22}}),
        )
        .await;
    assert!(hover["result"]["contents"]["value"].is_string(), "{hover}");
}

/// Long computations on several documents never hold up cancels, edits or quick requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_requests_answer_within_100_ms_while_computations_queue() {
    let mut c = Client::start(json!({"backgroundFaithfulness": false}), &["utf-16"]).await;
    let doc = "---\nsalience:\n  method: integrated_gradients\n  ig_steps: 64\n---\nYou are a careful assistant. Answer in one word.\n\nWhat colour is the sky on a clear day?\n<!-- response -->\nBlue\n";
    let uris: Vec<String> = (0..5)
        .map(|i| format!("file:///tmp/stress{i}.prompt.md"))
        .collect();
    for u in &uris {
        c.open_uri(u, doc).await;
    }
    c.open("Ask me.\n").await;
    let mut computes = Vec::new();
    for u in &uris {
        computes.push(c.send_request("workspace/executeCommand", compute(u)).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        let started = Instant::now();
        let id = c
            .send_request(
                "textDocument/hover",
                json!({"textDocument": {"uri": URI}, "position": {"line": 0, "character": 1}}),
            )
            .await;
        c.wait(id).await;
        let started_lens = Instant::now();
        let id = c
            .send_request(
                "textDocument/codeLens",
                json!({"textDocument": {"uri": URI}}),
            )
            .await;
        c.wait(id).await;
        slowest = slowest
            .max(started_lens.elapsed())
            .max(started_lens - started);
        // An edit to another document, then a quick request that must see it.
        c.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": round + 2},
                   "contentChanges": [{"text": format!("Ask me {round}.\n")}]}),
        )
        .await;
        if round == 5 {
            // Cancel the computation that is running (the first) and one still queued.
            for id in [computes[0], computes[3]] {
                c.notify("$/cancelRequest", json!({ "id": id })).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a quick request waited {slowest:?}"
    );
    // The cancelled ones answer promptly with RequestCancelled.
    for id in [computes[0], computes[3]] {
        let started = Instant::now();
        let r = c.wait(id).await;
        assert_eq!(r["error"]["code"], -32800, "{r}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // The others are still queued or running: end them by closing their documents.
    for (i, u) in uris.iter().enumerate() {
        if i != 0 && i != 3 {
            c.notify("textDocument/didClose", json!({"textDocument": {"uri": u}}))
                .await;
        }
    }
    for (i, id) in computes.iter().enumerate() {
        if i != 0 && i != 3 {
            let r = c.wait(*id).await;
            assert!(r.get("error").is_some(), "{r}");
        }
    }
}

/// Typing in a 10 MB document does not re-parse it on every keystroke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_typing_in_a_huge_document_keeps_hover_quick() {
    let mut c = Client::start(json!({}), &["utf-16"]).await;
    let big = "A line of the prompt, with a few words in it.\n".repeat(10_000_000 / 46);
    c.open(&big).await;
    for i in 0..200 {
        c.notify(
            "textDocument/didChange",
            json!({"textDocument": {"uri": URI, "version": i + 2},
                   "contentChanges": [{"range": {"start": {"line": 3, "character": 0}, "end": {"line": 3, "character": 0}}, "text": "x"}]}),
        )
        .await;
    }
    let started = Instant::now();
    c.request(
        "textDocument/hover",
        json!({"textDocument": {"uri": URI}, "position": {"line": 3, "character": 1}}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "hover after 200 keystrokes took {:?}",
        started.elapsed()
    );
}

/// A chat template from a model file runs in a child process with a memory limit: one that
/// doubles a string until memory runs out fails with an error, and this process lives on.
#[test]
fn a_template_that_doubles_a_string_is_refused_and_the_caller_lives_on() {
    use prompt_salience::template_sandbox::render_with;
    use salience_engine::chat_template::{Message, TemplateJob};
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_prompt-salience"));
    let job = |source: &str| TemplateJob {
        source: source.into(),
        messages: vec![Message::new("user", "Hi")],
        bos_token: String::new(),
        eos_token: String::new(),
    };
    let doubling = format!(
        "{{% set s = 'ab' %}}{}{{{{ s | length }}}}",
        "{% set s = s ~ s %}".repeat(40)
    );
    let started = Instant::now();
    let err = render_with(exe, &job(&doubling)).unwrap_err().to_string();
    assert!(err.contains("memory"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let err = render_with(
        exe,
        &job("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("too much work"), "{err}");
    let ok = render_with(
        exe,
        &job("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"),
    )
    .unwrap();
    assert_eq!(ok, "<user>Hi");
}
