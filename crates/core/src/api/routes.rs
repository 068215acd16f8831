//! Which of the API's paths a request is for.

pub const BASE: &str = "/v1/async/audio/speech";
/// A key's own counters and limits.
pub const USAGE: &str = "/v1/async/usage";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not ours: the rest of the filter chain handles it.
    PassThrough,
    Submit,
    Job(String),
    Content(String),
    Usage,
    /// Under the API's path but no such resource.
    Unknown,
}

impl Route {
    /// The methods the route takes, for 405 answers.
    pub fn allowed(&self) -> &'static [&'static str] {
        match self {
            Route::Submit => &["POST"],
            Route::Job(_) => &["GET", "DELETE"],
            Route::Content(_) | Route::Usage => &["GET"],
            Route::PassThrough | Route::Unknown => &[],
        }
    }
}

pub fn route(path: &[u8]) -> Route {
    let path = match path.iter().position(|&b| b == b'?' || b == b'#') {
        Some(end) => path.get(..end).unwrap_or_default(),
        None => path,
    };
    if path == USAGE.as_bytes() || path == format!("{USAGE}/").as_bytes() {
        return Route::Usage;
    }
    let Some(rest) = path.strip_prefix(BASE.as_bytes()) else {
        return Route::PassThrough;
    };
    let rest = match rest {
        b"" | b"/" => return Route::Submit,
        _ => match rest.strip_prefix(b"/") {
            Some(r) => r,
            // "/v1/async/audio/speechless" is another path altogether.
            None => return Route::PassThrough,
        },
    };
    let Ok(rest) = std::str::from_utf8(rest) else {
        return Route::Unknown;
    };
    let mut parts = rest.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(id), None, None) if !id.is_empty() => Route::Job(id.to_string()),
        (Some(id), Some("content"), None) if !id.is_empty() => Route::Content(id.to_string()),
        _ => Route::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(b"/v1/async/audio/speech"), Route::Submit);
        assert_eq!(route(b"/v1/async/audio/speech?x=1"), Route::Submit);
        assert_eq!(
            route(b"/v1/async/audio/speech/abc"),
            Route::Job("abc".into())
        );
        assert_eq!(
            route(b"/v1/async/audio/speech/abc/content"),
            Route::Content("abc".into())
        );
        assert_eq!(route(b"/v1/async/audio/speech/abc/x"), Route::Unknown);
        assert_eq!(route(b"/v1/async/audio/speech/\xff"), Route::Unknown);
        assert_eq!(route(b"/v1/async/audio/speechless"), Route::PassThrough);
        assert_eq!(route(b"/v1/audio/speech"), Route::PassThrough);
        assert_eq!(route(b"/"), Route::PassThrough);
        assert_eq!(route(b"/v1/async/usage"), Route::Usage);
        assert_eq!(route(b"/v1/async/usage?x"), Route::Usage);
        assert_eq!(route(b"/v1/async/usages"), Route::PassThrough);
    }
}
