//! The frame codec on arbitrary bytes, fed in arbitrary pieces: it never panics, never yields a
//! frame over its limit, and yields the same frames however the bytes are split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qhotplug_qmp::codec::{FrameCodec, QmpCodec};
use tokio_util::codec::Decoder;

const LIMIT: usize = 256;

fn frames(data: &[u8], cuts: &[usize]) -> Vec<Result<Vec<u8>, String>> {
    let mut codec = FrameCodec::new(LIMIT);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&data.len())) {
        let cut = cut.clamp(at, data.len());
        buf.extend_from_slice(&data[at..cut]);
        at = cut;
        while let Some(item) = codec.decode(&mut buf).unwrap() {
            out.push(item.map(|f| f.to_vec()).map_err(|e| e.to_string()));
        }
    }
    while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
        out.push(item.map(|f| f.to_vec()).map_err(|e| e.to_string()));
    }
    out
}

fuzz_target!(|input: (Vec<u8>, Vec<u16>)| {
    let (data, cuts) = input;
    let mut cuts: Vec<usize> = cuts.into_iter().map(usize::from).collect();
    cuts.sort_unstable();
    let whole = frames(&data, &[]);
    let split = frames(&data, &cuts);
    assert_eq!(whole, split, "frames depend on how the bytes were split");
    for frame in whole.iter().flatten() {
        assert!(frame.len() <= LIMIT, "a frame over the limit");
        assert!(!frame.contains(&b'\n'), "a newline inside a frame");
    }
    // The message layer on top never panics either.
    let mut codec = QmpCodec::new(LIMIT);
    let mut buf = BytesMut::from(&data[..]);
    while let Some(item) = codec.decode_eof(&mut buf).unwrap() {
        let _ = item;
    }
});
