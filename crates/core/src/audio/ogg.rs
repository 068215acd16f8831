//! Opus in Ogg: parse pages, join parts into one logical stream.
//!
//! Joining keeps the first part's `OpusHead` and `OpusTags` pages and drops those of later
//! parts. Every page is rewritten with the first part's serial number and continuous page
//! sequence numbers; only the very first page keeps BOS and only the very last has EOS; every
//! CRC is recomputed.
//!
//! Granule positions are recomputed from the packets themselves (the Opus TOC byte gives each
//! packet's duration), counting every sample a decoder produces: a later part's pre-skip
//! samples (its encoder's priming, ~6.5 ms) are not discarded by a decoder that only honours
//! the first `OpusHead`, so they are counted, not subtracted, and earlier parts' end trimming
//! (which only an EOS page can express) is given up — their final samples are played. The
//! granule of the last page keeps the last part's end trimming. So granules stay monotonic
//! and always match what is decoded; the joined duration is the sum of the parts' durations
//! plus a few ms per later part.
//!
//! Parts must be a single logical Opus stream each, with the first part's channel count and
//! channel mapping family.

use super::{le_u16, le_u32, JoinError};

const FORMAT: &str = "opus";
const FLAG_CONTINUED: u8 = 0x01;
const FLAG_BOS: u8 = 0x02;
const FLAG_EOS: u8 = 0x04;
/// The granule position of a page on which no packet ends.
const NO_GRANULE: u64 = u64::MAX;

fn bad(detail: impl Into<String>) -> JoinError {
    JoinError::malformed(FORMAT, detail)
}

/// Ogg's CRC-32: polynomial 0x04c11db7, no reflection, initial value 0, no final xor.
pub fn crc32_update(mut crc: u32, bytes: &[u8]) -> u32 {
    for b in bytes {
        crc ^= u32::from(*b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04c1_1db7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One Ogg page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<'a> {
    pub header_type: u8,
    pub granule: u64,
    pub serial: u32,
    pub sequence: u32,
    pub crc: u32,
    /// The segment table (lacing values).
    pub segments: &'a [u8],
    pub body: &'a [u8],
}

impl Page<'_> {
    pub fn continued(&self) -> bool {
        self.header_type & FLAG_CONTINUED != 0
    }
}

/// Parses the page at the start of `bytes`, checking its CRC; returns it and its length.
pub fn parse_page(bytes: &[u8]) -> Result<(Page<'_>, usize), JoinError> {
    if bytes.get(..4) != Some(b"OggS") {
        return Err(bad("no OggS capture pattern"));
    }
    if bytes.get(4) != Some(&0) {
        return Err(bad("unknown Ogg version"));
    }
    let truncated = || bad("truncated page header");
    let header_type = *bytes.get(5).ok_or_else(truncated)?;
    let granule_bytes: [u8; 8] = bytes
        .get(6..14)
        .and_then(|g| g.try_into().ok())
        .ok_or_else(truncated)?;
    let serial = le_u32(bytes, 14).ok_or_else(truncated)?;
    let sequence = le_u32(bytes, 18).ok_or_else(truncated)?;
    let crc = le_u32(bytes, 22).ok_or_else(truncated)?;
    let count = usize::from(*bytes.get(26).ok_or_else(truncated)?);
    let segments = bytes.get(27..27 + count).ok_or_else(truncated)?;
    let body_len: usize = segments.iter().map(|s| usize::from(*s)).sum();
    let body_start = 27 + count;
    let body = bytes
        .get(body_start..body_start + body_len)
        .ok_or_else(|| bad("truncated page body"))?;
    let head = bytes.get(..22).ok_or_else(truncated)?;
    let tail = bytes.get(26..body_start + body_len).ok_or_else(truncated)?;
    let computed = crc32_update(crc32_update(crc32_update(0, head), &[0; 4]), tail);
    if computed != crc {
        return Err(bad(format!(
            "page {sequence} has CRC {crc:08x}, its content gives {computed:08x}"
        )));
    }
    let page = Page {
        header_type,
        granule: u64::from_le_bytes(granule_bytes),
        serial,
        sequence,
        crc,
        segments,
        body,
    };
    Ok((page, body_start + body_len))
}

/// Every page of one Ogg file, CRCs checked.
pub fn pages(bytes: &[u8]) -> Result<Vec<Page<'_>>, JoinError> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let (page, len) = parse_page(rest).map_err(|e| match e {
            JoinError::Malformed { detail, .. } => bad(format!("{detail} (at byte {offset})")),
            other => other,
        })?;
        rest = rest.get(len..).unwrap_or(&[]);
        out.push(page);
    }
    if out.is_empty() {
        return Err(bad("no Ogg pages"));
    }
    Ok(out)
}

/// Appends a page with these fields to `out`, computing its CRC.
pub fn write_page(
    out: &mut Vec<u8>,
    header_type: u8,
    granule: u64,
    serial: u32,
    sequence: u32,
    segments: &[u8],
    body: &[u8],
) {
    let start = out.len();
    out.extend_from_slice(b"OggS\0");
    out.push(header_type);
    out.extend_from_slice(&granule.to_le_bytes());
    out.extend_from_slice(&serial.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(u8::try_from(segments.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(segments);
    out.extend_from_slice(body);
    let crc = crc32_update(0, out.get(start..).unwrap_or(&[]));
    if let Some(slot) = out.get_mut(start + 22..start + 26) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
}

/// Samples (at 48 kHz) of one Opus packet, from its TOC byte and, for code 3, its frame count
/// byte (RFC 6716 §3.1).
pub fn packet_samples(toc: u8, second: Option<u8>) -> Result<u64, JoinError> {
    let config = usize::from(toc >> 3);
    let frame: u64 = match config {
        0..=11 => [480, 960, 1920, 2880].get(config % 4).copied().unwrap_or(0),
        12..=15 => [480, 960].get(config % 2).copied().unwrap_or(0),
        _ => [120, 240, 480, 960].get(config % 4).copied().unwrap_or(0),
    };
    let count: u64 = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => {
            u64::from(second.ok_or_else(|| bad("a code 3 packet has no frame count byte"))? & 0x3F)
        }
    };
    let samples = frame * count;
    if samples > 5760 {
        return Err(bad(format!(
            "a packet lasts {samples} samples, over Opus' 120 ms"
        )));
    }
    Ok(samples)
}

/// An Ogg Opus file, parsed.
#[derive(Debug, Clone)]
pub struct OpusStream<'a> {
    pub pages: Vec<Page<'a>>,
    /// Pages holding `OpusHead` and `OpusTags` (the first ones).
    pub header_pages: usize,
    pub channels: u8,
    pub mapping_family: u8,
    /// For each page: samples decoded through the last packet ending on it, or `None` if no
    /// packet ends on it (header packets count 0).
    pub page_ends: Vec<Option<u64>>,
    /// Samples of all audio packets.
    pub total_samples: u64,
}

impl OpusStream<'_> {
    /// The granule of the last page that has one.
    pub fn final_granule(&self) -> Option<u64> {
        self.pages
            .iter()
            .rev()
            .map(|p| p.granule)
            .find(|g| *g != NO_GRANULE)
    }

    /// Samples an EOS page trims off the end.
    pub fn end_trim(&self) -> u64 {
        self.final_granule()
            .map_or(0, |g| self.total_samples.saturating_sub(g))
    }
}

/// Parses an Ogg Opus file: pages, headers and the duration of every packet.
pub fn parse(bytes: &[u8]) -> Result<OpusStream<'_>, JoinError> {
    let pages = pages(bytes)?;
    let first = pages.first().ok_or_else(|| bad("no Ogg pages"))?;
    let serial = first.serial;
    let (channels, mapping_family) = opus_head(first)?;
    let mut walk = PacketWalk::default();
    let mut page_ends = Vec::with_capacity(pages.len());
    for (index, page) in pages.iter().enumerate() {
        if page.serial != serial {
            return Err(bad(
                "more than one logical stream (chained or multiplexed Ogg)",
            ));
        }
        page_ends.push(walk.page(index, page)?);
    }
    if walk.in_packet.is_some() {
        return Err(bad("the stream ends inside a packet"));
    }
    let header_pages = walk.header_pages.ok_or_else(|| bad("no OpusTags"))?;
    Ok(OpusStream {
        pages,
        header_pages,
        channels,
        mapping_family,
        page_ends,
        total_samples: walk.samples,
    })
}

/// The channel count and channel mapping family of the `OpusHead` on the first page, which
/// must be a BOS page.
fn opus_head(first: &Page<'_>) -> Result<(u8, u8), JoinError> {
    if first.header_type & FLAG_BOS == 0 || first.body.get(..8) != Some(b"OpusHead") {
        return Err(bad("the first page is not a BOS page with OpusHead"));
    }
    let head = first.body;
    if head.len() < 19 {
        return Err(bad("OpusHead is shorter than 19 bytes"));
    }
    let channels = *head.get(9).ok_or_else(|| bad("short OpusHead"))?;
    le_u16(head, 10).ok_or_else(|| bad("short OpusHead"))?;
    let mapping_family = *head.get(18).ok_or_else(|| bad("short OpusHead"))?;
    Ok((channels, mapping_family))
}

/// Follows the packets of one stream page by page, adding up the samples of audio packets.
#[derive(Default)]
struct PacketWalk {
    /// Packets ended so far; the first two are `OpusHead` and `OpusTags`.
    packets: usize,
    /// The first bytes (up to 8) of the packet in progress, if one is.
    in_packet: Option<Vec<u8>>,
    samples: u64,
    /// Pages through the one `OpusTags` ends on, once it has.
    header_pages: Option<usize>,
}

impl PacketWalk {
    /// Walks the page at `index`; returns the samples through the last packet ending on it, or
    /// `None` if no packet ends on it.
    fn page(&mut self, index: usize, page: &Page<'_>) -> Result<Option<u64>, JoinError> {
        if page.continued() != self.in_packet.is_some() {
            return Err(bad(format!(
                "page {} breaks packet continuity",
                page.sequence
            )));
        }
        let mut end = None;
        let mut offset = 0usize;
        for segment in page.segments {
            let len = usize::from(*segment);
            let data = page.body.get(offset..offset + len).unwrap_or(&[]);
            offset += len;
            // A lacing value of 255 means the packet goes on in the next segment.
            if !self.segment(data, len < 255)? {
                continue;
            }
            end = Some(self.samples);
            if self.packets == 2 {
                if offset != page.body.len() {
                    return Err(bad("audio data starts on the OpusTags page"));
                }
                self.header_pages = Some(index + 1);
            }
        }
        Ok(end)
    }

    /// Adds one segment to the packet in progress; returns whether it ended the packet.
    fn segment(&mut self, data: &[u8], ends_packet: bool) -> Result<bool, JoinError> {
        let mut head = self.in_packet.take().unwrap_or_default();
        let wanted = 8usize.saturating_sub(head.len()).min(data.len());
        head.extend_from_slice(data.get(..wanted).unwrap_or(&[]));
        if !ends_packet {
            self.in_packet = Some(head);
            return Ok(false);
        }
        self.packet_ended(&head)?;
        Ok(true)
    }

    /// Counts a packet that ended, given its first bytes: the second must be `OpusTags`, and
    /// every one after it is audio.
    fn packet_ended(&mut self, head: &[u8]) -> Result<(), JoinError> {
        match self.packets {
            0 => {}
            1 if head.starts_with(b"OpusTags") => {}
            1 => return Err(bad("the second packet is not OpusTags")),
            _ => {
                if let Some(toc) = head.first() {
                    self.samples += packet_samples(*toc, head.get(1).copied())?;
                }
            }
        }
        self.packets += 1;
        Ok(())
    }
}

/// Joins Ogg Opus parts into one stream (see the module documentation).
pub fn join(parts: &[Vec<u8>]) -> Result<Vec<u8>, JoinError> {
    let streams = parts
        .iter()
        .enumerate()
        .map(|(i, p)| parse(p).map_err(|e| e.in_part(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let first = streams.first().ok_or(JoinError::NoParts)?;
    let mut joined = Joined {
        out: Vec::with_capacity(parts.iter().map(Vec::len).sum()),
        serial: first.pages.first().map_or(0, |p| p.serial),
        sequence: first.pages.first().map_or(0, |p| p.sequence),
        offset: 0,
    };
    let last_part = streams.len() - 1;
    for (i, stream) in streams.iter().enumerate() {
        same_layout(first, stream).map_err(|e| e.in_part(i))?;
        joined.append(stream, i == 0, i == last_part);
    }
    Ok(joined.out)
}

/// Refuses a part whose channel count or mapping family differs from the first part's, whose
/// `OpusHead` is the only one kept.
fn same_layout(first: &OpusStream<'_>, stream: &OpusStream<'_>) -> Result<(), JoinError> {
    if (stream.channels, stream.mapping_family) == (first.channels, first.mapping_family) {
        return Ok(());
    }
    Err(JoinError::mismatch(
        FORMAT,
        format!(
            "{} channel(s) with mapping family {} against {} channel(s) with mapping family {}",
            stream.channels, stream.mapping_family, first.channels, first.mapping_family
        ),
    ))
}

/// The joined stream as it is written: the first part's serial number, continuous sequence
/// numbers, and granules counted from the samples of the parts before.
struct Joined {
    out: Vec<u8>,
    serial: u32,
    /// The sequence number of the next page.
    sequence: u32,
    /// Samples of the parts appended so far.
    offset: u64,
}

impl Joined {
    /// Appends one part's pages: its header pages only if it is the first part; BOS on the very
    /// first page and EOS on the very last.
    fn append(&mut self, stream: &OpusStream<'_>, first_part: bool, last_part: bool) {
        let skip = if first_part { 0 } else { stream.header_pages };
        let last_page = stream.pages.len() - 1;
        for (index, (page, end)) in stream
            .pages
            .iter()
            .zip(&stream.page_ends)
            .enumerate()
            .skip(skip)
        {
            let is_header = index < stream.header_pages;
            let very_last = last_part && index == last_page;
            let mut flags = page.header_type & FLAG_CONTINUED;
            if first_part && index == 0 {
                flags |= FLAG_BOS;
            }
            if very_last {
                flags |= FLAG_EOS;
            }
            let granule = match end {
                _ if is_header => page.granule,
                // Only the last page may trim the end, and it keeps the last part's trimming.
                _ if very_last => {
                    (self.offset + stream.total_samples).saturating_sub(stream.end_trim())
                }
                None => NO_GRANULE,
                Some(samples) => self.offset + samples,
            };
            write_page(
                &mut self.out,
                flags,
                granule,
                self.serial,
                self.sequence,
                page.segments,
                page.body,
            );
            self.sequence = self.sequence.wrapping_add(1);
        }
        self.offset += stream.total_samples;
    }
}

/// Seconds of audio: the last granule position minus the pre-skip, at 48 kHz.
pub fn duration_seconds(bytes: &[u8]) -> Result<f64, JoinError> {
    let pages = pages(bytes)?;
    let head = pages.first().map(|p| p.body).unwrap_or(&[]);
    if head.get(..8) != Some(b"OpusHead") {
        return Err(bad("the first page has no OpusHead"));
    }
    let pre_skip = le_u16(head, 10).ok_or_else(|| bad("short OpusHead"))?;
    let last = pages
        .iter()
        .rev()
        .map(|p| p.granule)
        .find(|g| *g != NO_GRANULE)
        .unwrap_or(0);
    Ok(last.saturating_sub(u64::from(pre_skip)) as f64 / 48_000.0)
}

#[cfg(test)]
mod tests {
    use super::super::testutil;
    use super::*;

    const P1: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part1.opus");
    const P2: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part2.opus");
    const P3: &[u8] = include_bytes!("../../../../tests/fixtures/audio/part3.opus");

    #[test]
    fn crc_matches_real_pages() {
        // parse_page checks every CRC.
        let p = pages(P1).unwrap();
        assert!(p.len() >= 3);
        let mut rewritten = Vec::new();
        for page in &p {
            write_page(
                &mut rewritten,
                page.header_type,
                page.granule,
                page.serial,
                page.sequence,
                page.segments,
                page.body,
            );
        }
        assert_eq!(rewritten, P1);
    }

    #[test]
    fn parses_real_opus() {
        let s = parse(P1).unwrap();
        assert_eq!(s.header_pages, 2);
        assert_eq!(s.channels, 1);
        // Our packet durations agree with the encoder's granules on every non-final page.
        for (page, end) in s.pages.iter().zip(&s.page_ends).skip(2) {
            if page.header_type & FLAG_EOS == 0 {
                assert_eq!(Some(page.granule), *end);
            }
        }
        assert!(s.end_trim() < 960);
        let d = duration_seconds(P1).unwrap();
        // RFC 7845: last granule minus pre-skip; exactly the 0.63825 s of the source WAV.
        assert!((d - 0.63825).abs() < 1e-9, "{d}");
    }

    #[test]
    fn joins_real_parts() {
        let parts = vec![P1.to_vec(), P2.to_vec(), P3.to_vec()];
        let joined = join(&parts).unwrap();
        let streams: Vec<_> = parts.iter().map(|p| parse(p).unwrap()).collect();
        let j = parse(&joined).unwrap(); // checks every CRC and packet continuity
        let serial = j.pages[0].serial;
        assert_eq!(serial, streams[0].pages[0].serial);
        let audio_pages: usize = streams.iter().map(|s| s.pages.len() - s.header_pages).sum();
        assert_eq!(j.pages.len(), 2 + audio_pages);
        let mut last_granule = 0;
        for (n, page) in j.pages.iter().enumerate() {
            assert_eq!(page.serial, serial);
            assert_eq!(page.sequence as usize, n);
            assert_eq!(page.header_type & FLAG_BOS != 0, n == 0);
            assert_eq!(page.header_type & FLAG_EOS != 0, n == j.pages.len() - 1);
            if page.granule != NO_GRANULE {
                assert!(page.granule >= last_granule, "granules go back at page {n}");
                last_granule = page.granule;
            }
            if n >= 2 {
                assert!(!page.body.starts_with(b"OpusHead") && !page.body.starts_with(b"OpusTags"));
            }
        }
        let total: u64 = streams.iter().map(|s| s.total_samples).sum();
        assert_eq!(j.total_samples, total);
        assert_eq!(j.final_granule(), Some(total - streams[2].end_trim()));
        let expected: f64 = parts.iter().map(|p| duration_seconds(p).unwrap()).sum();
        let ours = duration_seconds(&joined).unwrap();
        testutil::assert_close(ours, expected, "opus duration from granules");
        if let Some(decoded) = testutil::ffmpeg_check(&joined, "opus", &[]) {
            testutil::assert_close(decoded, expected, "opus decoded duration");
            assert!(
                (decoded - ours).abs() < 0.03,
                "decoded {decoded} s, granules say {ours} s"
            );
        }
    }

    #[test]
    fn malformed_is_an_error() {
        assert!(parse(&[]).is_err());
        assert!(parse(&P1[..P1.len() - 1]).is_err(), "truncated");
        let mut bad_crc = P1.to_vec();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 0xFF;
        let err = parse(&bad_crc).unwrap_err();
        assert!(err.to_string().contains("CRC"), "{err}");
        // Only the header pages: no audio, but valid.
        let p = pages(P1).unwrap();
        let mut heads = Vec::new();
        for page in &p[..2] {
            write_page(
                &mut heads,
                page.header_type,
                page.granule,
                page.serial,
                page.sequence,
                page.segments,
                page.body,
            );
        }
        assert_eq!(parse(&heads).unwrap().total_samples, 0);
        assert!(
            parse(&heads[..p[0].body.len() + 28]).is_err(),
            "no OpusTags"
        );
        assert!(
            packet_samples(0xFF, Some(0x3F)).is_err(),
            "63 frames is too long"
        );
        assert!(packet_samples(0x03, None).is_err());
    }

    #[test]
    fn mismatched_channels_fail() {
        let p = pages(P2).unwrap();
        let mut stereo = Vec::new();
        for (n, page) in p.iter().enumerate() {
            let mut body = page.body.to_vec();
            if n == 0 {
                body[9] = 2;
            }
            write_page(
                &mut stereo,
                page.header_type,
                page.granule,
                page.serial,
                page.sequence,
                page.segments,
                &body,
            );
        }
        let err = join(&[P1.to_vec(), stereo]).unwrap_err();
        assert!(
            matches!(err, JoinError::Mismatch { part: 1, .. }),
            "{err:?}"
        );
    }
}
