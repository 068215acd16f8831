//! MP3 (MPEG-1/2/2.5 Layer III): parse frames, join parts.
//!
//! Joining keeps the first part's leading ID3v2 tag and drops every other ID3v2 tag, trailing
//! ID3v1 (`TAG`) blocks and APE tags. The Xing/Info/VBRI frame of every later part is dropped.
//! The first part's Xing/Info frame is kept and rewritten to describe the joined stream (frame
//! and byte counts, seek table, and, when its LAME tag's CRC checks out, the end padding of
//! the last part, the music length and both CRCs), so players report the joined duration; a
//! first part's VBRI frame is dropped (players then count frames). The encoder delay and
//! padding of parts in the middle stay in the stream (a few tens of ms of silence each).
//!
//! Free-format bitrates and layers I/II are refused. Every part must have the sample rate and
//! channel mode (mono or not) of the first.

use super::{be_u32, JoinError};

const FORMAT: &str = "mp3";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Mpeg1,
    Mpeg2,
    Mpeg25,
}

/// One Layer III frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: Version,
    /// A 16-bit CRC follows the header.
    pub protected: bool,
    pub bitrate_kbps: u32,
    pub sample_rate: u32,
    pub padding: bool,
    pub mono: bool,
    /// Bytes of the whole frame, header included.
    pub frame_length: usize,
    /// Samples per channel decoded from the frame.
    pub samples: usize,
}

impl FrameHeader {
    /// Bytes of side information after the header (and CRC).
    pub fn side_info_len(&self) -> usize {
        match (self.version, self.mono) {
            (Version::Mpeg1, true) => 17,
            (Version::Mpeg1, false) => 32,
            (_, true) => 9,
            (_, false) => 17,
        }
    }
}

const BITRATES_V1: [u32; 16] = [
    0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0,
];
const BITRATES_V2: [u32; 16] = [
    0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0,
];

fn bad(detail: impl Into<String>) -> JoinError {
    JoinError::malformed(FORMAT, detail)
}

/// Parses the Layer III frame header at the start of `bytes`.
pub fn parse_header(bytes: &[u8]) -> Result<FrameHeader, JoinError> {
    let h: [u8; 4] = bytes
        .get(..4)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| bad("truncated frame header"))?;
    let [b0, b1, b2, b3] = h;
    if b0 != 0xFF || b1 & 0xE0 != 0xE0 {
        return Err(bad("no frame sync"));
    }
    let version = match (b1 >> 3) & 0x03 {
        0 => Version::Mpeg25,
        2 => Version::Mpeg2,
        3 => Version::Mpeg1,
        _ => return Err(bad("reserved MPEG version")),
    };
    if (b1 >> 1) & 0x03 != 0x01 {
        return Err(bad("not Layer III"));
    }
    let bitrate_index = usize::from(b2 >> 4);
    let table = if version == Version::Mpeg1 {
        &BITRATES_V1
    } else {
        &BITRATES_V2
    };
    let bitrate_kbps = table.get(bitrate_index).copied().unwrap_or(0);
    if bitrate_kbps == 0 {
        return Err(bad(format!(
            "free-format or invalid bitrate index {bitrate_index}"
        )));
    }
    let base_rate = match (b2 >> 2) & 0x03 {
        0 => 44_100,
        1 => 48_000,
        2 => 32_000,
        _ => return Err(bad("reserved sample rate index")),
    };
    let sample_rate = match version {
        Version::Mpeg1 => base_rate,
        Version::Mpeg2 => base_rate / 2,
        Version::Mpeg25 => base_rate / 4,
    };
    let padding = (b2 >> 1) & 0x01 == 1;
    let (samples, coefficient) = if version == Version::Mpeg1 {
        (1152, 144)
    } else {
        (576, 72)
    };
    let frame_length =
        (coefficient * bitrate_kbps as usize * 1000) / sample_rate as usize + usize::from(padding);
    Ok(FrameHeader {
        version,
        protected: b1 & 0x01 == 0,
        bitrate_kbps,
        sample_rate,
        padding,
        mono: b3 >> 6 == 0x03,
        frame_length,
        samples,
    })
}

/// Bytes of the ID3v2 tag (header, body and footer) at the start of `bytes`, if there is one.
pub(crate) fn id3v2_len(bytes: &[u8]) -> Option<usize> {
    let h = bytes.get(..10)?;
    if h.get(..3)? != b"ID3" {
        return None;
    }
    let size_bytes = h.get(6..10)?;
    if size_bytes.iter().any(|b| b & 0x80 != 0) {
        return None;
    }
    let size = size_bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 7) | usize::from(*b));
    let footer = if h.get(5).is_some_and(|flags| flags & 0x10 != 0) {
        10
    } else {
        0
    };
    Some(10 + size + footer)
}

/// Bytes of trailing tags: an ID3v1 block (`TAG`, 128 bytes) and/or an APE tag.
fn trailing_tags_len(bytes: &[u8]) -> usize {
    let mut end = bytes.len();
    if let Some(start) = end.checked_sub(128) {
        if bytes.get(start..start + 3) == Some(b"TAG") {
            end = start;
        }
    }
    // APE tag footer: "APETAGEX", version, size (tag items + footer), count, flags.
    if let Some(footer) = end.checked_sub(32) {
        if bytes.get(footer..footer + 8) == Some(b"APETAGEX") {
            let size = super::le_u32(bytes, footer + 12).map_or(0, |s| s as usize);
            let has_header =
                super::le_u32(bytes, footer + 20).is_some_and(|f| f & 0x8000_0000 != 0);
            let total = size.saturating_add(if has_header { 32 } else { 0 });
            if let Some(start) = end.checked_sub(total) {
                end = start;
            }
        }
    }
    bytes.len() - end
}

/// What the first frame of a part is, when it is not audio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoFrame {
    /// "Xing" or "Info" at this offset inside the frame.
    Xing(usize),
    Vbri,
}

/// Whether `frame` (with header `h`) is a Xing/Info/VBRI frame.
pub fn info_frame(h: &FrameHeader, frame: &[u8]) -> Option<InfoFrame> {
    let plain = 4 + h.side_info_len();
    for at in [plain, plain + 2] {
        if matches!(frame.get(at..at + 4), Some(b"Xing" | b"Info")) {
            return Some(InfoFrame::Xing(at));
        }
    }
    (frame.get(36..40) == Some(b"VBRI")).then_some(InfoFrame::Vbri)
}

/// A parsed MP3 file.
#[derive(Debug, Clone)]
pub struct Mp3<'a> {
    /// The ID3v2 tag at the very start, if any.
    pub leading_id3: Option<&'a [u8]>,
    /// Every frame, in order, the Xing/Info/VBRI frame included.
    pub frames: Vec<(FrameHeader, &'a [u8])>,
    /// Whether the first frame is a Xing/Info/VBRI frame (not audio).
    pub info: Option<InfoFrame>,
}

impl Mp3<'_> {
    /// The audio frames (the Xing/Info/VBRI frame left out).
    pub fn audio_frames(&self) -> &[(FrameHeader, &[u8])] {
        let skip = usize::from(self.info.is_some());
        self.frames.get(skip..).unwrap_or(&[])
    }

    pub fn duration_seconds(&self) -> f64 {
        let frames = self.audio_frames();
        let rate = frames.first().map_or(1, |(h, _)| h.sample_rate);
        let samples: usize = frames.iter().map(|(h, _)| h.samples).sum();
        samples as f64 / f64::from(rate)
    }
}

/// Parses an MP3 file into its frames, skipping tags.
pub fn parse(bytes: &[u8]) -> Result<Mp3<'_>, JoinError> {
    let end = bytes.len() - trailing_tags_len(bytes);
    let mut rest = bytes.get(..end).unwrap_or(&[]);
    let mut leading_id3 = None;
    let mut frames: Vec<(FrameHeader, &[u8])> = Vec::new();
    while !rest.is_empty() {
        let offset = end - rest.len();
        if let Some(len) = id3v2_len(rest) {
            let (tag, after) = rest
                .split_at_checked(len)
                .ok_or_else(|| bad(format!("the ID3v2 tag at byte {offset} is truncated")))?;
            if offset == 0 {
                leading_id3 = Some(tag);
            }
            rest = after;
            continue;
        }
        let header = parse_header(rest).map_err(|e| match e {
            JoinError::Malformed { detail, .. } => bad(format!("{detail} at byte {offset}")),
            other => other,
        })?;
        let (frame, after) = rest
            .split_at_checked(header.frame_length)
            .ok_or_else(|| bad(format!("the frame at byte {offset} is truncated")))?;
        frames.push((header, frame));
        rest = after;
    }
    let info = frames.first().and_then(|(h, f)| info_frame(h, f));
    if frames.len() <= usize::from(info.is_some()) {
        return Err(bad("no audio frames"));
    }
    Ok(Mp3 {
        leading_id3,
        frames,
        info,
    })
}

/// CRC-16 as in LAME tags (polynomial 0x8005, reflected, initial value 0).
fn crc16(crc: u16, bytes: &[u8]) -> u16 {
    bytes.iter().fold(crc, |mut crc, b| {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
        crc
    })
}

/// The LAME tag CRC: over the first 190 bytes of the frame (zero-padded when shorter), its
/// own field (at `crc_at`) counted as zeros, as LAME and ffmpeg compute it.
fn lame_tag_crc(frame: &[u8], crc_at: usize) -> u16 {
    let mut buffer = [0u8; 190];
    for (slot, byte) in buffer.iter_mut().zip(frame) {
        *slot = *byte;
    }
    if let Some(field) = buffer.get_mut(crc_at..crc_at + 2) {
        field.fill(0);
    }
    crc16(0, &buffer)
}

/// Where the fields of a Xing/Info frame are.
#[derive(Debug, Clone, Copy)]
struct XingLayout {
    frames: Option<usize>,
    bytes: Option<usize>,
    toc: Option<usize>,
    /// The LAME tag (36 bytes), when its CRC checks out.
    lame: Option<usize>,
}

fn xing_layout(frame: &[u8], at: usize) -> Option<XingLayout> {
    let flags = be_u32(frame, at + 4)?;
    let mut next = at + 8;
    let mut field = |bit: u32, len: usize| {
        (flags & bit != 0).then(|| {
            let here = next;
            next += len;
            here
        })
    };
    let frames = field(1, 4);
    let bytes = field(2, 4);
    let toc = field(4, 100);
    let _quality = field(8, 4);
    let lame = next;
    let crc_at = lame + 34;
    let stored = frame
        .get(crc_at..crc_at + 2)
        .map(|c| c.iter().fold(0u16, |a, b| (a << 8) | u16::from(*b)));
    let lame_ok = stored.is_some() && stored == Some(lame_tag_crc(frame, crc_at));
    if frame.len() < next {
        return None;
    }
    Some(XingLayout {
        frames,
        bytes,
        toc,
        lame: lame_ok.then_some(lame),
    })
}

/// The encoder padding (samples at the end) a part's LAME tag declares, if any.
fn end_padding(mp3: &Mp3<'_>) -> Option<u16> {
    let (_, frame) = mp3.frames.first()?;
    let Some(InfoFrame::Xing(at)) = mp3.info else {
        return None;
    };
    let lame = xing_layout(frame, at)?.lame?;
    let d = frame.get(lame + 21..lame + 24)?;
    Some((u16::from(*d.get(1)? & 0x0F) << 8) | u16::from(*d.get(2)?))
}

fn put_be32(frame: &mut [u8], at: usize, value: u32) {
    if let Some(slot) = frame.get_mut(at..at + 4) {
        slot.copy_from_slice(&value.to_be_bytes());
    }
}

/// Rewrites the first part's Xing/Info frame to describe `audio` (the joined audio frames
/// that follow it), ending with `end_pad` samples of encoder padding.
fn rewrite_xing(frame: &mut [u8], at: usize, audio: &[&[u8]], end_pad: Option<u16>) {
    let Some(keys) = xing_layout(frame, at) else {
        return;
    };
    let frame_len = frame.len();
    let audio_bytes: usize = audio.iter().map(|f| f.len()).sum();
    let total_bytes = frame_len + audio_bytes;
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    if let Some(f) = keys.frames {
        put_be32(frame, f, clamp(audio.len()));
    }
    if let Some(b) = keys.bytes {
        put_be32(frame, b, clamp(total_bytes));
    }
    if let Some(toc) = keys.toc {
        // Entry i: where i% of the frames (so of the duration, for one sample rate) starts,
        // as a fraction of the bytes, times 256.
        let mut offsets = Vec::with_capacity(audio.len());
        let mut pos = frame_len;
        for f in audio {
            offsets.push(pos);
            pos += f.len();
        }
        for i in 0..100usize {
            let index = i * audio.len() / 100;
            let offset = offsets.get(index).copied().unwrap_or(total_bytes);
            let value = (offset * 256 / total_bytes.max(1)).min(255);
            if let Some(slot) = frame.get_mut(toc + i) {
                *slot = u8::try_from(value).unwrap_or(255);
            }
        }
    }
    if let Some(lame) = keys.lame {
        if let (Some(pad), Some(d)) = (end_pad, frame.get_mut(lame + 22..lame + 24)) {
            let [hi, lo] = pad.min(0x0FFF).to_be_bytes();
            if let Some(first) = d.first_mut() {
                *first = (*first & 0xF0) | hi;
            }
            if let Some(second) = d.get_mut(1) {
                *second = lo;
            }
        }
        put_be32(frame, lame + 28, clamp(total_bytes));
        let music_crc = audio.iter().fold(0u16, |crc, f| crc16(crc, f));
        if let Some(slot) = frame.get_mut(lame + 32..lame + 34) {
            slot.copy_from_slice(&music_crc.to_be_bytes());
        }
        let tag_crc = lame_tag_crc(frame, lame + 34);
        if let Some(slot) = frame.get_mut(lame + 34..lame + 36) {
            slot.copy_from_slice(&tag_crc.to_be_bytes());
        }
    }
}

/// Joins MP3 parts into one stream (see the module documentation).
pub fn join(parts: &[Vec<u8>]) -> Result<Vec<u8>, JoinError> {
    let parsed = parts
        .iter()
        .enumerate()
        .map(|(i, p)| parse(p).map_err(|e| e.in_part(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let first = parsed.first().ok_or(JoinError::NoParts)?;
    let (reference, _) = first
        .audio_frames()
        .first()
        .copied()
        .ok_or_else(|| bad("no audio frames"))?;
    let mut audio: Vec<&[u8]> = Vec::new();
    for (i, mp3) in parsed.iter().enumerate() {
        for (h, frame) in mp3.audio_frames() {
            if h.sample_rate != reference.sample_rate || h.mono != reference.mono {
                let describe = |h: &FrameHeader| {
                    format!(
                        "{} Hz {}",
                        h.sample_rate,
                        if h.mono { "mono" } else { "stereo" }
                    )
                };
                return Err(JoinError::mismatch(
                    FORMAT,
                    format!("{} against {}", describe(h), describe(&reference)),
                )
                .in_part(i));
            }
            audio.push(frame);
        }
    }
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    if let Some(tag) = first.leading_id3 {
        out.extend_from_slice(tag);
    }
    if let (Some(InfoFrame::Xing(at)), Some((_, info))) = (first.info, first.frames.first()) {
        let mut info = info.to_vec();
        let end_pad = parsed.last().and_then(end_padding);
        rewrite_xing(&mut info, at, &audio, end_pad);
        out.extend_from_slice(&info);
    }
    for frame in audio {
        out.extend_from_slice(frame);
    }
    Ok(out)
}

/// Seconds of audio: samples per frame over the sample rate, for every audio frame (encoder
/// delay and padding included).
pub fn duration_seconds(bytes: &[u8]) -> Result<f64, JoinError> {
    Ok(parse(bytes)?.duration_seconds())
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    const P1: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part1.mp3");
    const P2: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part2.mp3");
    const P3: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part3.mp3");
    const MPEG1: &[u8] = include_bytes!("../../../../tests/fixtures/audio/mpeg1.mp3");

    #[test]
    fn parses_real_files() {
        let m = parse(P1).unwrap();
        assert_eq!(m.leading_id3.map(<[u8]>::len), Some(45));
        assert!(matches!(m.info, Some(InfoFrame::Xing(_))));
        let (h, _) = m.audio_frames()[0];
        assert_eq!(
            (h.version, h.sample_rate, h.mono, h.samples),
            (Version::Mpeg2, 22_050, true, 576)
        );
        assert!(
            xing_layout(m.frames[0].1, 13).unwrap().lame.is_some(),
            "LAME tag CRC checks out"
        );
        let one = parse(MPEG1).unwrap();
        let (h, _) = one.audio_frames()[0];
        assert_eq!(
            (h.version, h.sample_rate, h.samples),
            (Version::Mpeg1, 32_000, 1152)
        );
        assert!((one.duration_seconds() - 0.684).abs() < 0.1);
    }

    fn xing_frames_field(mp3: &Mp3<'_>) -> u32 {
        let Some(InfoFrame::Xing(at)) = mp3.info else {
            panic!("no Xing frame")
        };
        let frame = mp3.frames[0].1;
        be_u32(frame, xing_layout(frame, at).unwrap().frames.unwrap()).unwrap()
    }

    #[test]
    fn joins_real_parts() {
        let parts = vec![P1.to_vec(), P2.to_vec(), P3.to_vec()];
        let joined = join(&parts).unwrap();
        let parsed: Vec<_> = parts.iter().map(|p| parse(p).unwrap()).collect();
        let m = parse(&joined).unwrap();
        // One leading ID3 tag, one Info frame, every audio frame.
        assert_eq!(m.leading_id3, parsed[0].leading_id3);
        assert!(m.info.is_some());
        let audio: usize = parsed.iter().map(|p| p.audio_frames().len()).sum();
        assert_eq!(m.audio_frames().len(), audio);
        assert_eq!(
            m.frames
                .iter()
                .filter(|(h, f)| info_frame(h, f).is_some())
                .count(),
            1
        );
        assert_eq!(xing_frames_field(&m) as usize, audio);
        // The tag's CRC was recomputed (the keys still parses with a good LAME CRC).
        let Some(InfoFrame::Xing(at)) = m.info else {
            unreachable!()
        };
        assert!(xing_layout(m.frames[0].1, at).unwrap().lame.is_some());
        let expected: f64 = parsed.iter().map(Mp3::duration_seconds).sum();
        assert!((m.duration_seconds() - expected).abs() < 1e-9);
        if let Some(decoded) = testutil::ffmpeg_check(&joined, "mp3", &[]) {
            testutil::assert_close(decoded, expected, "mp3 duration");
        }
    }

    #[test]
    fn one_part_keeps_its_info_frame_consistent() {
        let joined = join(&[P1.to_vec()]).unwrap();
        assert_eq!(joined.len(), P1.len());
        let m = parse(&joined).unwrap();
        assert_eq!(
            xing_frames_field(&m),
            xing_frames_field(&parse(P1).unwrap())
        );
    }

    #[test]
    fn drops_trailing_tags() {
        let mut tagged = P2.to_vec();
        tagged.extend_from_slice(b"APETAGEX\xd0\x07\0\0\x20\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let mut v1 = b"TAG".to_vec();
        v1.resize(128, b' ');
        tagged.extend_from_slice(&v1);
        let joined = join(&[P1.to_vec(), tagged]).unwrap();
        let plain = join(&[P1.to_vec(), P2.to_vec()]).unwrap();
        assert_eq!(joined, plain);
    }

    #[test]
    fn mismatched_sample_rates_fail() {
        let err = join(&[P1.to_vec(), MPEG1.to_vec()]).unwrap_err();
        assert!(
            matches!(err, JoinError::Mismatch { part: 1, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(parse(&[]).is_err());
        assert!(parse(&P1[..P1.len() - 3]).is_err(), "truncated last frame");
        assert!(parse(&P1[..45]).is_err(), "only a tag");
        let mut junk = P1.to_vec();
        junk[500] = 0;
        junk[501] = 0;
        let _ = parse(&junk); // may or may not hit a header; must not panic
        assert!(
            parse_header(&[0xFF, 0xF3, 0x00, 0x00]).is_err(),
            "free format"
        );
        assert!(
            parse_header(&[0xFF, 0xF3, 0xFC, 0x00]).is_err(),
            "bad bitrate and rate"
        );
        assert!(
            parse_header(&[0xFF, 0xEB, 0x90, 0x00]).is_err(),
            "reserved version"
        );
    }
}
