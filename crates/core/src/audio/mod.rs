//! Long input: splitting text into chunks and joining audio parts into one file.
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

/// The formats whose parts can be joined. `flac` is not one of them.
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

    #[cfg(test)]
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

/// Joins the parts (in order) into one file of `format`, refusing a result over `max_bytes`
/// (the plugin's `max_audio_bytes`). One part is validated and normalized like many.
pub fn join(format: JoinFormat, parts: &[Vec<u8>], max_bytes: usize) -> Result<Vec<u8>, JoinError> {
    if parts.is_empty() {
        return Err(JoinError::NoParts);
    }
    let joined = match format {
        JoinFormat::Mp3 => mp3::join(parts)?,
        JoinFormat::Opus => ogg::join(parts)?,
        JoinFormat::Aac => aac::join(parts)?,
        JoinFormat::Wav => wav::join(parts)?,
        JoinFormat::Pcm => pcm::join(parts, PCM_BLOCK_BYTES)?,
    };
    if joined.len() > max_bytes {
        return Err(JoinError::TooLarge {
            size: joined.len(),
            max: max_bytes,
        });
    }
    Ok(joined)
}

/// The decoded duration of one file, for offsetting alignments; `None` if it can't be parsed.
///
/// Assumptions: `pcm` is 16-bit mono at `pcm_sample_rate` Hz (the rate the provider was asked
/// for; OpenAI answers 24 kHz); `wav` reads its own header; `mp3` counts samples per frame
/// (encoder delay and padding included, so a few ms more than the gapless length); `aac`
/// counts 1024 samples per raw data block; `opus` is last granule minus pre-skip at 48 kHz.
pub fn duration_seconds(format: JoinFormat, bytes: &[u8], pcm_sample_rate: u32) -> Option<f64> {
    match format {
        JoinFormat::Mp3 => mp3::duration_seconds(bytes).ok(),
        JoinFormat::Opus => ogg::duration_seconds(bytes).ok(),
        JoinFormat::Aac => aac::duration_seconds(bytes).ok(),
        JoinFormat::Wav => wav::duration_seconds(bytes).ok(),
        JoinFormat::Pcm => pcm::duration_seconds(bytes, PCM_BLOCK_BYTES, pcm_sample_rate).ok(),
    }
}

pub(crate) use crate::bytes::{be_u32, le_u16, le_u32};

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
    use proptest::prelude::*;

    const FIXTURES: [(JoinFormat, &[u8]); 4] = [
        (
            JoinFormat::Mp3,
            include_bytes!("../../../../tests/fixtures/audio/part1.mp3"),
        ),
        (
            JoinFormat::Opus,
            include_bytes!("../../../../tests/fixtures/audio/part1.opus"),
        ),
        (
            JoinFormat::Aac,
            include_bytes!("../../../../tests/fixtures/audio/part1.aac"),
        ),
        (
            JoinFormat::Wav,
            include_bytes!("../../../../tests/fixtures/audio/part1.wav"),
        ),
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Real files with bytes overwritten or cut short: an error or a file, never a panic.
        #[test]
        fn corrupted_real_files_never_panic(
            which in 0usize..4,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let (format, bytes) = FIXTURES[which];
            let mut corrupted = bytes.to_vec();
            for (at, value) in edits {
                let i = at.index(corrupted.len());
                corrupted[i] = value;
            }
            let _ = duration_seconds(format, &corrupted, 24_000);
            let _ = join(format, &[bytes.to_vec(), corrupted.clone()], 1 << 20);
            corrupted.truncate(cut.index(corrupted.len() + 1));
            let _ = duration_seconds(format, &corrupted, 24_000);
            let _ = join(format, &[corrupted, bytes.to_vec()], 1 << 20);
        }
    }

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

    #[test]
    fn joined_durations_add_up_for_every_format() {
        macro_rules! parts {
            ($ext:literal) => {
                vec![
                    include_bytes!(concat!("../../../../tests/fixtures/audio/part1.", $ext))
                        .to_vec(),
                    include_bytes!(concat!("../../../../tests/fixtures/audio/part2.", $ext))
                        .to_vec(),
                    include_bytes!(concat!("../../../../tests/fixtures/audio/part3.", $ext))
                        .to_vec(),
                ]
            };
        }
        let wavs = parts!("wav");
        let pcms: Vec<Vec<u8>> = wavs
            .iter()
            .map(|w| wav::parse(w).unwrap().data.to_vec())
            .collect();
        let cases = [
            (JoinFormat::Mp3, parts!("mp3")),
            (JoinFormat::Opus, parts!("opus")),
            (JoinFormat::Aac, parts!("aac")),
            (JoinFormat::Wav, wavs),
            (JoinFormat::Pcm, pcms),
        ];
        for (format, parts) in cases {
            let joined = join(format, &parts, 1 << 20).unwrap();
            let sum: f64 = parts
                .iter()
                .map(|p| duration_seconds(format, p, 8000).unwrap())
                .sum();
            let total = duration_seconds(format, &joined, 8000).unwrap();
            testutil::assert_close(total, sum, format.name());
            let limit = joined.len() - 1;
            assert!(matches!(
                join(format, &parts, limit),
                Err(JoinError::TooLarge { .. })
            ));
        }
    }

    #[test]
    fn no_parts_is_an_error() {
        assert_eq!(join(JoinFormat::Pcm, &[], 100), Err(JoinError::NoParts));
    }

    #[test]
    fn too_large_names_max_audio_bytes() {
        let err = join(JoinFormat::Pcm, &[vec![0; 100], vec![0; 100]], 150).unwrap_err();
        assert_eq!(
            err,
            JoinError::TooLarge {
                size: 200,
                max: 150
            }
        );
        assert!(err.to_string().contains("max_audio_bytes"));
        let big = vec![0u8; 10_000];
        assert!(matches!(
            join(JoinFormat::Pcm, &[big], 100),
            Err(JoinError::TooLarge { .. })
        ));
    }

    #[test]
    fn errors_name_the_part() {
        let err = join(JoinFormat::Pcm, &[vec![0; 4], vec![0; 3]], 100).unwrap_err();
        assert!(
            matches!(err, JoinError::Malformed { part: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("part 2"), "{err}");
    }

    #[test]
    fn every_format_survives_garbage() {
        let garbage: Vec<Vec<u8>> = vec![
            vec![],
            vec![0xff],
            vec![0xff, 0xfb, 0x90],
            vec![0xff; 64],
            b"OggS\0\x02".to_vec(),
            b"RIFF\x04\0\0\0WAVE".to_vec(),
            b"ID3\x04\0\0\x7f\x7f\x7f\x7f".to_vec(),
            (0..=255u8).cycle().take(3000).collect(),
        ];
        for format in [
            JoinFormat::Mp3,
            JoinFormat::Opus,
            JoinFormat::Aac,
            JoinFormat::Wav,
            JoinFormat::Pcm,
        ] {
            for g in &garbage {
                let _ = join(format, &[g.clone(), g.clone()], 1 << 20);
                let _ = duration_seconds(format, g, 24_000);
            }
        }
    }
}
