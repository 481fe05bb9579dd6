//! The reference encoding, computed without anything of the document under test: tiktoken-rs's
//! own `cl100k_base` (its ranks, its split pattern, its five specials), plus YOCO's 18 specials
//! cut out of the text before tiktoken sees it, every id shifted by the offset. This is what
//! the reference implementation's `cl100k_im` encoding does with `allowed_special="all"`.
//!
//! Also the texts on which the document's pre-tokenizer is most likely to split differently
//! from tiktoken's ([`split_cases`]): digit runs, numbers after punctuation, whitespace runs,
//! contractions, code and mixed scripts.
//!
//! Shared (through `#[path = ...]`) by `tests/reference_tokenizer.rs` and the Oniguruma check
//! in `tools/onig-check/`; both declare `cl100k` as a module at their crate root.

#![allow(dead_code)]

use tiktoken_rs::CoreBPE;

use crate::cl100k::{BoxError, OFFSET, YOCO_FIRST_ID, YOCO_SPECIALS};

/// tiktoken-rs's cl100k_base with YOCO's specials.
pub struct Reference {
    bpe: CoreBPE,
    yoco: Vec<(&'static str, u32)>,
}

impl Reference {
    /// Loads tiktoken-rs's cl100k_base.
    pub fn new() -> Result<Self, BoxError> {
        let bpe =
            tiktoken_rs::cl100k_base().map_err(|e| format!("tiktoken-rs cl100k_base: {e}"))?;
        let yoco = YOCO_SPECIALS.iter().copied().zip(YOCO_FIRST_ID..).collect();
        Ok(Self { bpe, yoco })
    }

    /// The reference's final ids for `text` (every special allowed).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut rest = text;
        loop {
            // tiktoken cuts at the leftmost special; no special is a prefix of another, so
            // ties cannot happen (the longest is taken if they did).
            let next = self
                .yoco
                .iter()
                .filter_map(|&(s, id)| rest.find(s).map(|at| (at, s, id)))
                .min_by_key(|&(at, s, _)| (at, std::cmp::Reverse(s.len())));
            let Some((at, special, id)) = next else {
                out.extend(self.bpe.encode_with_special_tokens(rest));
                break;
            };
            out.extend(self.bpe.encode_with_special_tokens(&rest[..at]));
            out.push(id);
            rest = &rest[at + special.len()..];
        }
        out.into_iter().map(|t| t + OFFSET).collect()
    }

    /// tiktoken-rs's cl100k_base itself (tiktoken ids, no YOCO specials).
    pub fn bpe(&self) -> &CoreBPE {
        &self.bpe
    }
}

/// A run of `n` digits that is not periodic in 3 (so that every split point shows in the ids).
fn digits(n: usize) -> String {
    "31415926535897932384626433832795028841971693993751"
        .chars()
        .take(n)
        .collect()
}

const CODE: &[&str] = &[
    "fn main() {\n    let v: Vec<u64> = (0..10_000).map(|i| i * 31_415_926).collect();\n    println!(\"{:>12}\", v[9999]);\n}\n",
    "def f(x):\n\treturn x**2 + 3.14159*x - 1e-12  # 2024-05-08\n\n\n\nclass A:  \n    pass   \n",
    "{\"id\": 123456789, \"price\": 1234.5678, \"tags\": [\"a\",\"b\"], \"ok\": true}\n",
    "<div class=\"x\">\n  <a href=\"/p?id=98765&amp;x=1\">Link</a>\n</div>\r\n",
    "SELECT COUNT(*) FROM t WHERE ts >= '2023-12-31 23:59:59.999' AND id IN (1001, 20002);",
    "for i in $(seq 1 100000); do echo \"$i\" >> /dev/null; done && exit 0\n",
    "#include <stdio.h>\nint main(void){printf(\"%d\\n\", 0x7FFFFFFF);return 0;}\n",
    "x = re.compile(r'^\\s+(?!\\S)|\\d{1,3}+$', re.M)\n",
    "    if (a != b) {\n        return;\n    }\n    \n    \n",
];

const MIXED: &[&str] = &[
    "Größe 1234567 mm³, 25°C ± 0.5 — naïve café",
    "日本語のテキスト2024年5月8日、価格は12345円です。",
    "Русский текст 1234567 и English words mixed",
    "العربية ١٢٣٤٥٦٧ والأرقام 1234567",
    "हिन्दी १२३४५६७ संख्या",
    "全角数字１２３４５６７と半角1234567",
    "Ⅻ Ⅳ ½ ¾ ² ³ 𝟙𝟚𝟛𝟜𝟝 ⑩⑪ 〇一二三",
    "emoji 😀1234😃 👩‍👩‍👧‍👦42 🇫🇷2024",
    "mixed\u{301}123\u{308}4567 e\u{301}\u{302}\u{303}89",
];

/// Texts that probe the pre-tokenizer where regex engines can disagree.
pub fn split_cases() -> Vec<String> {
    let mut cases: Vec<String> = Vec::new();
    let mut add = |s: String| cases.push(s);

    // Digit runs of every length from 1 to 40, alone and in context.
    for n in 1..=40 {
        let d = digits(n);
        for (before, after) in [
            ("", ""),
            (" ", " "),
            ("x", "y"),
            (".", "."),
            ("$", ","),
            ("v1.", "\n"),
            ("(", ")"),
            ("-", "e-5"),
            ("é", "日"),
            ("\n", "  \n"),
        ] {
            add(format!("{before}{d}{after}"));
        }
    }

    // Numbers after punctuation, years, dates, times, versions, amounts.
    for s in [
        "3.14159",
        "v1.2.3456",
        "$12345.67",
        "1999",
        "in 2024, 1066 and 19000",
        "2024-05-08",
        "08/05/2024 23:59:59.123456",
        "2024-05-08T12:34:56.789012Z",
        "Q3 FY2023/24",
        "1,000,000.0001",
        "+1 (555) 123-4567",
        "192.168.100.200:8080",
        "0xDEADBEEF12345 0b1010101010101",
        "ISBN 978-0-306-40615-7 / 9780306406157",
        "1e100 6.02214076e23 -0.000000001",
        "10000000000000000000000000000000000000000",
        "12345678 1234567890123 3.14159265 -42 1e-9 0x1F 1,000,000 2024-05-08",
        "a1b22c333d4444e55555f666666",
        "π≈3.14159265358979323846",
        "1.2.3.4.5.6.7.8.9.10.11.12",
    ] {
        add(s.to_string());
    }

    // Whitespace runs before letters, newlines, punctuation and the end of the text.
    for sp in [
        " ",
        "  ",
        "     ",
        "\t",
        "\t\t ",
        " \t ",
        "\u{a0}",
        "\u{a0}\u{a0}",
        "\u{3000}",
        "\u{2003}\u{2009}",
        "\u{b}\u{c}",
        "\u{85}",
        "\u{2028}",
        " \u{2029} ",
    ] {
        for nl in ["\n", "\r\n", "\n\n", "\r", "\n \n"] {
            add(format!("a{sp}b{sp}"));
            add(format!("{sp}a"));
            add(format!("a{sp}{nl}b"));
            add(format!("a{nl}{sp}b"));
            add(format!("a{nl}{sp}"));
            add(format!("a{sp}{nl}"));
            add(format!("a{sp}{nl}{sp}"));
            add(format!("a{sp}{nl}{sp}{nl}{sp}"));
            add(format!("!{sp}{nl}{sp}?"));
            add(format!("1{sp}{nl}{sp}2{sp}"));
            add(format!("{nl}{sp}{nl}"));
        }
    }
    for s in [
        "",
        " ",
        "\n",
        "\n\n\n",
        "   \n\n   ",
        "\t\t \n \t",
        "x  ",
        "x\n  ",
        "x \n ",
        "end with spaces     ",
        "end with newline and spaces\n    ",
        "indented\n    code\n        more\n",
        "a\r\n\r\n\r\nb",
        "...\n\n...",
        " ?! \n",
        " ! ",
        "word  !!  \n\n",
    ] {
        add(s.to_string());
    }

    // Contractions, including ones tiktoken treats case-insensitively.
    for s in [
        "don't, I'LL, we've, they're, she'd, I'm, it's, DON'T, We'Ve, y'all'll",
        "y'all'd've 'tis 'twas",
        "'s's'S'ſ 'd'D 'm'M 't'T 'll'LL'Ll'lL 've'VE 're'RE",
        "it’s curly ’s and ‘quotes’",
        "rock 'n' roll ''''' 'x '",
        "O'Neil's 1990's 90's '90s",
        "'sup 'll5 'd3 's_ 's\n",
    ] {
        add(s.to_string());
    }

    for s in CODE.iter().chain(MIXED) {
        add((*s).to_string());
    }
    cases
}
