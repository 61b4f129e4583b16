//! The model's own Jinja chat template (from the GGUF), rendered with minijinja, keeping track
//! of where each message's text lands in the rendered prompt.

use std::ops::Range;

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::EngineError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A rendered prompt: the text to tokenize, and for each message the byte range of its
/// content in that text (None when the template transformed it beyond recognition).
#[derive(Debug, Clone)]
pub struct RenderedPrompt {
    pub text: String,
    pub content_ranges: Vec<Option<Range<usize>>>,
}

/// One rendering of a template: all it needs, so it can be done in another process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateJob {
    pub source: String,
    pub messages: Vec<Message>,
    pub bos_token: String,
    pub eos_token: String,
}

impl TemplateJob {
    /// Renders the template here, within the fuel and output budgets.
    pub fn render(&self) -> Result<String, EngineError> {
        let messages = &self.messages;
        let mut env = Environment::new();
        // Python's jinja2 as transformers configures it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // A template comes with the model file, from anyone: it gets a budget of work and of
        // output, so a hostile one fails instead of running forever or filling memory.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template("chat", &self.source)
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| EngineError::Template(e.to_string()))?;
        let content: usize = messages.iter().map(|m| m.content.len()).sum();
        let mut out = BoundedOutput {
            text: Vec::new(),
            limit: TEMPLATE_OUTPUT_BASE + 2 * content,
        };
        let rendered = tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.text)
                .map_err(|_| EngineError::Template("the output is not UTF-8".into())),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(EngineError::Template(format!(
                "the template does too much work (more than {TEMPLATE_FUEL} steps): refused"
            ))),
            Err(e) if out.text.len() > out.limit => Err(EngineError::Template(format!(
                "the template writes more than {} bytes: refused ({e})",
                out.limit
            ))),
            Err(e) => Err(EngineError::Template(e.to_string())),
        }
    }
}

/// Renders a template job in isolation. Fuel bounds a template's work and the output bound
/// its writing, but a template can still build a huge string in memory (doubling it a few
/// dozen times); a front end that can run one in a child process with a memory limit installs
/// this, and then every template renders there.
pub type Isolation = fn(&TemplateJob) -> Result<String, EngineError>;

static ISOLATION: OnceLock<Isolation> = OnceLock::new();

/// Installs the isolated renderer (once, at start-up).
pub fn isolate_with(render: Isolation) {
    let _ = ISOLATION.set(render);
}

pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

// Private-use code points bracket each message while rendering, so the content's place in the
// output is known exactly rather than searched for.
const OPEN: char = '\u{F8F0}';
const CLOSE: char = '\u{F8F1}';

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Self {
        Self {
            source,
            bos_token,
            eos_token,
        }
    }

    fn render_raw(&self, messages: &[Message]) -> Result<String, EngineError> {
        let job = TemplateJob {
            source: self.source.clone(),
            messages: messages.to_vec(),
            bos_token: self.bos_token.clone(),
            eos_token: self.eos_token.clone(),
        };
        match ISOLATION.get() {
            Some(isolated) => isolated(&job),
            None => job.render(),
        }
    }

    pub fn render(&self, messages: &[Message]) -> Result<RenderedPrompt, EngineError> {
        let plain = self.render_raw(messages)?;
        let marked_messages: Vec<Message> = messages
            .iter()
            .map(|m| Message {
                role: m.role.clone(),
                content: format!("{OPEN}{}{CLOSE}", m.content),
            })
            .collect();
        if let Ok(marked) = self.render_raw(&marked_messages) {
            if let Some(rendered) = strip_markers(&marked, messages.len()) {
                if rendered.text == plain {
                    return Ok(rendered);
                }
            }
        }
        // The template altered the content (e.g. trimmed it): find each message's text instead.
        let mut content_ranges = Vec::with_capacity(messages.len());
        let mut from = 0;
        for m in messages {
            match plain[from..].find(&m.content) {
                Some(pos) if !m.content.is_empty() => {
                    let start = from + pos;
                    content_ranges.push(Some(start..start + m.content.len()));
                    from = start + m.content.len();
                }
                _ => content_ranges.push(None),
            }
        }
        Ok(RenderedPrompt {
            text: plain,
            content_ranges,
        })
    }
}

/// minijinja's unit of work: a real chat template with a few messages uses a few thousand.
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// What a template may write beyond twice its messages' text.
const TEMPLATE_OUTPUT_BASE: usize = 1 << 20;

/// Collects the rendered text, failing the render once it passes `limit`.
struct BoundedOutput {
    text: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.text
                .extend_from_slice(&buf[..self.limit + 1 - self.text.len().min(self.limit)]);
            return Err(std::io::Error::other("template output limit"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn strip_markers(marked: &str, n_messages: usize) -> Option<RenderedPrompt> {
    let mut text = String::with_capacity(marked.len());
    let mut content_ranges = Vec::with_capacity(n_messages);
    let mut open_at = None;
    for c in marked.chars() {
        match c {
            OPEN => {
                if open_at.is_some() {
                    return None;
                }
                open_at = Some(text.len());
            }
            CLOSE => content_ranges.push(Some(open_at.take()?..text.len())),
            _ => text.push(c),
        }
    }
    (content_ranges.len() == n_messages && open_at.is_none()).then_some(RenderedPrompt {
        text,
        content_ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_inserts_default_system_prompt_and_maps_content() {
        let t = ChatTemplate::new(SMOLLM2.into(), String::new(), String::new());
        let r = t.render(&[Message::new("user", "Hi there")]).unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let range = r.content_ranges[0].clone().unwrap();
        assert_eq!(&r.text[range], "Hi there");
    }

    #[test]
    fn trimming_templates_fall_back_to_search() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}"
                .into(),
            String::new(),
            String::new(),
        );
        let r = t
            .render(&[
                Message::new("system", "Be brief."),
                Message::new("user", "Why?"),
            ])
            .unwrap();
        assert_eq!(r.text, "<system>Be brief.</system><user>Why?</user>");
        assert_eq!(&r.text[r.content_ranges[1].clone().unwrap()], "Why?");
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}"
                .into(),
            String::new(),
            String::new(),
        );
        let started = std::time::Instant::now();
        let err = t.render(&[Message::new("user", "x")]).unwrap_err();
        assert!(err.to_string().contains("too much work"), "{err}");
        assert!(started.elapsed().as_secs_f32() < 10.0);
    }

    #[test]
    fn a_template_that_writes_without_end_is_cut_off() {
        // Little work per byte: the output bound stops it, not the fuel.
        let t = ChatTemplate::new(
            "{% for a in range(1000) %}{{ messages[0].content * 100000 }}{% endfor %}".into(),
            String::new(),
            String::new(),
        );
        let err = t.render(&[Message::new("user", "xy")]).unwrap_err();
        assert!(err.to_string().contains("writes more than"), "{err}");
    }

    #[test]
    fn raise_exception_is_an_error_not_a_panic() {
        let t = ChatTemplate::new(
            "{{ raise_exception('no system role') }}".into(),
            String::new(),
            String::new(),
        );
        let err = t.render(&[Message::new("user", "x")]).unwrap_err();
        assert!(err.to_string().contains("no system role"), "{err}");
    }
}
