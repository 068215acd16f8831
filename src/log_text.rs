//! Client text in log lines: control characters escaped, length capped, so a
//! client cannot forge or flood log lines.

const MAX_CHARS: usize = 200;

/// `text` with control characters (C0, DEL, C1) as `\n`, `\u{1b}`, … and
/// cut to 200 characters with an ellipsis.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_CHARS * 2));
    for (i, c) in text.chars().enumerate() {
        if i == MAX_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_forge_a_line() {
        assert_eq!(escape("openai/x\n[warning] fake"), "openai/x\\n[warning] fake");
        assert_eq!(escape("a\u{1b}[31mb\u{7f}\u{85}"), "a\\u{1b}[31mb\\u{7f}\\u{85}");
        assert_eq!(escape("héllo"), "héllo");
        let long = "x".repeat(500);
        assert_eq!(escape(&long).chars().count(), 201);
    }
}
