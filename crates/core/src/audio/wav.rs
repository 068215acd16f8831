//! RIFF/WAVE: parse the `fmt ` and `data` chunks (skipping others such as `LIST`), join into
//! one header whose RIFF and data sizes cover all the data.
//!
//! Streamed WAVs often declare a data size they can't know (0 or 0xFFFFFFFF): a `data` chunk
//! that claims more bytes than the file has (or 0 while bytes follow, as the last chunk) is
//! taken to run to the end of the file, cut to whole sample frames.

use super::{le_u16, le_u32, JoinError};

const FORMAT: &str = "wav";

/// Bytes of the canonical header written by [`join`]: RIFF, `fmt ` (16-byte body), `data`.
#[cfg(test)]
pub const HEADER_BYTES: usize = 44;

/// The sample format of a WAV: parts must all have the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WavFormat {
    /// 1 = integer PCM, 3 = IEEE float, 0xFFFE = extensible, ...
    pub format_tag: u16,
    pub channels: u16,
    pub sample_rate: u32,
    pub bits_per_sample: u16,
    /// Bytes per sample frame (all channels).
    pub block_align: u16,
}

/// A parsed WAV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wav<'a> {
    pub format: WavFormat,
    /// The `fmt ` chunk's body, copied as is into the joined file.
    pub fmt_body: &'a [u8],
    /// The samples.
    pub data: &'a [u8],
}

impl Wav<'_> {
    pub fn duration_seconds(&self) -> f64 {
        let frames = self.data.len() / usize::from(self.format.block_align.max(1));
        frames as f64 / f64::from(self.format.sample_rate.max(1))
    }
}

fn bad(detail: impl Into<String>) -> JoinError {
    JoinError::malformed(FORMAT, detail)
}

fn parse_fmt(body: &[u8]) -> Result<WavFormat, JoinError> {
    let field =
        |at: usize| le_u16(body, at).ok_or_else(|| bad("the fmt chunk is shorter than 16 bytes"));
    let format = WavFormat {
        format_tag: field(0)?,
        channels: field(2)?,
        sample_rate: le_u32(body, 4)
            .ok_or_else(|| bad("the fmt chunk is shorter than 16 bytes"))?,
        block_align: field(12)?,
        bits_per_sample: field(14)?,
    };
    if format.channels == 0 || format.sample_rate == 0 || format.block_align == 0 {
        return Err(bad(
            "the fmt chunk has 0 channels, a 0 sample rate or a 0 block size",
        ));
    }
    Ok(format)
}

/// Parses a RIFF/WAVE file.
pub fn parse(bytes: &[u8]) -> Result<Wav<'_>, JoinError> {
    if bytes.get(..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WAVE") {
        return Err(bad("no RIFF/WAVE header"));
    }
    let mut at = 12usize;
    let mut fmt: Option<(WavFormat, &[u8])> = None;
    while let (Some(id), Some(size), Some(body_start)) = (
        at.checked_add(4).and_then(|end| bytes.get(at..end)),
        le_u32(bytes, at.saturating_add(4)),
        at.checked_add(8),
    ) {
        let rest = bytes.get(body_start..).unwrap_or(&[]);
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if id == b"data" {
            let (format, fmt_body) =
                fmt.ok_or_else(|| bad("the data chunk comes before any fmt chunk"))?;
            // A size it can't know (streamed) or a truncated file: the data runs to the end.
            let declared = if size == 0 || size > rest.len() {
                rest.len()
            } else {
                size
            };
            let whole = declared - declared % usize::from(format.block_align);
            let data = rest.get(..whole).unwrap_or(&[]);
            return Ok(Wav {
                format,
                fmt_body,
                data,
            });
        }
        let body = rest.get(..size).ok_or_else(|| {
            bad(format!(
                "the {:?} chunk claims {size} bytes, only {} follow",
                String::from_utf8_lossy(id),
                rest.len()
            ))
        })?;
        if id == b"fmt " {
            fmt = Some((parse_fmt(body)?, body));
        }
        // Chunks are padded to an even size.
        at = body_start.saturating_add(size).saturating_add(size % 2);
    }
    Err(bad("no data chunk"))
}

/// Joins WAV parts: the first part's fmt chunk, one data chunk with every part's samples.
/// Parts with a different format tag, channel count, sample rate or sample width fail.
pub fn join(parts: &[Vec<u8>]) -> Result<Vec<u8>, JoinError> {
    let mut first: Option<Wav<'_>> = None;
    let mut data_len = 0usize;
    let mut wavs = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let wav = parse(part).map_err(|e| e.in_part(i))?;
        if let Some(first) = &first {
            let (a, b) = (first.format, wav.format);
            if a != b {
                return Err(JoinError::mismatch(
                    FORMAT,
                    format!(
                        "format {} with {} channel(s) at {} Hz, {} bits, against format {} with {} channel(s) at {} Hz, {} bits",
                        b.format_tag, b.channels, b.sample_rate, b.bits_per_sample,
                        a.format_tag, a.channels, a.sample_rate, a.bits_per_sample
                    ),
                )
                .in_part(i));
            }
        } else {
            first = Some(wav.clone());
        }
        data_len = data_len.saturating_add(wav.data.len());
        wavs.push(wav);
    }
    let first = first.ok_or(JoinError::NoParts)?;
    let datas: Vec<&[u8]> = wavs.iter().map(|w| w.data).collect();
    write(first.fmt_body, &datas).ok_or_else(|| {
        JoinError::malformed(
            FORMAT,
            "the joined data is over the 4 GiB a RIFF header can hold",
        )
    })
}

/// The one WAV writer: a RIFF header, the `fmt ` chunk's body, one `data`
/// chunk holding `datas` in order (padded to even length, as RIFF wants).
/// `None` when it would pass the 4 GiB a RIFF header can hold.
pub fn write(fmt_body: &[u8], datas: &[&[u8]]) -> Option<Vec<u8>> {
    let data_len: usize = datas.iter().map(|d| d.len()).sum();
    let (fmt_len, pad) = (fmt_body.len(), data_len % 2);
    let riff_len = 4 + (8 + fmt_len + fmt_len % 2) + (8 + data_len + pad);
    let riff_size = u32::try_from(riff_len).ok()?;
    let data_size = u32::try_from(data_len).ok()?;
    let fmt_size = u32::try_from(fmt_len).ok()?;
    let mut out = Vec::with_capacity(riff_len + 8);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&riff_size.to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&fmt_size.to_le_bytes());
    out.extend_from_slice(fmt_body);
    if fmt_len % 2 == 1 {
        out.push(0);
    }
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_size.to_le_bytes());
    for data in datas {
        out.extend_from_slice(data);
    }
    if pad == 1 {
        out.push(0);
    }
    Some(out)
}

/// 16-bit little-endian integer PCM in a WAV file.
pub fn from_pcm16(pcm: &[u8], sample_rate: u32, channels: u16) -> Vec<u8> {
    let block_align = channels.saturating_mul(2);
    let byte_rate = sample_rate.saturating_mul(u32::from(block_align));
    let mut fmt = Vec::with_capacity(16);
    fmt.extend_from_slice(&1u16.to_le_bytes()); // integer PCM
    fmt.extend_from_slice(&channels.to_le_bytes());
    fmt.extend_from_slice(&sample_rate.to_le_bytes());
    fmt.extend_from_slice(&byte_rate.to_le_bytes());
    fmt.extend_from_slice(&block_align.to_le_bytes());
    fmt.extend_from_slice(&16u16.to_le_bytes());
    write(&fmt, &[pcm]).unwrap_or_default()
}

/// Seconds of audio in a WAV file, from its own header.
pub fn duration_seconds(bytes: &[u8]) -> Result<f64, JoinError> {
    Ok(parse(bytes)?.duration_seconds())
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    const P1: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part1.wav");
    const P2: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part2.wav");
    const P3: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part3.wav");

    fn wav(channels: u16, rate: u32, bits: u16, data: &[u8], data_size: u32) -> Vec<u8> {
        let block = channels * bits / 8;
        let mut v = b"RIFF\0\0\0\0WAVE".to_vec();
        v.extend_from_slice(b"LIST\x05\0\0\0abcde\0");
        v.extend_from_slice(b"fmt \x10\0\0\0\x01\0");
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        v.extend_from_slice(&(rate * u32::from(block)).to_le_bytes());
        v.extend_from_slice(&block.to_le_bytes());
        v.extend_from_slice(&bits.to_le_bytes());
        v.extend_from_slice(b"data");
        v.extend_from_slice(&data_size.to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_the_fixture_skipping_list() {
        let w = parse(P1).unwrap();
        assert_eq!(
            w.format,
            WavFormat {
                format_tag: 1,
                channels: 1,
                sample_rate: 8000,
                bits_per_sample: 16,
                block_align: 2
            }
        );
        assert_eq!(w.data.len() % 2, 0);
        assert!((w.duration_seconds() - 0.638).abs() < 0.01);
    }

    #[test]
    fn joins_real_parts_with_sizes_covering_all_data() {
        let parts = vec![P1.to_vec(), P2.to_vec(), P3.to_vec()];
        let joined = join(&parts).unwrap();
        let datas: usize = parts.iter().map(|p| parse(p).unwrap().data.len()).sum();
        assert_eq!(joined.len(), HEADER_BYTES + datas);
        assert_eq!(le_u32(&joined, 4).unwrap() as usize, joined.len() - 8);
        assert_eq!(le_u32(&joined, 40).unwrap() as usize, datas);
        let w = parse(&joined).unwrap();
        assert_eq!(w.data.len(), datas);
        let expected: f64 = parts.iter().map(|p| duration_seconds(p).unwrap()).sum();
        assert!((w.duration_seconds() - expected).abs() < 1e-9);
        if let Some(decoded) = testutil::ffmpeg_check(&joined, "wav", &[]) {
            testutil::assert_close(decoded, expected, "wav duration");
        }
    }

    #[test]
    fn streamed_sizes_run_to_the_end() {
        let a = wav(1, 24_000, 16, &[1, 0, 2, 0, 3], u32::MAX);
        assert_eq!(parse(&a).unwrap().data, &[1, 0, 2, 0]);
        let b = wav(1, 24_000, 16, &[4, 0], 0);
        let joined = join(&[a, b]).unwrap();
        assert_eq!(parse(&joined).unwrap().data, &[1, 0, 2, 0, 4, 0]);
    }

    #[test]
    fn odd_data_is_padded() {
        let a = wav(1, 8000, 8, &[1, 2, 3], 3);
        let joined = join(&[a.clone(), a.clone(), a]).unwrap();
        assert_eq!(joined.len(), HEADER_BYTES + 9 + 1);
        assert_eq!(le_u32(&joined, 4).unwrap() as usize, joined.len() - 8);
        assert_eq!(parse(&joined).unwrap().data, &[1, 2, 3, 1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn different_formats_fail_clearly() {
        let a = wav(1, 24_000, 16, &[0; 4], 4);
        for b in [
            wav(2, 24_000, 16, &[0; 4], 4),
            wav(1, 22_050, 16, &[0; 4], 4),
            wav(1, 24_000, 8, &[0; 4], 4),
        ] {
            let err = join(&[a.clone(), b]).unwrap_err();
            assert!(
                matches!(err, JoinError::Mismatch { part: 1, .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("part 2"), "{err}");
        }
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(parse(b"RIFF").is_err());
        assert!(parse(b"RIFF\0\0\0\0WAVE").is_err());
        assert!(
            parse(b"RIFF\0\0\0\0WAVEdata\x02\0\0\0\0\0").is_err(),
            "data before fmt"
        );
        assert!(
            parse(b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0").is_err(),
            "truncated fmt"
        );
        let mut zero_channels = wav(1, 8000, 16, &[0; 2], 2);
        zero_channels[36] = 0;
        zero_channels[37] = 0;
        assert!(parse(&zero_channels).is_err());
    }
}
