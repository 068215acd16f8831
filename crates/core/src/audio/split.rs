//! Splitting long input into chunks a provider accepts.
//!
//! Chunks hold at most `max_chars` Unicode scalar values (never bytes). A chunk ends at the
//! last sentence end inside the limit (`.` `!` `?` `…` followed by whitespace, or `。` `！` `？`
//! anywhere; the split goes after the punctuation), else at the last whitespace, else at the
//! limit itself. Whitespace around a split point is dropped (so no chunk starts or ends with
//! it, except for whitespace at the very start of the input); nothing else is ever dropped.
//! No chunk is empty or only whitespace (an input of only whitespace gives no chunk).

/// Punctuation that ends a sentence only when whitespace follows.
fn is_western_sentence_end(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…')
}

/// Punctuation that ends a sentence wherever it is (CJK full stops).
fn is_cjk_sentence_end(c: char) -> bool {
    matches!(c, '。' | '！' | '？')
}

/// Splits `input` into chunks of at most `max_chars` Unicode scalar values.
///
/// `max_chars == 0` is treated as 1 (there is no way to make progress otherwise).
/// Concatenating the chunks gives back the input, except for whitespace at split points.
pub fn split_text(input: &str, max_chars: usize) -> Vec<&str> {
    let max_chars = max_chars.max(1);
    let mut chunks = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        // Byte offset of the first scalar beyond the limit; None: the rest fits.
        let Some((limit, next)) = rest.char_indices().nth(max_chars) else {
            if !rest.trim().is_empty() {
                chunks.push(rest);
            }
            break;
        };
        let (chunk, remainder) = split_once(rest, limit, next);
        if !chunk.trim().is_empty() {
            chunks.push(chunk);
        }
        rest = remainder.trim_start();
    }
    chunks
}

/// One split of `rest` whose first `max_chars` scalars end at byte `limit`, where `next` is
/// the scalar starting there. Returns (chunk, remainder before trimming); the chunk is not
/// empty unless `rest` starts with nothing but whitespace up to the limit.
fn split_once(rest: &str, limit: usize, next: char) -> (&str, &str) {
    let window = rest.get(..limit).unwrap_or(rest);
    let mut sentence_end: Option<usize> = None;
    let mut whitespace: Option<usize> = None;
    // Scalars of the window with the one following each, the last one followed by `next`.
    let followers = window.chars().skip(1).chain(std::iter::once(next));
    for ((at, c), following) in window.char_indices().zip(followers) {
        let end = at + c.len_utf8();
        if is_cjk_sentence_end(c) || (is_western_sentence_end(c) && following.is_whitespace()) {
            sentence_end = Some(end);
        }
        if c.is_whitespace() && !window.get(..at).unwrap_or("").trim_end().is_empty() {
            whitespace = Some(at);
        }
    }
    if next.is_whitespace() && !window.trim_end().is_empty() {
        whitespace = Some(limit);
    }
    let at = sentence_end.or(whitespace).unwrap_or(limit);
    match rest.split_at_checked(at) {
        Some((chunk, remainder))
            if at != limit || sentence_end.is_some() || whitespace.is_some() =>
        {
            (chunk.trim_end(), remainder)
        }
        Some((chunk, remainder)) => (chunk, remainder),
        None => (rest, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Checks the contract: every chunk is non-empty and within the limit, and walking the
    /// input finds the chunks in order with only whitespace between and after them.
    fn check_reassembles(input: &str, max_chars: usize, chunks: &[&str]) {
        let mut pos = input;
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(!chunk.trim().is_empty(), "blank chunk {i} in {chunks:?}");
            assert!(
                chunk.chars().count() <= max_chars.max(1),
                "chunk {i} too long: {chunk:?}"
            );
            // Whitespace may only be dropped at split points (or as a blank first window).
            if !pos.starts_with(chunk) {
                pos = pos.trim_start();
            }
            assert!(
                pos.starts_with(chunk),
                "chunk {i} {chunk:?} not found at {pos:?}"
            );
            pos = &pos[chunk.len()..];
        }
        assert!(pos.trim().is_empty(), "left over: {pos:?}");
    }

    fn split_checked(input: &str, max: usize) -> Vec<&str> {
        let chunks = split_text(input, max);
        check_reassembles(input, max, &chunks);
        chunks
    }

    #[test]
    fn short_input_is_one_chunk() {
        assert_eq!(split_checked("Hello there.", 100), vec!["Hello there."]);
        assert_eq!(split_checked("", 10), Vec::<&str>::new());
    }

    #[test]
    fn exactly_at_the_limit_is_one_chunk() {
        assert_eq!(split_checked("abcde", 5), vec!["abcde"]);
        assert_eq!(split_checked("日本語です。", 6), vec!["日本語です。"]);
        assert_eq!(split_checked("abcdef", 5), vec!["abcde", "f"]);
    }

    #[test]
    fn splits_after_the_last_sentence_end() {
        let text = "One two. Three four! Five six? Seven eight";
        assert_eq!(
            split_checked(text, 25),
            vec!["One two. Three four!", "Five six? Seven eight"]
        );
        assert_eq!(
            split_checked("Wait… what now", 10),
            vec!["Wait…", "what now"]
        );
    }

    #[test]
    fn a_dot_without_whitespace_is_not_a_sentence_end() {
        // "3.14" must not split after the dot; the last whitespace wins.
        assert_eq!(
            split_checked("pi is 3.14159 ok", 12),
            vec!["pi is", "3.14159 ok"]
        );
    }

    #[test]
    fn a_sentence_end_right_before_the_limit_counts() {
        // The whitespace after the '.' is the first scalar beyond the limit.
        assert_eq!(split_checked("Hi you. there", 7), vec!["Hi you.", "there"]);
    }

    #[test]
    fn falls_back_to_whitespace_then_to_the_limit() {
        assert_eq!(
            split_checked("alpha beta gamma", 12),
            vec!["alpha beta", "gamma"]
        );
        assert_eq!(split_checked("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
    }

    #[test]
    fn cjk_sentence_ends_split_anywhere() {
        let text = "今日は晴れです。明日は雨でしょう！本当？はい";
        assert_eq!(
            split_checked(text, 12),
            vec!["今日は晴れです。", "明日は雨でしょう！本当？", "はい"]
        );
        // No punctuation, no spaces: at the limit, in scalars, not bytes.
        assert_eq!(
            split_checked("一二三四五六七", 3),
            vec!["一二三", "四五六", "七"]
        );
    }

    #[test]
    fn emoji_are_never_split_inside_a_scalar() {
        let text = "😀😃😄😁😆";
        assert_eq!(split_checked(text, 2), vec!["😀😃", "😄😁", "😆"]);
        // A ZWJ family is several scalars; splitting between them is allowed.
        let family = "👨\u{200d}👩\u{200d}👧";
        let chunks = split_checked(family, 2);
        assert_eq!(chunks.concat(), family);
    }

    #[test]
    fn max_chars_one_and_zero() {
        assert_eq!(split_checked("ab c", 1), vec!["a", "b", "c"]);
        assert_eq!(split_text("ab", 0), vec!["a", "b"]);
    }

    #[test]
    fn runs_of_whitespace_at_a_split_are_dropped() {
        assert_eq!(split_checked("aaa    bbb", 6), vec!["aaa", "bbb"]);
        assert_eq!(
            split_checked("First.\n\n  Second.", 9),
            vec!["First.", "Second."]
        );
    }

    #[test]
    fn leading_whitespace_of_the_input_is_kept() {
        assert_eq!(split_checked("   abc def", 7), vec!["   abc", "def"]);
        // A window of nothing but whitespace is dropped as a whole.
        assert_eq!(split_checked("      abcdef", 3), vec!["abc", "def"]);
        assert_eq!(split_checked("  \n ", 2), Vec::<&str>::new());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn chunks_reassemble_the_input(
            input in "[a-c .!?…。？ 😀\n\u{200d}日]{0,80}",
            max in 1usize..20,
        ) {
            let chunks = split_text(&input, max);
            check_reassembles(&input, max, &chunks);
        }

        #[test]
        fn any_unicode_reassembles(input in "\\PC{0,60}", max in 0usize..12) {
            let chunks = split_text(&input, max);
            check_reassembles(&input, max, &chunks);
        }
    }
}
