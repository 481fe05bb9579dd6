//! Chat templates and reasoning output: the Phi-4 family's template rendered as Hugging Face
//! renders it, hostile templates as typed errors, a Phi-4 tokenizer stand-in (o200k_base, as
//! tiktoken-rs embeds it, plus Phi-4's specials) that encodes as tiktoken does, and `<think>`
//! split from the answer however the text is cut.

#[path = "support/cl100k.rs"]
mod cl100k;
#[path = "support/o200k.rs"]
mod o200k;
#[path = "support/tiktoken_reference.rs"]
mod tiktoken_reference;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use yoco::{ChatMessage, ChatPiece, ChatTemplate, Error, ReasoningSplitter, Tokenizer};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/tokenizer_config.json")
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new(
            "system",
            "Your name is Phi, an AI math expert developed by Microsoft.",
        ),
        ChatMessage::new("user", "How to solve 3*x^2+4*x+5=1?"),
        ChatMessage::new("assistant", "<think>Move 1 over.</think>x = (-2 ± i√2)/3"),
        ChatMessage::new("user", "Thanks. And 2x = 4?"),
    ]
}

#[test]
fn the_phi4_template_renders_the_documented_format() {
    let template = ChatTemplate::from_tokenizer_config(fixture())
        .unwrap()
        .unwrap();
    let msgs = conversation();
    // The format written out by hand: each message `<|role|>content<|end|>`, then the opening of
    // the reply, or the EOS token without it.
    let body: String = msgs
        .iter()
        .map(|m| format!("<|{}|>{}<|end|>", m.role, m.content))
        .collect();
    assert_eq!(
        template.render(&msgs, true).unwrap(),
        format!("{body}<|assistant|>")
    );
    assert_eq!(
        template.render(&msgs, false).unwrap(),
        format!("{body}<|endoftext|>")
    );
    // The built-in format for directories without a template is the same.
    assert_eq!(
        ChatTemplate::phi4().render(&msgs, true).unwrap(),
        template.render(&msgs, true).unwrap()
    );
    assert_eq!(template.render(&[], true).unwrap(), "<|assistant|>");
}

#[test]
fn tokenizer_configs_give_their_template_or_a_typed_error() {
    let dir = std::env::temp_dir().join(format!("yoco-chat-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |text: &str| -> PathBuf {
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, text).unwrap();
        path
    };
    // Tokens written as objects, templates as a named list.
    let path = write(
        r#"{"bos_token": {"content": "<s>"}, "eos_token": {"content": "</s>"},
            "chat_template": [{"name": "tool_use", "template": "T"},
                              {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"}]}"#,
    );
    let t = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
    assert_eq!(
        t.render(&[ChatMessage::new("user", "hi")], false).unwrap(),
        "<s>hi</s>"
    );
    // No template at all.
    assert!(
        ChatTemplate::from_tokenizer_config(write(r#"{"eos_token": "</s>"}"#))
            .unwrap()
            .is_none()
    );
    // Broken files and templates.
    assert!(matches!(
        ChatTemplate::from_tokenizer_config(write("{ not json")),
        Err(Error::Json { .. })
    ));
    assert!(matches!(
        ChatTemplate::from_tokenizer_config(write(r#"{"chat_template": 7}"#)),
        Err(Error::Json { .. })
    ));
    assert!(matches!(
        ChatTemplate::from_tokenizer_config(write(
            r#"{"chat_template": "{% for m in messages %}"}"#
        )),
        Err(Error::ChatTemplate(_))
    ));
    std::fs::remove_dir_all(&dir).ok();
}

/// Templates that would hang, recurse, call what does not exist or refuse the conversation: each
/// is an `Error::ChatTemplate` naming the problem, never a panic or a hang.
#[test]
fn hostile_templates_are_typed_errors() {
    let msgs = conversation();
    let cases = [
        ("{% for i in range(1000000000) %}x{% endfor %}", "range"),
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "fuel",
        ),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion",
        ),
        (
            "{{ raise_exception('Conversation roles must alternate') }}",
            "alternate",
        ),
        ("{{ open('/etc/passwd') }}", "unknown function"),
        ("{% include 'other.jinja' %}", "include"),
        ("{{ messages[0]['content'] | no_such_filter }}", "filter"),
        ("{{ 'x' * 100000000 }}", "fuel"),
    ];
    for (source, needle) in cases {
        let result = ChatTemplate::new(source, None, None).and_then(|t| t.render(&msgs, true));
        match result {
            Err(Error::ChatTemplate(m)) => {
                eprintln!("{source}: {m}");
                assert!(
                    m.to_lowercase().contains(needle),
                    "{source}: `{m}` lacks `{needle}`"
                )
            }
            other => panic!("{source}: expected a chat-template error, got {other:?}"),
        }
    }
}

/// The Phi-4 tokenizer stand-in, built once (it derives 200K merges).
fn phi4_tokenizer_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("yoco-chat-phi4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("tokenizer.json"),
            o200k::phi4_tokenizer_json().unwrap(),
        )
        .unwrap();
        std::fs::copy(fixture(), dir.join("tokenizer_config.json")).unwrap();
        dir
    })
}

#[test]
fn the_phi4_stand_in_encodes_as_tiktoken_o200k_and_specials_are_one_id() {
    let tokenizer = Tokenizer::from_model_dir(phi4_tokenizer_dir()).unwrap();
    let bpe = tiktoken_rs::o200k_base().unwrap();
    let mut texts = tiktoken_reference::split_cases();
    texts.extend(
        [
            "北京是中国的首都。東京は日本の首都です。서울은 한국의 수도입니다.",
            "They're here; we'll see what you've done, I'd say it's fine.",
            "x = (-2 ± i√2)/3  \t\n\n  12345678901234567890",
        ]
        .map(String::from),
    );
    for text in &texts {
        let ours = tokenizer.encode(text, false).unwrap();
        let want: Vec<u32> = bpe.encode_ordinary(text).into_iter().collect();
        assert_eq!(ours, want, "{text:?}");
        assert_eq!(tokenizer.decode(&ours, false).unwrap(), *text);
    }
    for (special, id) in o200k::PHI4_SPECIALS {
        assert_eq!(
            tokenizer.encode(special, false).unwrap(),
            vec![id],
            "{special}"
        );
    }
    assert_eq!(tokenizer.vocab_size(), o200k::VOCAB_SIZE as usize);
}

#[test]
fn apply_chat_template_gives_the_special_ids_and_the_texts_between() {
    let tokenizer = Tokenizer::from_model_dir(phi4_tokenizer_dir()).unwrap();
    assert!(tokenizer.chat_template().unwrap().is_some());
    let msgs = conversation();
    let ids = tokenizer.apply_chat_template(&msgs, true).unwrap();
    // Built independently: each special is its id, each content tiktoken's encoding of it.
    let bpe = tiktoken_rs::o200k_base().unwrap();
    let special = |name: &str| {
        o200k::PHI4_SPECIALS
            .iter()
            .find(|(s, _)| *s == name)
            .map(|&(_, id)| id)
            .unwrap()
    };
    let mut want = Vec::new();
    for m in &msgs {
        want.push(special(&format!("<|{}|>", m.role)));
        want.extend(bpe.encode_ordinary(&m.content));
        want.push(special("<|end|>"));
    }
    want.push(special("<|assistant|>"));
    assert_eq!(ids, want);
    // Without a tokenizer_config.json, the built-in Phi-4 format gives the same ids.
    let bare = Tokenizer::from_file(phi4_tokenizer_dir().join("tokenizer.json")).unwrap();
    assert!(bare.chat_template().unwrap().is_none());
    assert_eq!(bare.apply_chat_template(&msgs, true).unwrap(), want);
}

fn pieces_of(parts: &[&str], start_thinking: bool) -> (String, String) {
    let mut split = if start_thinking {
        ReasoningSplitter::thinking()
    } else {
        ReasoningSplitter::new()
    };
    let mut out = Vec::new();
    for p in parts {
        out.extend(split.push(p));
    }
    out.extend(split.finish());
    let (mut reasoning, mut content) = (String::new(), String::new());
    for piece in out {
        match piece {
            ChatPiece::Reasoning(r) => {
                assert!(!r.is_empty());
                reasoning.push_str(&r)
            }
            ChatPiece::Content(c) => {
                assert!(!c.is_empty());
                content.push_str(&c)
            }
        }
    }
    (reasoning, content)
}

#[test]
fn reasoning_is_split_from_the_answer_wherever_the_stream_is_cut() {
    let cases = [
        (
            "<think>Let me see: 2+2.</think>It is 4.",
            false,
            "Let me see: 2+2.",
            "It is 4.",
        ),
        (
            "no reasoning at all, a < b and </thin",
            false,
            "",
            "no reasoning at all, a < b and </thin",
        ),
        (
            "still thinking </think>answer <think>again</think>end",
            true,
            "still thinking again",
            "answer end",
        ),
        ("<think>unfinished", false, "unfinished", ""),
        (
            "<think><think>nested?</think></think>",
            false,
            "<think>nested?",
            "</think>",
        ),
        (
            "<thinking>is not the tag</thinking>",
            false,
            "",
            "<thinking>is not the tag</thinking>",
        ),
        ("é<think>ü</think>日本", false, "ü", "é日本"),
    ];
    for (text, start, reasoning, content) in cases {
        let want = (reasoning.to_string(), content.to_string());
        assert_eq!(pieces_of(&[text], start), want, "{text:?} whole");
        // Every cut into two pieces, and every piece a single character.
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &i in &bounds {
            assert_eq!(
                pieces_of(&[&text[..i], &text[i..]], start),
                want,
                "{text:?} cut at {i}"
            );
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(pieces_of(&chars, start), want, "{text:?} char by char");
    }
    let (r, c) = ReasoningSplitter::split_whole("<think>\nwhy\n</think>\n\nbecause");
    assert_eq!((r.as_deref(), c.as_str()), (Some("why"), "because"));
    assert_eq!(ReasoningSplitter::split_whole("plain").0, None);
}
