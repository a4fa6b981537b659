//! Length-prefixed, size-bounded frames: the only way bytes become messages.
//!
//! A frame is `u32` big-endian payload length, then the payload. The decoder is a pure
//! buffer: push whatever the transport delivered, then pull whole frames. It never holds more
//! than one frame's worth of bytes beyond what it was given, and it refuses a length prefix
//! larger than its limit before reading the body, so a hostile peer cannot make it allocate.

/// Bytes in the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Why the byte stream cannot be framed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A frame announced more bytes than the limit allows.
    #[error("frame of {announced_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge {
        /// What the length prefix announced.
        announced_bytes: usize,
        /// The configured limit.
        max_bytes: usize,
    },
    /// A zero-length frame carries no version byte and is never valid.
    #[error("empty frame")]
    Empty,
}

/// Prepends the length prefix to `payload`.
pub fn encode_frame(payload: &[u8], max_frame_bytes: usize) -> Result<Vec<u8>, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    if payload.len() > max_frame_bytes {
        return Err(FrameError::TooLarge {
            announced_bytes: payload.len(),
            max_bytes: max_frame_bytes,
        });
    }
    let mut out = Vec::with_capacity(LENGTH_PREFIX_BYTES + payload.len());
    // The limit is far below u32::MAX (checked in config validation), so this cannot truncate.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reassembles frames from a byte stream delivered in arbitrary pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max_frame_bytes: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame_bytes`.
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { buffer: Vec::new(), max_frame_bytes }
    }

    /// Appends bytes received from the transport.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole frame's payload, `Ok(None)` if more bytes are needed.
    ///
    /// After an error the stream is unusable: the caller closes the connection.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(prefix) = self.buffer.get(..LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let mut length_bytes = [0u8; LENGTH_PREFIX_BYTES];
        length_bytes.copy_from_slice(prefix);
        let length = u32::from_be_bytes(length_bytes) as usize;
        if length == 0 {
            return Err(FrameError::Empty);
        }
        if length > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                announced_bytes: length,
                max_bytes: self.max_frame_bytes,
            });
        }
        let end = LENGTH_PREFIX_BYTES + length;
        if self.buffer.len() < end {
            return Ok(None);
        }
        let payload = self.buffer[LENGTH_PREFIX_BYTES..end].to_vec();
        self.buffer.drain(..end);
        if self.buffer.is_empty() && self.buffer.capacity() > 2 * LENGTH_PREFIX_BYTES + 64 * 1024 {
            // Give back memory after a large frame so idle connections stay small.
            self.buffer = Vec::new();
        }
        Ok(Some(payload))
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&(1_000_000u32).to_be_bytes());
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge { announced_bytes: 1_000_000, max_bytes: 1024 })
        );
    }

    #[test]
    fn empty_frames_are_refused_both_ways() {
        assert_eq!(encode_frame(&[], 10), Err(FrameError::Empty));
        let mut decoder = FrameDecoder::new(10);
        decoder.push(&[0, 0, 0, 0]);
        assert_eq!(decoder.next_frame(), Err(FrameError::Empty));
    }

    proptest! {
        #[test]
        fn frames_survive_any_split_of_the_stream(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 1..20),
            cuts in prop::collection::vec(1usize..50, 1..100),
        ) {
            let stream: Vec<u8> = payloads.iter().flat_map(|p| encode_frame(p, 300).unwrap()).collect();
            let mut decoder = FrameDecoder::new(300);
            let mut decoded = Vec::new();
            let mut offset = 0;
            for cut in cuts.iter().cycle() {
                if offset >= stream.len() { break; }
                let end = (offset + cut).min(stream.len());
                decoder.push(&stream[offset..end]);
                offset = end;
                while let Some(frame) = decoder.next_frame().unwrap() {
                    decoded.push(frame);
                }
            }
            prop_assert_eq!(decoded, payloads);
            prop_assert_eq!(decoder.buffered_bytes(), 0);
        }
    }
}
