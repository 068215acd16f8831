//! Text that a client or provider sent, made safe for a log line: no raw
//! control characters, no invalid UTF-8, and a bounded length.

/// Longest escaped text [`escape_for_log`] returns, in characters, before its `…`.
pub const MAX_LOG_CHARS: usize = 200;

/// Escapes `text` for a log line and caps it at [`MAX_LOG_CHARS`] characters
/// (then `…`). See [`escape_for_log_with_limit`].
pub fn escape_for_log(text: impl AsRef<[u8]>) -> String {
    escape_for_log_with_limit(text.as_ref(), MAX_LOG_CHARS)
}

/// Escapes `text` for a log line:
/// - `\n`, `\r`, `\t` and `\\` as those two-character escapes;
/// - other control characters (C0, DEL, C1) and the Unicode characters that move or
///   break lines or reorder text (U+2028/2029, bidi controls) as `\u{..}`;
/// - bytes that are not UTF-8 as `\xNN`;
///
/// and keeps at most `limit` characters of the result (never half an escape), then `…`.
pub fn escape_for_log_with_limit(text: &[u8], limit: usize) -> String {
    let mut out = String::new();
    let mut used = 0usize;
    for chunk in text.utf8_chunks() {
        for c in chunk.valid().chars() {
            if !push_capped(&mut out, &mut used, limit, &escape_char(c)) {
                return out;
            }
        }
        for b in chunk.invalid() {
            if !push_capped(&mut out, &mut used, limit, &format!("\\x{b:02x}")) {
                return out;
            }
        }
    }
    out
}

/// Appends `piece` if it fits in `limit` characters; otherwise ends `out` with `…`.
fn push_capped(out: &mut String, used: &mut usize, limit: usize, piece: &str) -> bool {
    let len = piece.chars().count();
    if used.saturating_add(len) > limit {
        out.push('…');
        return false;
    }
    *used += len;
    out.push_str(piece);
    true
}

fn escape_char(c: char) -> String {
    match c {
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        '\\' => "\\\\".into(),
        c if needs_escape(c) => format!("\\u{{{:x}}}", u32::from(c)),
        c => c.to_string(),
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(
            escape_for_log("openai/gpt-4o-mini-tts é 日本"),
            "openai/gpt-4o-mini-tts é 日本"
        );
        assert_eq!(escape_for_log(""), "");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_for_log("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(
            escape_for_log("\u{0}\u{1b}[31m\u{7f}\u{85}\u{9f}"),
            "\\u{0}\\u{1b}[31m\\u{7f}\\u{85}\\u{9f}"
        );
        assert_eq!(
            escape_for_log("x\u{2028}y\u{202e}z"),
            "x\\u{2028}y\\u{202e}z"
        );
        // A backslash is escaped too, so that no text can pose as an escape.
        assert_eq!(escape_for_log("\\n"), "\\\\n");
    }

    #[test]
    fn invalid_utf8_is_shown_as_bytes() {
        assert_eq!(escape_for_log(b"ok\xff\xfe!"), "ok\\xff\\xfe!");
        assert_eq!(escape_for_log(b"\xc3"), "\\xc3");
        assert_eq!(escape_for_log(b"\xc3\xa9"), "é");
    }

    #[test]
    fn length_is_capped_without_splitting_an_escape() {
        let long = "a".repeat(500);
        let out = escape_for_log(&long);
        assert_eq!(out.chars().count(), MAX_LOG_CHARS + 1);
        assert!(out.ends_with('…'));
        assert_eq!(
            escape_for_log("a".repeat(MAX_LOG_CHARS)),
            "a".repeat(MAX_LOG_CHARS)
        );
        assert_eq!(escape_for_log_with_limit(b"abc\n", 4), "abc…");
        assert_eq!(escape_for_log_with_limit(b"ab\xff", 4), "ab…");
    }

    #[test]
    fn output_never_holds_a_raw_control_character() {
        let all: Vec<u8> = (0..=255u8).collect();
        let out = escape_for_log_with_limit(&all, 10_000);
        assert!(!out.chars().any(char::is_control), "{out}");
    }
}
