//! The byte stream between the client and tower-lsp, checked frame by frame.
//!
//! tower-lsp's reader stops for good at the first message it cannot decode, which ends the
//! server (and its loaded model). Here every incoming frame is read first: a body that is not
//! JSON (or not UTF-8, or has a bad header) is answered with a JSON-RPC parse error (-32700)
//! and dropped, and the next message is served. Well-formed frames pass through unchanged, and
//! the answers are written between the server's own frames, never inside one.

use serde_json::{json, Value};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tower_lsp_server::jsonrpc::{Request, Response};

/// The largest message accepted (a 10 MB document is sent whole in `didOpen`); a larger one is
/// skipped without being held in memory.
pub const MAX_MESSAGE: usize = 256 << 20;
/// The largest header block.
const MAX_HEADER: usize = 8 << 10;

/// What one frame read from the client was.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A JSON body, as received.
    Json(Vec<u8>),
    /// A frame that cannot be served: the error to answer with (and its request id, if any).
    Malformed { id: Value, reason: String },
}

/// Reads the next frame; None at the end of the stream.
pub async fn read_frame<R: AsyncBufRead + Unpin>(input: &mut R) -> std::io::Result<Option<Frame>> {
    let mut length: Option<Result<usize, String>> = None;
    let mut header_bytes = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut *input)
            .take((MAX_HEADER + 1) as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        header_bytes += n;
        if header_bytes > MAX_HEADER {
            return Ok(Some(malformed(Value::Null, "header block too long")));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            if length.is_some() {
                break;
            }
            continue; // blank lines between frames
        }
        if let Some((name, value)) = text.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| format!("bad Content-Length `{}`", value.trim())),
                );
            }
        }
    }
    let length = match length.expect("checked above") {
        Ok(n) => n,
        Err(reason) => return Ok(Some(malformed(Value::Null, &reason))),
    };
    if length > MAX_MESSAGE {
        tokio::io::copy(
            &mut (&mut *input).take(length as u64),
            &mut tokio::io::sink(),
        )
        .await?;
        return Ok(Some(malformed(
            Value::Null,
            &format!("message of {length} bytes, more than the limit of {MAX_MESSAGE}"),
        )));
    }
    let mut body = vec![0u8; length];
    input.read_exact(&mut body).await?;
    Ok(Some(check_body(body)))
}

fn malformed(id: Value, reason: &str) -> Frame {
    Frame::Malformed {
        id,
        reason: reason.to_string(),
    }
}

/// A body is served when tower-lsp can take it apart (a request, a notification or a
/// response); otherwise it is answered here, with its id when it has a usable one.
fn check_body(body: Vec<u8>) -> Frame {
    let value = match serde_json::from_slice::<Value>(&body) {
        Ok(v) => v,
        Err(e) => {
            let what = if std::str::from_utf8(&body).is_err() {
                "the body is not UTF-8".to_string()
            } else {
                format!("not JSON: {e}")
            };
            return malformed(Value::Null, &what);
        }
    };
    let is_message = serde_json::from_value::<Request>(value.clone()).is_ok()
        || serde_json::from_value::<Response>(value.clone()).is_ok();
    if is_message {
        return Frame::Json(body);
    }
    let id = value
        .get("id")
        .filter(|id| id.is_string() || id.is_i64() || id.is_u64())
        .cloned()
        .unwrap_or(Value::Null);
    malformed(id, "not a JSON-RPC 2.0 request, notification or response")
}

/// A document-sync notification whose params the server cannot read: tower-lsp drops such a
/// notification silently, and a lost edit leaves the server's text different from the
/// editor's, so it is logged and the user is told.
fn unreadable_sync_notification(body: &[u8]) -> Option<String> {
    use tower_lsp_server::lsp_types::*;
    fn check<T: serde::de::DeserializeOwned>(params: Option<&Value>) -> Result<(), String> {
        let params = params.cloned().unwrap_or(Value::Null);
        T::deserialize(params)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    let v: Value = serde_json::from_slice(body).ok()?;
    if v.get("id").is_some() {
        return None;
    }
    let method = v.get("method")?.as_str()?;
    let params = v.get("params");
    let result = match method {
        "textDocument/didOpen" => check::<DidOpenTextDocumentParams>(params),
        "textDocument/didChange" => check::<DidChangeTextDocumentParams>(params),
        "textDocument/didClose" => check::<DidCloseTextDocumentParams>(params),
        _ => Ok(()),
    };
    result
        .err()
        .map(|e| format!("{method} with invalid params was ignored ({e}); reopen the document so the server has its text"))
}

/// The answer to a malformed frame.
pub fn parse_error(id: Value, reason: &str) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": { "code": -32700, "message": format!("Parse error: {reason}") },
    })
}

pub async fn write_frame<W: AsyncWrite + Unpin>(out: &mut W, body: &[u8]) -> std::io::Result<()> {
    out.write_all(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes())
        .await?;
    out.write_all(body).await?;
    out.flush().await
}

/// Client → server: well-formed frames go on, malformed ones become answers on `answers`.
pub async fn forward_input<R, W>(input: R, mut server: W, answers: UnboundedSender<Value>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = tokio::io::BufReader::new(input);
    loop {
        match read_frame(&mut input).await {
            Ok(Some(Frame::Json(body))) => {
                if let Some(problem) = unreadable_sync_notification(&body) {
                    tracing::error!("{problem}");
                    let _ = answers.send(json!({
                        "jsonrpc": "2.0",
                        "method": "window/showMessage",
                        "params": { "type": 1, "message": format!("prompt-salience: {problem}") },
                    }));
                }
                if write_frame(&mut server, &body).await.is_err() {
                    return; // the server has stopped
                }
            }
            Ok(Some(Frame::Malformed { id, reason })) => {
                tracing::warn!("malformed message from the client: {reason}");
                let _ = answers.send(parse_error(id, &reason));
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("reading from the client: {e}");
                return;
            }
        }
    }
}

/// Server → client: the server's frames, with the answers to malformed frames between them.
/// Ends when the server's output ends.
pub async fn forward_output<R, W>(server: R, mut answers: UnboundedReceiver<Value>, mut out: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut server = tokio::io::BufReader::new(server);
    let mut answers_open = true;
    loop {
        tokio::select! {
            frame = read_frame(&mut server) => match frame {
                Ok(Some(Frame::Json(body))) => {
                    if write_frame(&mut out, &body).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Frame::Malformed { reason, .. })) => {
                    tracing::error!("the server wrote a malformed frame: {reason}");
                }
                Ok(None) | Err(_) => return,
            },
            answer = answers.recv(), if answers_open => match answer {
                Some(v) => {
                    let body = serde_json::to_vec(&v).expect("json");
                    if write_frame(&mut out, &body).await.is_err() {
                        return;
                    }
                }
                None => answers_open = false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut r = tokio::io::BufReader::new(bytes);
        let mut out = Vec::new();
        while let Some(f) = read_frame(&mut r).await.unwrap() {
            out.push(f);
        }
        out
    }

    fn frame(body: &str) -> String {
        format!("Content-Length: {}\r\n\r\n{body}", body.len())
    }

    #[tokio::test]
    async fn a_malformed_body_is_answered_and_the_next_frame_is_read() {
        let ok = r#"{"jsonrpc":"2.0","id":2,"method":"shutdown"}"#;
        let input = [
            frame("{not json"),
            frame(r#"{"id": 7, "method": "x"}"#),
            frame("[1, 2]"),
            frame(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#),
            "Content-Length: abc\r\n\r\n".into(),
            frame(ok),
        ]
        .concat();
        let got = frames(input.as_bytes()).await;
        assert_eq!(got.len(), 6, "{got:?}");
        assert!(
            matches!(&got[0], Frame::Malformed { reason, .. } if reason.starts_with("not JSON"))
        );
        assert!(matches!(&got[1], Frame::Malformed { id, .. } if *id == json!(7)));
        assert!(matches!(&got[2], Frame::Malformed { .. }));
        assert!(
            matches!(&got[4], Frame::Malformed { reason, .. } if reason.contains("Content-Length"))
        );
        assert_eq!(got[5], Frame::Json(ok.as_bytes().to_vec()));
    }

    #[test]
    fn a_change_with_unreadable_params_is_reported() {
        let bad = br#"{"jsonrpc":"2.0","method":"textDocument/didChange","params":{"textDocument":{"uri":"file:///a"}}}"#;
        let problem = unreadable_sync_notification(bad).unwrap();
        assert!(problem.contains("didChange"), "{problem}");
        let good = br#"{"jsonrpc":"2.0","method":"textDocument/didChange","params":{"textDocument":{"uri":"file:///a","version":2},"contentChanges":[{"text":"x"}]}}"#;
        assert_eq!(unreadable_sync_notification(good), None);
    }

    #[tokio::test]
    async fn invalid_utf8_is_named() {
        let mut input = b"Content-Length: 2\r\n\r\n".to_vec();
        input.extend([0xff, 0xfe]);
        let got = frames(&input).await;
        assert!(matches!(&got[0], Frame::Malformed { reason, .. } if reason.contains("UTF-8")));
    }

    #[tokio::test]
    async fn a_huge_length_is_refused_without_allocating_it() {
        let input = format!("Content-Length: {}\r\n\r\nxyz", MAX_MESSAGE + 1);
        let got = frames(input.as_bytes()).await;
        assert!(matches!(&got[0], Frame::Malformed { reason, .. } if reason.contains("limit")));
    }
}
