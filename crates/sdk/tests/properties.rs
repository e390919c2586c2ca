//! Property tests of the piece protocol's framing: whatever a peer writes, however the pipe
//! cuts it, the reader hands back its lines in order, never buffers more than its limit, and
//! reports an oversized line with enough of its start to tell whose it was.
//! `PROPTEST_CASES` sets how many cases run (`just fuzz` runs millions).

use piecework_sdk::protocol::{self, Frame, Read, Request};
use proptest::prelude::*;
use serde_json::{Value, json};

/// What the reader handed back for one line.
enum Got {
    Line(Vec<u8>),
    TooLong { bytes: usize, head: Vec<u8> },
}

/// Reads every frame of `bytes` through a buffer of `capacity` bytes, refusing lines over
/// `max`.
fn read_all(bytes: &[u8], capacity: usize, max: usize) -> Vec<Got> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(async {
            let mut reader = tokio::io::BufReader::with_capacity(capacity, bytes);
            let mut buf = Vec::new();
            let mut out = Vec::new();
            loop {
                match protocol::read_frame(&mut reader, &mut buf, max)
                    .await
                    .unwrap()
                {
                    Read::Frame => out.push(Got::Line(buf.clone())),
                    Read::TooLong { bytes, head } => out.push(Got::TooLong { bytes, head }),
                    Read::Closed => return out,
                }
            }
        })
}

/// Bytes with plenty of newlines among them.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(prop_oneof![3 => any::<u8>(), 1 => Just(b'\n')], 0..300)
}

proptest! {
    #[test]
    fn a_stream_reads_back_as_its_lines_whatever_the_cuts(
        bytes in stream(),
        capacity in 1usize..32,
        max in 1usize..100,
    ) {
        let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        // A stream ending in a newline has no line after it.
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let read = read_all(&bytes, capacity, max);
        prop_assert_eq!(read.len(), lines.len());
        for (line, got) in lines.iter().zip(&read) {
            match got {
                Got::Line(frame) => {
                    prop_assert!(line.len() <= max);
                    prop_assert_eq!(frame.as_slice(), *line);
                }
                Got::TooLong { bytes, head } => {
                    prop_assert!(line.len() > max);
                    prop_assert_eq!(*bytes, line.len());
                    prop_assert!(line.starts_with(head));
                    prop_assert!(head.len() >= (max + 1).min(64) && head.len() <= 64);
                }
            }
        }
    }

    #[test]
    fn any_line_is_a_frame_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(frame) = Frame::parse(&bytes) {
            // Whatever parsed answers its accessors without panicking.
            let _ = frame.params::<Value>();
            let _ = frame.outcome::<Value>();
        }
    }

    #[test]
    fn requests_round_trip_and_an_oversized_one_still_names_its_id(
        id in any::<u64>(),
        method in "[a-z_.]{1,20}",
        params in proptest::collection::btree_map("[a-z]{1,8}", ".{0,20}", 0..6),
        padding in 0usize..200,
    ) {
        let params = json!({ "fields": params, "padding": "x".repeat(padding) });
        let line = protocol::encode(&Request { id, method: &method, params: &params });
        prop_assert_eq!(line.last(), Some(&b'\n'));
        let frame = Frame::parse(&line[..line.len() - 1]).unwrap();
        prop_assert_eq!(frame.id, Some(id));
        prop_assert_eq!(frame.method.as_deref(), Some(method.as_str()));
        prop_assert_eq!(frame.params::<Value>().unwrap(), params);
        // What the reader keeps of a line over the limit is enough to answer its caller.
        let head = &line[..line.len().min(64)];
        prop_assert_eq!(protocol::id_in_head(head), Some(id));
    }
}
