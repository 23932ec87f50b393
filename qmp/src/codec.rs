//! Framing: QMP messages are single lines of JSON ending in CRLF.
//!
//! [`FrameCodec`] cuts a byte stream into lines with a bounded buffer; [`QmpCodec`] classifies each
//! line as a [`Message`]. A bad frame is an item (`Err(FrameError)`), never the end of the stream: the
//! next frame decodes as usual. Only I/O errors end a stream.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::command::Command;
use crate::error::FrameError;
use crate::message::{encode_request, Execution, Message};

/// The default frame limit: 16 MiB. QEMU's largest routine reply, `query-qmp-schema`, is ~200 KiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Splits a byte stream at `\n` (a preceding `\r` is dropped), with a bound on the frame length.
///
/// A frame longer than the limit yields one [`FrameError::TooLong`]; its bytes are discarded as they
/// arrive (the buffer never holds more than the limit plus one read), up to and including its newline.
/// Empty lines are skipped.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
    /// How far the current buffer has been searched for a newline already.
    scanned: usize,
    /// Inside an over-long frame: drop bytes until the next newline.
    discarding: bool,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec that accepts frames of at most `max_frame` bytes (line ending excluded).
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            scanned: 0,
            discarding: false,
        }
    }

    /// The frame limit, in bytes.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.trim_ascii()
}

impl Decoder for FrameCodec {
    type Item = Result<BytesMut, FrameError>;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        loop {
            let newline = memchr::memchr(b'\n', &buf[self.scanned..]).map(|i| i + self.scanned);
            match (self.discarding, newline) {
                (true, Some(end)) => {
                    buf.advance(end + 1);
                    self.scanned = 0;
                    self.discarding = false;
                }
                (true, None) => {
                    buf.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                (false, Some(end)) => {
                    let mut line = buf.split_to(end + 1);
                    self.scanned = 0;
                    // The limit is on the line as it came (its ending excluded), whitespace and
                    // all: the same bytes the branch below counts while the newline has not
                    // arrived, so a frame is refused or not however the stream was cut.
                    let content = line.len() - 1 - usize::from(line.ends_with(b"\r\n"));
                    if content > self.max_frame {
                        return Ok(Some(Err(FrameError::TooLong {
                            limit: self.max_frame,
                        })));
                    }
                    let trimmed = trim_line(&line);
                    if trimmed.is_empty() {
                        continue;
                    }
                    // Cut the frame down to its trimmed bytes without copying.
                    let offset = trimmed.as_ptr() as usize - line.as_ptr() as usize;
                    let len = trimmed.len();
                    line.advance(offset);
                    line.truncate(len);
                    return Ok(Some(Ok(line)));
                }
                (false, None) => {
                    // One byte of slack for a `\r` whose `\n` has not arrived yet.
                    if buf.len() > self.max_frame + 1 {
                        buf.clear();
                        self.scanned = 0;
                        self.discarding = true;
                        return Ok(Some(Err(FrameError::TooLong {
                            limit: self.max_frame,
                        })));
                    }
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        if let Some(item) = self.decode(buf)? {
            return Ok(Some(item));
        }
        self.scanned = 0;
        let was_discarding = std::mem::take(&mut self.discarding);
        let rest = buf.split();
        if was_discarding || trim_line(&rest).is_empty() {
            return Ok(None);
        }
        Ok(Some(Err(FrameError::Incomplete { len: rest.len() })))
    }
}

/// Decodes QMP [`Message`]s and encodes typed commands (as in-band `execute` requests).
#[derive(Debug, Clone, Default)]
pub struct QmpCodec {
    frames: FrameCodec,
}

impl QmpCodec {
    /// A codec with the given frame limit.
    pub fn new(max_frame: usize) -> Self {
        Self {
            frames: FrameCodec::new(max_frame),
        }
    }
}

impl Decoder for QmpCodec {
    type Item = Result<Message, FrameError>;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        Ok(self
            .frames
            .decode(buf)?
            .map(|frame| frame.and_then(|f| Message::from_slice(&f))))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        Ok(self
            .frames
            .decode_eof(buf)?
            .map(|frame| frame.and_then(|f| Message::from_slice(&f))))
    }
}

impl<C: Command> Encoder<&C> for QmpCodec {
    type Error = std::io::Error;

    fn encode(&mut self, command: &C, dst: &mut BytesMut) -> Result<(), Self::Error> {
        let mut out = Vec::new();
        encode_request(&mut out, C::NAME, command, Execution::InBand)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        dst.extend_from_slice(&out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(codec: &mut FrameCodec, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                out.push(item.map(|b| b.to_vec()).map_err(|e| e.to_string()));
            }
        }
        while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            out.push(item.map(|b| b.to_vec()).map_err(|e| e.to_string()));
        }
        out
    }

    #[test]
    fn crlf_lf_and_several_frames_in_one_read() {
        let mut c = FrameCodec::default();
        let got = decode_all(&mut c, &[b"{\"a\":1}\r\n{\"b\":2}\n\r\n  \n{\"c\":3}\r\n"]);
        assert_eq!(
            got,
            vec![
                Ok(b"{\"a\":1}".to_vec()),
                Ok(b"{\"b\":2}".to_vec()),
                Ok(b"{\"c\":3}".to_vec())
            ]
        );
    }

    #[test]
    fn one_frame_split_at_every_byte() {
        let frame = b"{\"return\": {\"status\": \"running\"}}\r\n";
        let chunks: Vec<&[u8]> = frame.chunks(1).collect();
        let got = decode_all(&mut FrameCodec::default(), &chunks);
        assert_eq!(got, vec![Ok(frame[..frame.len() - 2].to_vec())]);
    }

    #[test]
    fn over_long_frame_is_an_error_naming_the_limit_and_the_next_frame_decodes() {
        let mut c = FrameCodec::new(8);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"0123456789abcdef");
        let err = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
        assert_eq!(err.to_string(), "frame exceeds the limit of 8 bytes");
        assert!(buf.is_empty(), "discarded bytes are not kept");
        // The rest of the long frame keeps being discarded, without a second error.
        for _ in 0..1000 {
            buf.extend_from_slice(b"ghijklmnopqrstuv");
            assert!(c.decode(&mut buf).unwrap().is_none());
            assert!(buf.len() <= 16);
        }
        buf.extend_from_slice(b"end\r\n{\"x\":1}\r\n");
        assert_eq!(
            &c.decode(&mut buf).unwrap().unwrap().unwrap()[..],
            b"{\"x\":1}"
        );
    }

    #[test]
    fn frame_at_exactly_the_limit_passes_and_one_past_fails() {
        let got = decode_all(
            &mut FrameCodec::new(7),
            &[b"{\"a\":1}\r\n", b"{\"ab\":1}\r\n"],
        );
        assert_eq!(got[0], Ok(b"{\"a\":1}".to_vec()));
        assert_eq!(got[1], Err("frame exceeds the limit of 7 bytes".into()));
        // A CR that arrives before its LF does not count against the limit.
        let got = decode_all(&mut FrameCodec::new(7), &[b"{\"a\":1}\r", b"\n"]);
        assert_eq!(got, vec![Ok(b"{\"a\":1}".to_vec())]);
    }

    #[test]
    fn padding_counts_against_the_limit_however_the_bytes_are_cut() {
        // Found by the fuzzer: 7 bytes of frame in 20 of whitespace were refused when the bytes
        // came in pieces (the bytes held before the newline passed the limit) and passed when they
        // came at once (the trimmed frame was measured). The line as it came is what counts.
        let line = b"      {\"a\":1}       \r\n";
        let whole = decode_all(&mut FrameCodec::new(7), &[line]);
        let cut: Vec<&[u8]> = line.chunks(3).collect();
        let split = decode_all(&mut FrameCodec::new(7), &cut);
        assert_eq!(
            whole,
            vec![Err("frame exceeds the limit of 7 bytes".to_owned())]
        );
        assert_eq!(split, whole);
        // Within the limit, padding and all, it is trimmed as before.
        let got = decode_all(&mut FrameCodec::new(20), &[line]);
        assert_eq!(got, vec![Ok(b"{\"a\":1}".to_vec())]);
    }

    #[test]
    fn partial_tail_at_eof_is_reported() {
        let got = decode_all(&mut FrameCodec::default(), &[b"{\"a\":1}\r\n{\"b\""]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1], Err("stream ended inside a frame (4 bytes)".into()));
    }

    #[test]
    fn malformed_json_is_reported_and_skipped() {
        let mut c = QmpCodec::default();
        let mut buf = BytesMut::from(
            &b"{\"return\": {}}\r\n{garbage\r\n{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 0}}\r\n"[..],
        );
        assert!(matches!(
            c.decode(&mut buf).unwrap(),
            Some(Ok(Message::Reply(_)))
        ));
        assert!(matches!(
            c.decode(&mut buf).unwrap(),
            Some(Err(FrameError::Malformed { .. }))
        ));
        assert!(matches!(
            c.decode(&mut buf).unwrap(),
            Some(Ok(Message::Event(_)))
        ));
        assert!(c.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn encodes_typed_commands_compactly() {
        let mut c = QmpCodec::default();
        let mut dst = BytesMut::new();
        c.encode(&crate::command::QueryStatus, &mut dst).unwrap();
        assert_eq!(&dst[..], b"{\"execute\":\"query-status\"}\r\n");
    }

    fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
        let frame = prop_oneof![
            Just(b"{\"return\": {}}".to_vec()),
            Just(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}".to_vec()),
            Just(b"{\"event\": \"DEVICE_DELETED\", \"data\": {\"device\": \"d1\", \"path\": \"/machine/peripheral/d1\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}".to_vec()),
            Just(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\\r\\n\"}}".to_vec()),
            Just(b"{broken".to_vec()),
            "[a-z\"{}:, ]{0,40}".prop_map(|s| s.into_bytes()),
        ];
        let ending = prop_oneof![Just(&b"\r\n"[..]), Just(&b"\n"[..])];
        proptest::collection::vec((frame, ending), 0..20).prop_map(|frames| {
            let mut out = Vec::new();
            for (f, e) in frames {
                out.extend_from_slice(&f);
                out.extend_from_slice(e);
            }
            out
        })
    }

    fn summarize(items: Vec<Result<Message, FrameError>>) -> Vec<String> {
        items
            .into_iter()
            .map(|i| match i {
                Ok(Message::Greeting(g)) => format!("greeting {:?}", g),
                Ok(Message::Reply(r)) => format!(
                    "reply {:?} {:?}",
                    r.id,
                    r.result.map(|v| v.get().to_owned())
                ),
                Ok(Message::Event(e)) => format!("event {:?}", e),
                Err(e) => format!("error {e}"),
            })
            .collect()
    }

    fn decode_stream(stream: &[u8], cuts: &[usize]) -> Vec<Result<Message, FrameError>> {
        let mut codec = QmpCodec::new(64);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut last = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            buf.extend_from_slice(&stream[last..cut]);
            last = cut;
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                out.push(item);
            }
        }
        while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
            out.push(item);
        }
        out
    }

    proptest! {
        #[test]
        fn split_streams_decode_like_unsplit(stream in stream_strategy(), raw_cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..30)) {
            let mut cuts: Vec<usize> = raw_cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.sort_unstable();
            let whole = summarize(decode_stream(&stream, &[]));
            let split = summarize(decode_stream(&stream, &cuts));
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn buffer_stays_bounded_for_any_input(data in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..100) {
            let mut codec = FrameCodec::new(32);
            let mut buf = BytesMut::new();
            for piece in data.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(item) = codec.decode(&mut buf).unwrap() {
                    if let Ok(frame) = item { prop_assert!(frame.len() <= 32); }
                }
                prop_assert!(buf.len() <= 33 + chunk);
            }
        }
    }
}
