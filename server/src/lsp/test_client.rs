//! A minimal LSP client that drives the real server in-process over `tokio::io::duplex`: the
//! heavy tests (`tests/lsp.rs`) and the latency benchmark (`benches/lsp_latency.rs`) share it.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{
    AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf,
};

pub struct Client {
    writer: WriteHalf<DuplexStream>,
    reader: BufReader<ReadHalf<DuplexStream>>,
    next_id: i64,
    pub notifications: Vec<Value>,
    /// Answers that arrived while waiting for another request.
    responses: Vec<Value>,
    /// Edits the server asked us to apply (workspace/applyEdit).
    pub edits: Vec<Value>,
    init_result: Option<Value>,
}

pub const URI: &str = "file:///tmp/example.prompt.md";

impl Client {
    /// Starts the server and initializes it. The tests fetch the models they need or fail, so
    /// `allowNetwork` is on unless `init_options` says otherwise.
    pub async fn start(mut init_options: Value, encodings: &[&str]) -> Client {
        if let Some(o) = init_options.as_object_mut() {
            o.entry("allowNetwork").or_insert(Value::Bool(true));
        }
        let (client_side, server_side) = tokio::io::duplex(1 << 20);
        let (server_read, server_write) = tokio::io::split(server_side);
        tokio::spawn(super::serve(server_read, server_write));
        let (read, writer) = tokio::io::split(client_side);
        let mut c = Client {
            writer,
            reader: BufReader::new(read),
            next_id: 1,
            notifications: vec![],
            responses: vec![],
            edits: vec![],
            init_result: None,
        };
        let init = c
            .request(
                "initialize",
                json!({
                    "capabilities": {
                        "general": {"positionEncodings": encodings},
                        "window": {"workDoneProgress": true},
                        "workspace": {"semanticTokens": {"refreshSupport": true}, "applyEdit": true, "configuration": true},
                    },
                    "initializationOptions": init_options,
                }),
            )
            .await;
        c.init_result = Some(init);
        c.notify("initialized", json!({})).await;
        c
    }

    pub async fn send(&mut self, msg: Value) {
        self.send_body(serde_json::to_string(&msg).unwrap().as_bytes())
            .await;
    }

    /// Frames `body` as it is, valid JSON or not.
    pub async fn send_body(&mut self, body: &[u8]) {
        let header = format!("Content-Length: {}\r\n\r\n", body.len());
        self.writer.write_all(header.as_bytes()).await.unwrap();
        self.writer.write_all(body).await.unwrap();
        self.writer.flush().await.unwrap();
    }

    pub async fn read_message(&mut self) -> Value {
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(v) = line.strip_prefix("Content-Length: ") {
                len = v.parse().unwrap();
            }
        }
        let mut buf = vec![0u8; len];
        self.reader.read_exact(&mut buf).await.unwrap();
        serde_json::from_slice(&buf).unwrap()
    }

    pub async fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}))
            .await;
    }

    pub async fn send_request(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        id
    }

    /// Reads until the response to `id`, answering the server's own requests meanwhile.
    pub async fn wait(&mut self, id: i64) -> Value {
        if let Some(at) = self
            .responses
            .iter()
            .position(|r| r.get("id") == Some(&json!(id)))
        {
            return self.responses.remove(at);
        }
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(300), self.read_message())
                .await
                .expect("server answers");
            if msg.get("method").is_none() && msg.get("id").is_some_and(|i| !i.is_null()) {
                if msg.get("id") == Some(&json!(id)) {
                    return msg;
                }
                // The answer to another request: kept for its own wait.
                self.responses.push(msg);
                continue;
            }
            if let (Some(method), Some(sid)) =
                (msg.get("method").and_then(Value::as_str), msg.get("id"))
            {
                let result = match method {
                    "workspace/configuration" => json!([null]),
                    "workspace/applyEdit" => {
                        self.edits.push(msg["params"]["edit"].clone());
                        json!({"applied": true})
                    }
                    _ => Value::Null,
                };
                let reply = json!({"jsonrpc": "2.0", "id": sid, "result": result});
                self.send(reply).await;
                continue;
            }
            self.notifications.push(msg);
        }
    }

    pub async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.send_request(method, params).await;
        self.wait(id).await
    }

    pub async fn open_uri(&mut self, uri: &str, text: &str) {
        self.notify("textDocument/didOpen", json!({"textDocument": {"uri": uri, "languageId": "markdown", "version": 1, "text": text}})).await;
    }

    pub async fn open(&mut self, text: &str) {
        self.notify("textDocument/didOpen", json!({"textDocument": {"uri": URI, "languageId": "markdown", "version": 1, "text": text}})).await;
    }

    /// Reads until a notification `method` matching `pred` arrives (or has arrived).
    pub async fn wait_for(&mut self, method: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            if let Some(n) = self
                .notifications
                .iter()
                .rev()
                .find(|n| n["method"] == method && pred(n))
            {
                return n.clone();
            }
            // A round trip: reading its answer takes in what the server sent before it.
            let id = self
                .send_request(
                    "textDocument/codeLens",
                    json!({"textDocument": {"uri": URI}}),
                )
                .await;
            self.wait(id).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn last_notification(&self, method: &str) -> Option<&Value> {
        self.notifications
            .iter()
            .rev()
            .find(|n| n["method"] == method)
    }
}

// `init_result` is set by start(); kept outside the struct literal for brevity.
impl Client {
    #[allow(dead_code)]
    pub fn capabilities(&self) -> &Value {
        &self.init_result.as_ref().unwrap()["result"]["capabilities"]
    }
}

/// Decodes a semantic-tokens `data` array into absolute (line, start, length, type, modifiers).
pub fn decode_semantic_tokens(data: &Value) -> Vec<(u64, u64, u64, u64, u64)> {
    let numbers: Vec<u64> = data
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let (mut line, mut start) = (0, 0);
    numbers
        .chunks(5)
        .map(|t| {
            line += t[0];
            start = if t[0] == 0 { start + t[1] } else { t[1] };
            (line, start, t[2], t[3], t[4])
        })
        .collect()
}
