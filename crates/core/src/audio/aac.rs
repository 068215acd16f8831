//! AAC in ADTS: validate and concatenate ADTS frames.
//!
//! A leading ID3v2 tag (some encoders write one) is skipped in every part and not copied.
//! Every part must have the same profile, sample rate and channel configuration.

use super::{mp3::id3v2_len, JoinError};

const FORMAT: &str = "aac";

const SAMPLE_RATES: [u32; 13] = [
    96_000, 88_200, 64_000, 48_000, 44_100, 32_000, 24_000, 22_050, 16_000, 12_000, 11_025, 8_000,
    7_350,
];

/// One ADTS frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdtsHeader {
    /// Audio object type minus 1 (1 = AAC LC).
    pub profile: u8,
    pub sample_rate_index: u8,
    pub channel_config: u8,
    /// Bytes of the whole frame, header included.
    pub frame_length: usize,
    /// Raw data blocks in the frame, 1024 samples each.
    pub blocks: usize,
}

impl AdtsHeader {
    pub fn sample_rate(&self) -> Option<u32> {
        SAMPLE_RATES
            .get(usize::from(self.sample_rate_index))
            .copied()
    }
}

fn bad(detail: impl Into<String>) -> JoinError {
    JoinError::malformed(FORMAT, detail)
}

/// Parses the ADTS header at the start of `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<AdtsHeader, JoinError> {
    let h: [u8; 7] = bytes
        .get(..7)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| bad("truncated ADTS header"))?;
    let [b0, b1, b2, b3, b4, b5, b6] = h;
    if b0 != 0xFF || b1 & 0xF0 != 0xF0 {
        return Err(bad("no ADTS sync word"));
    }
    if b1 & 0x06 != 0 {
        return Err(bad("ADTS layer is not 0"));
    }
    let protection_absent = b1 & 0x01 == 1;
    let header = AdtsHeader {
        profile: b2 >> 6,
        sample_rate_index: (b2 >> 2) & 0x0F,
        channel_config: ((b2 & 0x01) << 2) | (b3 >> 6),
        frame_length: (usize::from(b3 & 0x03) << 11)
            | (usize::from(b4) << 3)
            | usize::from(b5 >> 5),
        blocks: usize::from(b6 & 0x03) + 1,
    };
    if header.sample_rate().is_none() {
        return Err(bad(format!(
            "reserved sample rate index {}",
            header.sample_rate_index
        )));
    }
    let header_len = if protection_absent { 7 } else { 9 };
    if header.frame_length < header_len {
        return Err(bad(format!(
            "frame length {} is shorter than its header",
            header.frame_length
        )));
    }
    Ok(header)
}

/// The ADTS frames of one file: (header, frame bytes).
pub fn frames(bytes: &[u8]) -> Result<Vec<(AdtsHeader, &[u8])>, JoinError> {
    let mut rest = bytes.get(id3v2_len(bytes).unwrap_or(0)..).unwrap_or(&[]);
    let mut out = Vec::new();
    let mut offset = bytes.len() - rest.len();
    while !rest.is_empty() {
        let header = parse_header(rest).map_err(|e| match e {
            JoinError::Malformed { detail, .. } => bad(format!("{detail} at byte {offset}")),
            other => other,
        })?;
        let (frame, after) = rest
            .split_at_checked(header.frame_length)
            .ok_or_else(|| bad(format!("the frame at byte {offset} is truncated")))?;
        if let Some((first, _)) = out.first() {
            let first: &AdtsHeader = first;
            if (first.profile, first.sample_rate_index, first.channel_config)
                != (
                    header.profile,
                    header.sample_rate_index,
                    header.channel_config,
                )
            {
                return Err(bad(format!(
                    "the stream changes profile, sample rate or channels at byte {offset}"
                )));
            }
        }
        out.push((header, frame));
        offset += frame.len();
        rest = after;
    }
    if out.is_empty() {
        return Err(bad("no ADTS frames"));
    }
    Ok(out)
}

/// Concatenates the ADTS frames of every part.
pub fn join(parts: &[Vec<u8>]) -> Result<Vec<u8>, JoinError> {
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    let mut first: Option<AdtsHeader> = None;
    for (i, part) in parts.iter().enumerate() {
        let frames = frames(part).map_err(|e| e.in_part(i))?;
        for (header, frame) in frames {
            match first {
                None => first = Some(header),
                Some(f)
                    if (f.profile, f.sample_rate_index, f.channel_config)
                        != (
                            header.profile,
                            header.sample_rate_index,
                            header.channel_config,
                        ) =>
                {
                    return Err(JoinError::mismatch(
                        FORMAT,
                        format!(
                            "profile {}, {} Hz, channel configuration {} against profile {}, {} Hz, channel configuration {}",
                            header.profile, header.sample_rate().unwrap_or(0), header.channel_config,
                            f.profile, f.sample_rate().unwrap_or(0), f.channel_config
                        ),
                    )
                    .in_part(i));
                }
                Some(_) => {}
            }
            out.extend_from_slice(frame);
        }
    }
    Ok(out)
}

/// Seconds of audio: 1024 samples per raw data block at the stream's sample rate.
pub fn duration_seconds(bytes: &[u8]) -> Result<f64, JoinError> {
    let frames = frames(bytes)?;
    let rate = frames
        .first()
        .and_then(|(h, _)| h.sample_rate())
        .ok_or_else(|| bad("no ADTS frames"))?;
    let samples: usize = frames.iter().map(|(h, _)| h.blocks * 1024).sum();
    Ok(samples as f64 / f64::from(rate))
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    const P1: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part1.aac");
    const P2: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part2.aac");
    const P3: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part3.aac");

    #[test]
    fn parses_real_frames() {
        let f = frames(P1).unwrap();
        assert!(f.len() > 5);
        let (h, _) = f[0];
        assert_eq!(h.sample_rate(), Some(22_050));
        assert_eq!(h.channel_config, 1);
        assert_eq!(f.iter().map(|(_, b)| b.len()).sum::<usize>(), P1.len());
    }

    #[test]
    fn joins_real_parts() {
        let parts = vec![P1.to_vec(), P2.to_vec(), P3.to_vec()];
        let joined = join(&parts).unwrap();
        assert_eq!(joined.len(), P1.len() + P2.len() + P3.len());
        let counts: usize = parts.iter().map(|p| frames(p).unwrap().len()).sum();
        assert_eq!(frames(&joined).unwrap().len(), counts);
        let expected: f64 = parts.iter().map(|p| duration_seconds(p).unwrap()).sum();
        assert!((duration_seconds(&joined).unwrap() - expected).abs() < 1e-9);
        if let Some(decoded) = testutil::ffmpeg_check(&joined, "aac", &[]) {
            testutil::assert_close(decoded, expected, "aac duration");
        }
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(frames(&[]).is_err());
        assert!(frames(&P1[..P1.len() - 1]).is_err(), "truncated last frame");
        let mut bad_sync = P1.to_vec();
        bad_sync[0] = 0;
        assert!(frames(&bad_sync).is_err());
        // Frame length 0.
        assert!(parse_header(&[0xFF, 0xF1, 0x50, 0x80, 0x00, 0x1F, 0xFC]).is_err());
    }

    #[test]
    fn different_sample_rates_do_not_join() {
        let mut other = P2.to_vec();
        // Rewrite every frame's sample rate index (22050 -> 24000).
        let mut at = 0;
        while at < other.len() {
            let len = parse_header(&other[at..]).unwrap().frame_length;
            other[at + 2] = (other[at + 2] & !0x3C) | (6 << 2);
            at += len;
        }
        let err = join(&[P1.to_vec(), other]).unwrap_err();
        assert!(
            matches!(err, JoinError::Mismatch { part: 1, .. }),
            "{err:?}"
        );
    }
}
