//! `docs/operations.md` lists every permanent error the service can raise, as the code words it.
//!
//! The messages are collected from the sources: every string literal inside a constructor of a
//! permanent error (`JobError::Permanent(…)`, `CloudError::permanent(…)`, `CloudError::Permanent
//! { … }`, `permanent(…)`, AWS's `Diagnosis::Fix(…)`, Kubernetes' `fix(…)`, `(Retry::No, …)`),
//! and every literal of the items whose text becomes a permanent error indirectly ([`ITEMS`]:
//! error enums converted into `JobError::Permanent`, message helpers). A message is its literal
//! with `{…}` placeholders cut out; its longest placeholder-free part must appear in the doc (its
//! first [`WORDS`] words), so a new or reworded message fails here until the doc says it.
//! Literals whose longest part has fewer than [`MIN_WORDS`] words (operation names such as
//! `"apply secret"`, `"payload: {e}"`) are not messages worth a row and are skipped. Test modules
//! (`#[cfg(test)] mod … { … }`) are left out.
//!
//! `DOCS_LIST_MESSAGES=1 cargo test --test docs -- --nocapture` prints what it collected.
//!
//! What it cannot see: a permanent error built by a construct none of the above matches; add
//! the item to [`ITEMS`] (or the constructor to [`CONSTRUCTORS`]) when you write one.

use std::path::{Path, PathBuf};

use regex::Regex;

/// Permanent-error constructors: the literals of the expression that follows each are messages.
const CONSTRUCTORS: &str = r"JobError::Permanent\(|CloudError::permanent\(|CloudError::Permanent \{|\bpermanent\(|Diagnosis::Fix\(|\bfix\(|Retry::No,";

/// Items (file, item header) whose literals become permanent errors through a conversion or a
/// helper the constructors above only call.
const ITEMS: &[(&str, &str)] = &[
    ("src/provision/bucket.rs", "fn create_error"),
    ("src/provision/deprovision/storage.rs", "fn refusal"),
    ("src/provision/adopt/found_secret.rs", "enum Unusable"),
    (
        "src/provision/adopt/found_secret.rs",
        "fn refuse_lossy_rewrite",
    ),
    ("src/provision/adopt/key_check.rs", "enum KeyProblem"),
    ("src/provision/sealed.rs", "enum SealedError"),
    ("src/provision/rotate/keys.rs", "impl InGrace"),
    ("src/provision/rotate/retire.rs", "fn guard"),
    ("src/provision/rotate/retire.rs", "fn delete_step"),
    ("src/cloud/kube.rs", "fn forbidden"),
    ("src/cloud/kube.rs", "fn not_found"),
];

/// How many words of a message's longest part the doc must contain.
const WORDS: usize = 6;
/// Shorter literals are not messages.
const MIN_WORDS: usize = 3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A byte scanner over Rust source that skips comments, strings and char literals.
struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    /// If a raw string literal (`r"…"`, `r#"…"#`, `br…`) starts at `at`, its contents and the
    /// index after it.
    fn raw_string_at(&self, at: usize) -> Option<(String, usize)> {
        let text = self.text;
        let after_ident = at > 0 && (text[at - 1].is_ascii_alphanumeric() || text[at - 1] == b'_');
        let r = at + usize::from(text.get(at) == Some(&b'b'));
        if after_ident || text.get(r) != Some(&b'r') {
            return None;
        }
        let hashes = text[r + 1..].iter().take_while(|&&c| c == b'#').count();
        let start = r + 1 + hashes + 1;
        if text.get(start - 1) != Some(&b'"') {
            return None;
        }
        let closing: Vec<u8> = std::iter::once(b'"')
            .chain(std::iter::repeat_n(b'#', hashes))
            .collect();
        let len = text[start..]
            .windows(closing.len())
            .position(|w| w == closing.as_slice())?;
        let raw = String::from_utf8_lossy(&text[start..start + len]).into_owned();
        Some((raw, start + len + closing.len()))
    }

    /// If a string literal starts at `at`, its raw contents and the index after it.
    fn string_at(&self, at: usize) -> Option<(String, usize)> {
        if let Some(found) = self.raw_string_at(at) {
            return Some(found);
        }
        let text = self.text;
        let start = match text.get(at) {
            Some(b'"') => at + 1,
            Some(b'b') if text.get(at + 1) == Some(&b'"') => at + 2,
            _ => return None,
        };
        let mut i = start;
        while i < text.len() && text[i] != b'"' {
            i += if text[i] == b'\\' { 2 } else { 1 };
        }
        let raw = String::from_utf8_lossy(&text[start..i.min(text.len())]).into_owned();
        Some((raw, i + 1))
    }

    /// The index after a comment or char literal starting at `at`, if one does.
    fn skip_at(&self, at: usize) -> Option<usize> {
        let text = self.text;
        match (text.get(at), text.get(at + 1), text.get(at + 2)) {
            (Some(b'/'), Some(b'/'), _) => Some(
                text[at..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(text.len(), |n| at + n),
            ),
            (Some(b'\''), Some(b'\\'), _) => {
                let close = text[at + 2..].iter().position(|&c| c == b'\'')?;
                Some(at + 2 + close + 1)
            }
            (Some(b'\''), Some(_), Some(b'\'')) => Some(at + 3),
            _ => None,
        }
    }

    /// From `at`, the string literals up to the bracket closing the enclosing one, and the
    /// index of that bracket.
    fn literals_until_close(&mut self) -> (Vec<String>, usize) {
        let mut depth = 0i32;
        let mut literals = Vec::new();
        while self.at < self.text.len() {
            if let Some((raw, next)) = self.string_at(self.at) {
                literals.push(raw);
                self.at = next;
                continue;
            }
            if let Some(next) = self.skip_at(self.at) {
                self.at = next;
                continue;
            }
            match self.text[self.at] {
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => depth -= 1,
                _ => {}
            }
            if depth < 0 {
                break;
            }
            self.at += 1;
        }
        (literals, self.at)
    }
}

/// The literals from `at` to the bracket closing the enclosing one, and that bracket's index.
fn literals_from(text: &str, at: usize) -> (Vec<String>, usize) {
    Scanner {
        text: text.as_bytes(),
        at,
    }
    .literals_until_close()
}

/// The source without its test modules.
fn without_tests(text: &str) -> String {
    let test_module = Regex::new(r"#\[cfg\(test\)\]\s*(pub(\(\w+\))? )?mod \w+ \{").unwrap();
    let mut out = text.to_owned();
    while let Some(found) = test_module.find(&out) {
        let (_, close) = literals_from(&out, found.end());
        out.replace_range(found.start()..(close + 1).min(out.len()), "");
    }
    out
}

/// A Rust string literal's contents as the program sees them (escapes, line continuations).
fn unescape(raw: &str) -> String {
    let continued = Regex::new(r"\\\n\s*").unwrap();
    continued
        .replace_all(raw, "")
        .replace("\\\"", "\"")
        .replace("\\'", "'")
        .replace("\\n", " ")
        .replace("\\\\", "\\")
}

/// The first [`WORDS`] words of a message's longest placeholder-free part; `None` when that
/// part is too short to be a message.
fn key_of(literal: &str) -> Option<String> {
    let text = unescape(literal)
        .replace("{{", "\u{1}")
        .replace("}}", "\u{2}");
    let placeholder = Regex::new(r"\{[^{}]*\}").unwrap();
    let longest = placeholder
        .split(&text)
        .max_by_key(|part| part.trim().len())?
        .replace('\u{1}', "{")
        .replace('\u{2}', "}");
    let words: Vec<&str> = longest.split_whitespace().collect();
    (words.len() >= MIN_WORDS).then(|| words[..words.len().min(WORDS)].join(" "))
}

/// Every message key of one source file, with where it comes from.
fn messages_of(file: &str, text: &str) -> Vec<(String, String)> {
    let text = without_tests(text);
    let constructors = Regex::new(CONSTRUCTORS).unwrap();
    let mut literals = Vec::new();
    for found in constructors.find_iter(&text) {
        literals.extend(literals_from(&text, found.end()).0);
    }
    for (item_file, header) in ITEMS.iter().filter(|(f, _)| *f == file) {
        let start = text.find(header).unwrap_or_else(|| {
            panic!("{item_file}: no `{header}` (update ITEMS in tests/docs.rs)")
        });
        let open = start + text[start..].find('{').expect("item body");
        literals.extend(literals_from(&text, open + 1).0);
    }
    literals
        .iter()
        .filter_map(|literal| key_of(literal))
        .map(|key| (file.to_owned(), key))
        .collect()
}

fn all_messages() -> Vec<(String, String)> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files.sort();
    let mut messages = Vec::new();
    for path in files {
        let file = path
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("read source");
        messages.extend(messages_of(&file, &text));
    }
    messages.sort();
    messages.dedup();
    messages
}

fn normalised(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn the_operations_guide_lists_every_permanent_error() {
    let doc = std::fs::read_to_string(root().join("docs/operations.md")).expect("read the doc");
    let doc = normalised(&doc);
    let messages = all_messages();
    if std::env::var_os("DOCS_LIST_MESSAGES").is_some() {
        for (file, key) in &messages {
            eprintln!("{file}: {key}");
        }
    }
    // The collector must see the messages at all (a broken pattern would pass vacuously).
    assert!(
        messages.len() >= 60,
        "only {} messages found",
        messages.len()
    );
    let missing: Vec<String> = messages
        .iter()
        .filter(|(_, key)| !doc.contains(key.as_str()))
        .map(|(file, key)| format!("{file}: \"{key}\""))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md (Troubleshooting) does not quote these permanent errors; add a row \
         with the message as the code builds it:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_collector_sees_constructors_items_and_skips_tests() {
    let source = r#"
fn a() -> JobError {
    JobError::Permanent(format!("bucket {b} is on fire; call the \
         fire brigade ({n} engines)"))
}
fn b() { let c = '{'; CloudError::permanent(S3, "apply secret", "x") }
#[cfg(test)]
mod tests {
    fn t() { JobError::Permanent("a test message that is long".into()); }
}
"#;
    let keys: Vec<String> = messages_of("src/x.rs", source)
        .into_iter()
        .map(|(_, key)| key)
        .collect();
    assert_eq!(keys, vec!["is on fire; call the fire".to_owned()]);
    assert_eq!(
        key_of(r#"body {{\"confirm\": \"{bucket}\"}} with ?delete_bucket=true. Without it"#),
        Some(r#""} with ?delete_bucket=true. Without it"#.to_owned())
    );
}
