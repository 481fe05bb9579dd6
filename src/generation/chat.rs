//! Chat: conversations rendered to a prompt by the model's own chat template (the Jinja text of
//! `tokenizer_config.json`'s `chat_template`, as Hugging Face's tokenizers render it), and the
//! reasoning a model writes between `<think>` and `</think>` told apart from its answer, also in
//! a stream cut anywhere.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Steps a template may take before it is stopped (minijinja's fuel): a real template renders a
/// conversation in thousands; a hostile one (`range` of a billion) is an error, not a hang.
const FUEL: u64 = 2_000_000;
/// Nesting of macros, includes and recursion a template may reach.
const RECURSION: usize = 64;
/// Largest rendered prompt: far beyond any context yoco runs, far below harm.
const MAX_OUTPUT: usize = 64 << 20;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may know others).
    pub role: String,
    /// The message's text.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A chat template: Jinja source and the special tokens it may refer to.
///
/// ```
/// use yoco::{ChatMessage, ChatTemplate};
///
/// # fn main() -> yoco::Result<()> {
/// let template = ChatTemplate::phi4();
/// let prompt = template.render(
///     &[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "2+2?")],
///     true,
/// )?;
/// assert_eq!(prompt, "<|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>");
/// // A template that fails is an error, never a panic.
/// let bad = ChatTemplate::new("{{ raise_exception('no system role') }}", None, None)?;
/// assert!(bad.render(&[], true).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// The Phi-4-mini family's chat format, used when a directory has no template of its own.
const PHI4_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>' + \
     message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ \
     '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}";

impl ChatTemplate {
    /// A template from its Jinja `source`, with the texts of the BOS and EOS tokens it may use
    /// (`bos_token`, `eos_token`). The source is parsed now: a syntax error is an error here.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let template = ChatTemplate {
            source: source.into(),
            bos_token,
            eos_token,
        };
        let env = template.environment();
        env.template_from_str(&template.source)
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        Ok(template)
    }

    /// The built-in Phi-4 format (`<|system|>…<|end|><|user|>…<|end|><|assistant|>`), for a
    /// Phi-4-mini-flash directory without a `chat_template`.
    pub fn phi4() -> Self {
        ChatTemplate {
            source: PHI4_TEMPLATE.to_string(),
            bos_token: Some("<|endoftext|>".into()),
            eos_token: Some("<|endoftext|>".into()),
        }
    }

    /// The template of a `tokenizer_config.json` (its `chat_template`, a string or the list of
    /// named templates some files carry, of which `default` is taken), with its `bos_token` and
    /// `eos_token` (strings or `{"content": ...}` objects). `Ok(None)` when the file has none.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.len() > 16 << 20 {
            return Err(Error::Json {
                path: path.into(),
                message: format!("{} bytes is too large for a tokenizer config", meta.len()),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.into(),
            message: e.to_string(),
        })?;
        let token = |key: &str| match json.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let source = match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(named)) => {
                let pick = named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                match pick
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(s) => s.to_string(),
                    None => {
                        return Err(Error::Json {
                            path: path.into(),
                            message: "chat_template lists no `default` template".into(),
                        })
                    }
                }
            }
            Some(_) => {
                return Err(Error::Json {
                    path: path.into(),
                    message: "chat_template is neither a string nor a list of templates".into(),
                })
            }
        };
        ChatTemplate::new(source, token("bos_token"), token("eos_token")).map(Some)
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (and, with `add_generation_prompt`, the opening of the assistant's
    /// reply) with the variables Hugging Face templates expect: `messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`, and the function `raise_exception`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = self.environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        let messages: Vec<BTreeMap<String, String>> = messages
            .iter()
            .map(|m| {
                BTreeMap::from([
                    ("role".to_string(), m.role.clone()),
                    ("content".to_string(), m.content.clone()),
                ])
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        let out = template
            .render(ctx)
            .map_err(|e| Error::ChatTemplate(describe(&e)))?;
        if out.len() > MAX_OUTPUT {
            return Err(Error::ChatTemplate(format!(
                "the template rendered {} bytes, more than the {MAX_OUTPUT} accepted",
                out.len()
            )));
        }
        Ok(out)
    }

    /// The environment every template runs in: bounded fuel and recursion, Python's string
    /// methods, `raise_exception`, no loader (a template cannot read files).
    fn environment(&self) -> minijinja::Environment<'static> {
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("raise_exception: {message}"),
                ))
            },
        );
        env
    }
}

/// A minijinja error with its cause chain, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// What a piece of a reasoning model's output is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatPiece {
    /// Text between `<think>` and `</think>`.
    Reasoning(String),
    /// The answer: text outside them.
    Content(String),
}

/// Tells a reasoning model's thinking (`<think>…</think>`) from its answer in text that arrives
/// in pieces cut anywhere, even inside a tag: text that could still be the start of a tag is held
/// back until the next piece says what it is. Pieces come out in order, never empty.
///
/// ```
/// use yoco::{ChatPiece, ReasoningSplitter};
///
/// let mut split = ReasoningSplitter::new();
/// let mut out = Vec::new();
/// for piece in ["<thi", "nk>2+2", " is 4</th", "ink>", "4"] {
///     out.extend(split.push(piece));
/// }
/// out.extend(split.finish());
/// assert_eq!(out, [
///     ChatPiece::Reasoning("2+2".into()),
///     ChatPiece::Reasoning(" is 4".into()),
///     ChatPiece::Content("4".into()),
/// ]);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ReasoningSplitter {
    /// Inside `<think>` … `</think>`?
    thinking: bool,
    /// Text held back: it may be the start of the tag that ends the current part.
    held: String,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

impl ReasoningSplitter {
    /// A splitter at the start of a reply (outside any `<think>`).
    pub fn new() -> Self {
        ReasoningSplitter::default()
    }

    /// A splitter for a reply whose prompt already opened `<think>` (templates that end the
    /// generation prompt with it).
    pub fn thinking() -> Self {
        ReasoningSplitter {
            thinking: true,
            held: String::new(),
        }
    }

    /// Is the text now being written reasoning?
    pub fn is_thinking(&self) -> bool {
        self.thinking
    }

    /// Feeds the next piece of text; returns what can be told apart so far.
    pub fn push(&mut self, text: &str) -> Vec<ChatPiece> {
        self.held.push_str(text);
        let mut out = Vec::new();
        loop {
            let tag = if self.thinking { CLOSE } else { OPEN };
            if let Some(at) = self.held.find(tag) {
                let before: String = self.held[..at].to_string();
                self.emit(&mut out, before);
                self.held.replace_range(..at + tag.len(), "");
                self.thinking = !self.thinking;
                continue;
            }
            // Keep back the longest tail that is a proper prefix of the tag.
            let keep = (1..tag.len())
                .rev()
                .find(|&n| self.held.ends_with(&tag[..n]))
                .unwrap_or(0);
            let cut = self.held.len() - keep;
            let ready: String = self.held[..cut].to_string();
            self.held.replace_range(..cut, "");
            self.emit(&mut out, ready);
            return out;
        }
    }

    /// The end of the reply: whatever is held back, as what it was being written as.
    pub fn finish(&mut self) -> Vec<ChatPiece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.held);
        self.emit(&mut out, rest);
        out
    }

    /// Splits a whole reply into its reasoning and its answer; `None` for a reply without
    /// reasoning (its answer is then the text as it is). With reasoning, the reasoning is trimmed
    /// and the answer loses the blank lines after `</think>`.
    pub fn split_whole(text: &str) -> (Option<String>, String) {
        let mut split = ReasoningSplitter::new();
        let mut pieces = split.push(text);
        pieces.extend(split.finish());
        let (mut reasoning, mut content, mut any) = (String::new(), String::new(), false);
        for p in pieces {
            match p {
                ChatPiece::Reasoning(r) => {
                    any = true;
                    reasoning.push_str(&r);
                }
                ChatPiece::Content(c) => content.push_str(&c),
            }
        }
        if any || text.contains(OPEN) {
            (
                Some(reasoning.trim().to_string()),
                content.trim_start().to_string(),
            )
        } else {
            (None, content)
        }
    }

    fn emit(&self, out: &mut Vec<ChatPiece>, text: String) {
        if text.is_empty() {
            return;
        }
        out.push(if self.thinking {
            ChatPiece::Reasoning(text)
        } else {
            ChatPiece::Content(text)
        });
    }
}
