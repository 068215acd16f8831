//! Fixed-size integers read out of stored values and wire formats, without
//! trusting their length: a read past the end is `None`, never a panic.

/// Reads a big-endian u32 at `at`.
pub(crate) fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(array_at(bytes, at)?))
}

/// Reads a little-endian u32 at `at`.
pub(crate) fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(array_at(bytes, at)?))
}

/// Reads a little-endian u16 at `at`.
pub(crate) fn le_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(array_at(bytes, at)?))
}

fn array_at<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Little-endian fields read off the front, in order.
pub(crate) struct Fields<'a>(pub &'a [u8]);

impl<'a> Fields<'a> {
    pub fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (field, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*field)
    }

    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (field, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(field)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    /// What is left after the fields read so far.
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_end() {
        assert_eq!(le_u32(&[1, 0, 0, 0, 9], 0), Some(1));
        assert_eq!(be_u32(&[0, 0, 0, 1], 0), Some(1));
        assert_eq!(le_u16(&[1, 2], 1), None);
        assert_eq!(le_u32(&[0; 4], usize::MAX), None);
        let mut f = Fields(&[2, 0, 3, 0, 0, 0, 7, 8]);
        assert_eq!(
            (f.u16(), f.u32(), f.bytes(1)),
            (Some(2), Some(3), Some(&[7u8][..]))
        );
        assert_eq!(f.rest(), &[8]);
        assert_eq!(f.u16(), None);
        assert_eq!(f.rest(), &[8], "a failed read takes nothing");
    }
}
