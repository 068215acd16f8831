//! Long input (SPEC §6): splitting text into chunks and joining audio parts into one file.
//!
//! Everything here is pure (no proxy-wasm calls): bytes in, `Result` out, never a panic on
//! malformed input.

pub mod aac;
pub mod alignment;
pub mod mp3;
pub mod ogg;
pub mod pcm;
pub mod split;
pub mod wav;

use std::fmt;

pub use split::split_text;

/// Bytes per sample frame of the `pcm` response format: 16-bit little-endian mono (OpenAI,
/// ElevenLabs and the local provider all answer `pcm` that way).
pub const PCM_BLOCK_BYTES: usize = 2;

/// The formats whose parts can be joined. `flac` is not one of them (SPEC §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinFormat {
    Mp3,
    Opus,
    Aac,
    Wav,
    Pcm,
}

impl JoinFormat {
    /// The joinable format of a `response_format` value; `None` for `flac` and the unknown.
    pub fn from_response_format(name: &str) -> Option<JoinFormat> {
        match name {
            "mp3" => Some(JoinFormat::Mp3),
            "opus" => Some(JoinFormat::Opus),
            "aac" => Some(JoinFormat::Aac),
            "wav" => Some(JoinFormat::Wav),
            "pcm" => Some(JoinFormat::Pcm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JoinFormat::Mp3 => "mp3",
            JoinFormat::Opus => "opus",
            JoinFormat::Aac => "aac",
            JoinFormat::Wav => "wav",
            JoinFormat::Pcm => "pcm",
        }
    }
}

/// Why parts could not be joined. `part` is the 0-based index of the offending part.
#[derive(Debug, Clone, PartialEq)]
pub enum JoinError {
    /// Nothing to join.
    NoParts,
    /// A part is not a valid file of its format.
    Malformed {
        format: &'static str,
        part: usize,
        detail: String,
    },
    /// A part is valid but does not match the first one (sample rate, channels, ...).
    Mismatch {
        format: &'static str,
        part: usize,
        detail: String,
    },
    /// The joined file would be larger than the configured `max_audio_bytes`.
    TooLarge { size: usize, max: usize },
    /// Alignments (timestamps) could not be joined.
    Alignment(String),
}

impl JoinError {
    pub(crate) fn malformed(format: &'static str, detail: impl Into<String>) -> JoinError {
        JoinError::Malformed {
            format,
            part: 0,
            detail: detail.into(),
        }
    }

    pub(crate) fn mismatch(format: &'static str, detail: impl Into<String>) -> JoinError {
        JoinError::Mismatch {
            format,
            part: 0,
            detail: detail.into(),
        }
    }

    /// The same error, attributed to part `index`.
    pub(crate) fn in_part(self, index: usize) -> JoinError {
        match self {
            JoinError::Malformed { format, detail, .. } => JoinError::Malformed {
                format,
                part: index,
                detail,
            },
            JoinError::Mismatch { format, detail, .. } => JoinError::Mismatch {
                format,
                part: index,
                detail,
            },
            other => other,
        }
    }
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::NoParts => write!(f, "no audio parts to join"),
            JoinError::Malformed {
                format,
                part,
                detail,
            } => {
                write!(f, "audio part {} is not valid {format}: {detail}", part + 1)
            }
            JoinError::Mismatch {
                format,
                part,
                detail,
            } => {
                write!(
                    f,
                    "audio part {} cannot be joined to the first {format} part: {detail}",
                    part + 1
                )
            }
            JoinError::TooLarge { size, max } => {
                write!(
                    f,
                    "joined audio is {size} bytes, over max_audio_bytes ({max})"
                )
            }
            JoinError::Alignment(detail) => write!(f, "alignments cannot be joined: {detail}"),
        }
    }
}

impl std::error::Error for JoinError {}

/// Reads a big-endian u32 at `at`.
pub(crate) fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// Reads a little-endian u32 at `at`.
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// Reads a little-endian u16 at `at`.
pub(crate) fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b: [u8; 2] = bytes.get(at..at.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(b))
}

/// Test helpers: fixtures and checks by ffmpeg/ffprobe when they are installed.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    fn tool(name: &str) -> bool {
        Command::new(name)
            .arg("-version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn temp_file(bytes: &[u8], ext: &str) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "async-speech-audio-{}-{n}.{ext}",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// Decodes `bytes` with ffmpeg, asserting no errors, and returns ffprobe's duration in
    /// seconds; `None` (with a note) when ffmpeg/ffprobe are not on PATH.
    pub fn ffmpeg_check(bytes: &[u8], ext: &str, extra_input_args: &[&str]) -> Option<f64> {
        if !tool("ffmpeg") || !tool("ffprobe") {
            eprintln!("note: ffmpeg/ffprobe not on PATH, skipping the decode check");
            return None;
        }
        let path = temp_file(bytes, ext);
        let decode = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error"])
            .args(extra_input_args)
            .arg("-i")
            .arg(&path)
            .args(["-f", "null", "-"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&decode.stderr).to_string();
        assert!(
            decode.status.success() && stderr.trim().is_empty(),
            "ffmpeg decode errors: {stderr}"
        );
        // Decode to raw samples and count them: the duration actually heard.
        let pcm = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error"])
            .args(extra_input_args)
            .arg("-i")
            .arg(&path)
            .args(["-f", "s16le", "-ac", "1", "-ar", "48000", "-"])
            .output()
            .unwrap();
        assert!(pcm.status.success());
        let decoded = pcm.stdout.len() as f64 / 2.0 / 48000.0;
        let probe = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-show_entries",
                "format=duration",
                "-of",
                "csv=p=0",
            ])
            .args(extra_input_args)
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        let probed: f64 = String::from_utf8_lossy(&probe.stdout)
            .trim()
            .parse()
            .unwrap_or(decoded);
        assert!(
            (probed - decoded).abs() <= 0.05 * decoded.max(0.1),
            "ffprobe says {probed} s, decoding gives {decoded} s"
        );
        Some(decoded)
    }

    /// Asserts `a` is within 5% of `b`.
    pub fn assert_close(a: f64, b: f64, what: &str) {
        assert!((a - b).abs() <= 0.05 * b, "{what}: {a} vs {b}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_name() {
        assert_eq!(
            JoinFormat::from_response_format("mp3"),
            Some(JoinFormat::Mp3)
        );
        assert_eq!(JoinFormat::from_response_format("flac"), None);
        for f in [
            JoinFormat::Mp3,
            JoinFormat::Opus,
            JoinFormat::Aac,
            JoinFormat::Wav,
            JoinFormat::Pcm,
        ] {
            assert_eq!(JoinFormat::from_response_format(f.name()), Some(f));
        }
    }
}
