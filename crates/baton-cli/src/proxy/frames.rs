//! A watch over the HTTP/2 frames a client sends, read off the bytes on
//! their way to the `h2` crate (which does the parsing proper): frame
//! headers only, to catch a flood of SETTINGS frames, each of which must
//! be applied and acknowledged (CVE-2019-9515), and to know the last
//! stream the client opened (for baton's own GOAWAY). PING frames are not
//! counted: gRPC clients send one per burst of data they receive, to
//! measure the path (grpc-go's BDP estimator), and `h2` answers one at a
//! time, reading no further while an answer cannot be written. Pure.

use std::time::{Duration, Instant};

/// SETTINGS frames (not acknowledgements) a client may send within
/// [`WINDOW`]; one more is a flood.
pub const MAX_CONTROL: u32 = 100;

/// The window [`MAX_CONTROL`] counts over.
pub const WINDOW: Duration = Duration::from_secs(10);

const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;

/// Where in the client's bytes the watch is.
#[derive(Debug)]
pub struct FrameWatch {
    /// The frame header being read, and how much of it came.
    head: [u8; 9],
    have: usize,
    /// Bytes still to pass before the next frame header (a payload, or
    /// the preface).
    skip: usize,
    window_start: Option<Instant>,
    control: u32,
    /// The highest stream the client opened.
    pub last_stream: u32,
    /// Set once the client sent too many control frames.
    pub flood: bool,
}

impl FrameWatch {
    /// A watch whose first `preface` bytes are the connection preface.
    pub fn new(preface: usize) -> FrameWatch {
        FrameWatch {
            head: [0; 9],
            have: 0,
            skip: preface,
            window_start: None,
            control: 0,
            last_stream: 0,
            flood: false,
        }
    }

    /// Looks at `bytes`, the next the client sent; returns whether it is
    /// flooding.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                self.header(now);
            }
        }
        self.flood
    }

    fn header(&mut self, now: Instant) {
        let h = self.head;
        self.skip = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if kind == HEADERS && stream % 2 == 1 {
            self.last_stream = self.last_stream.max(stream);
        }
        if kind == SETTINGS && flags & ACK == 0 {
            let start = *self.window_start.get_or_insert(now);
            if now.duration_since(start) >= WINDOW {
                self.window_start = Some(now);
                self.control = 0;
            }
            self.control += 1;
            if self.control > MAX_CONTROL {
                self.flood = true;
            }
        }
    }
}

/// baton's GOAWAY for a client that flooded: ENHANCE_YOUR_CALM, naming
/// the last stream it opened.
pub fn goaway_calm(last_stream: u32) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[2] = 8; // length
    out[3] = 0x7; // GOAWAY
    out[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
    out[13..17].copy_from_slice(&0xbu32.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: u8 = 0x6;

    fn frame(kind: u8, flags: u8, stream: u32, len: usize) -> Vec<u8> {
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        // A payload that looks like frame headers, to catch a watch that
        // loses its place.
        out.extend((0..len).map(|i| [0x00, 0x00, 0x00, SETTINGS][i % 4]));
        out
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn a_flood_of_settings_is_caught_and_acks_and_pings_are_not_counted() {
        let now = Instant::now();
        let mut w = FrameWatch::new(24);
        assert!(!w.feed(&[b'P'; 24], now));
        for _ in 0..MAX_CONTROL {
            assert!(!w.feed(&frame(SETTINGS, 0, 0, 0), now));
            assert!(!w.feed(&frame(SETTINGS, ACK, 0, 0), now));
            assert!(!w.feed(&frame(PING, 0, 0, 8), now));
        }
        assert!(w.feed(&frame(SETTINGS, 0, 0, 6), now));

        // Spread over time, as window updates are, they never are a flood.
        let mut w = FrameWatch::new(0);
        for i in 0..10 * MAX_CONTROL {
            let at = now + WINDOW * (i / (MAX_CONTROL / 2));
            assert!(!w.feed(&frame(SETTINGS, 0, 0, 6), at), "settings {i}");
        }
    }

    #[test]
    fn seeded_fuzz_any_split_of_the_bytes_reads_the_same_frames() {
        let seed = std::env::var("BATON_FUZZ_SEED")
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0x5eed_f4a3);
        let mut rng = Rng(seed | 1);
        let now = Instant::now();
        for case in 0..300 {
            // A random conversation and what it holds.
            let mut bytes = vec![b'P'; 24];
            let (mut control, mut last) = (0u32, 0u32);
            for _ in 0..rng.below(250) {
                let kind = [0u8, HEADERS, 0x3, SETTINGS, PING, 0x8, 0x9][rng.below(7) as usize];
                let flags = rng.below(2) as u8;
                let stream = rng.below(50) as u32;
                let len = if rng.below(20) == 0 {
                    rng.below(20_000)
                } else {
                    rng.below(40)
                } as usize;
                if kind == SETTINGS && flags & ACK == 0 {
                    control += 1;
                }
                if kind == HEADERS && stream % 2 == 1 {
                    last = last.max(stream);
                }
                bytes.extend(frame(kind, flags, stream, len));
            }
            // Fed in random pieces.
            let mut w = FrameWatch::new(24);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(30) as usize).min(rest.len());
                w.feed(&rest[..n], now);
                rest = &rest[n..];
            }
            assert_eq!(w.last_stream, last, "case {case} (seed {seed:#x})");
            assert_eq!(
                w.flood,
                control > MAX_CONTROL,
                "case {case} (seed {seed:#x})"
            );
            assert_eq!((w.have, w.skip), (0, 0), "case {case}: ends between frames");
        }
    }

    #[test]
    fn the_goaway_is_well_formed() {
        let g = goaway_calm(7);
        assert_eq!(&g[..9], &[0, 0, 8, 7, 0, 0, 0, 0, 0]);
        assert_eq!(u32::from_be_bytes([g[9], g[10], g[11], g[12]]), 7);
        assert_eq!(u32::from_be_bytes([g[13], g[14], g[15], g[16]]), 0xb);
    }
}
