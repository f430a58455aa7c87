//! SPDY/3.1 pod exec, for kubectl before 1.30 (which upgrades `POST …/exec` to `SPDY/3.1`
//! rather than to a WebSocket).
//!
//! Two layers. The **codec** ([`Codec`]) turns bytes into [`Frame`]s and back: the SPDY/3 framing
//! (control frames with a version and a type, data frames with a stream id) and the header blocks
//! of SYN_STREAM, SYN_REPLY and HEADERS, which are zlib streams — one per direction for the whole
//! connection, sync-flushed after every block. The client's blocks are compressed with the
//! SPDY/3 preset [`DICTIONARY`]; flate2's pure-Rust backend cannot be given one, so [`Inflater`]
//! reads the zlib header itself and inflates the raw deflate data with miniz_oxide into an output
//! history that starts with the dictionary. The server's own blocks are an ordinary zlib stream
//! without a dictionary (no FDICT flag), which a SPDY peer — Go's `zlib.NewReaderDict` in kubectl —
//! reads as it is. The **session** ([`serve_exec`]) is what the API server does with an upgraded
//! exec: the client opens one stream per channel (`streamtype` `error`, `stdin`, `stdout`,
//! `stderr`, `resize`), each answered by a SYN_REPLY; once every stream the query asked for is
//! open, the fake cluster runs the command (the same call the WebSocket path makes), the server
//! writes stdout and stderr as DATA frames, the `v4.channel.k8s.io` `Status` on the error stream,
//! FIN on each, then GOAWAY, and waits for the client to close.
//!
//! Key decisions: only `v4.channel.k8s.io` is spoken over SPDY (every kubectl since 1.5 offers
//! it; v1–v3 cannot carry an exit code); stdin and resize data are read and dropped, as the fake
//! cluster's commands take no input; flow control (WINDOW_UPDATE, SETTINGS) is ignored in both
//! directions, as kubectl's spdystream does. Bad input — a malformed frame, an unknown stream
//! type, a header block that does not inflate — closes the connection with a warning; nothing
//! here panics on what a client sends.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blockwise_engine::item::ItemKey;
use blockwise_engine::ports::{Cluster, ExecResult};
use flate2::{Compress, Compression, FlushCompress};
use miniz_oxide::inflate::core::inflate_flags::{TINFL_FLAG_HAS_MORE_INPUT, TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF};
use miniz_oxide::inflate::core::DecompressorOxide;
use miniz_oxide::inflate::TINFLStatus;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::fake::FakeCluster;

/// The one exec subprotocol served over SPDY.
pub const PROTOCOL: &str = "v4.channel.k8s.io";

/// The SPDY version in every control frame.
const VERSION: u16 = 3;
/// Largest frame payload accepted from a client, in bytes (the wire allows 16 MiB; kubectl's
/// header blocks are tens of bytes, its stdin frames at most 32 KiB).
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 1 << 20;
/// Largest DATA payload the server writes in one frame, in bytes.
pub const DATA_FRAME_BYTES_MAX: usize = 32 * 1024;
/// Decompressed header bytes one connection may send in all, in bytes: the inflater keeps its
/// whole output as the deflate window, so this bounds its memory.
pub const HEADER_HISTORY_BYTES_MAX: usize = 1 << 20;
/// Name/value pairs in one header block.
pub const HEADER_PAIRS_MAX: u32 = 64;
/// How long the client has to open every stream the exec asked for, in milliseconds (the
/// kubelet's default stream creation timeout).
pub const STREAM_CREATION_MS_MAX: u64 = 30_000;
/// How long the server waits for the client to close after its GOAWAY, in milliseconds.
pub const DRAIN_MS_MAX: u64 = 30_000;

/// Control frame types (SPDY/3 §2.6).
mod kind {
    pub const SYN_STREAM: u16 = 1;
    pub const SYN_REPLY: u16 = 2;
    pub const RST_STREAM: u16 = 3;
    pub const SETTINGS: u16 = 4;
    pub const PING: u16 = 6;
    pub const GOAWAY: u16 = 7;
    pub const HEADERS: u16 = 8;
    pub const WINDOW_UPDATE: u16 = 9;
}

const FLAG_FIN: u8 = 0x01;
const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// RST_STREAM status: the stream was refused (an unknown or repeated stream type).
pub const RST_PROTOCOL_ERROR: u32 = 1;
/// GOAWAY status: a normal end.
pub const GOAWAY_OK: u32 = 0;

/// The header-name strings of the SPDY/3 preset dictionary, each written with a 4-byte big-endian
/// length before it. From the SPDY Protocol Draft 3 (Belshe, Peon; 2012), §2.6.10.1
/// "Compression" — the dictionary SPDY/3 and SPDY/3.1 peers prime their header zlib streams with.
const DICTIONARY_WORDS: [&str; 65] = [
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The rest of the SPDY/3 dictionary (same source), written as it is: status codes, reason
/// phrases, dates and common values.
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,",
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// The length of [`DICTIONARY`] in bytes.
pub const DICTIONARY_BYTES: usize = dictionary_len();

/// The SPDY/3 header compression dictionary (1423 bytes; its Adler-32, 0xe3c6a7c2, is the DICTID a
/// SPDY/3 client's first header block names).
pub const DICTIONARY: [u8; DICTIONARY_BYTES] = dictionary();

const fn dictionary_len() -> usize {
    let mut n = DICTIONARY_TAIL.len();
    let mut i = 0;
    while i < DICTIONARY_WORDS.len() {
        n += 4 + DICTIONARY_WORDS[i].len();
        i += 1;
    }
    n
}

const fn dictionary() -> [u8; DICTIONARY_BYTES] {
    let mut out = [0u8; DICTIONARY_BYTES];
    let mut at = 0;
    let mut i = 0;
    while i < DICTIONARY_WORDS.len() {
        let word = DICTIONARY_WORDS[i].as_bytes();
        let len = (word.len() as u32).to_be_bytes();
        let mut j = 0;
        while j < 4 {
            out[at] = len[j];
            at += 1;
            j += 1;
        }
        j = 0;
        while j < word.len() {
            out[at] = word[j];
            at += 1;
            j += 1;
        }
        i += 1;
    }
    let tail = DICTIONARY_TAIL.as_bytes();
    let mut j = 0;
    while j < tail.len() {
        out[at] = tail[j];
        at += 1;
        j += 1;
    }
    out
}

/// Adler-32 (RFC 1950 §8), which names a zlib preset dictionary.
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % MOD;
        b = (b + a) % MOD;
    }
    (b << 16) | a
}

/// What is wrong with what a client sent (or, for `Deflate`, with compressing a reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpdyError {
    /// A frame that breaks SPDY/3 framing.
    Malformed(String),
    /// A control frame of another SPDY version.
    Version(u16),
    /// A frame longer than [`FRAME_PAYLOAD_BYTES_MAX`].
    TooLarge(usize),
    /// A header block that does not inflate.
    Inflate(String),
    /// A decompressed header block that is not a SPDY/3 name/value block.
    HeaderBlock(String),
    /// Compressing a header block failed.
    Deflate(String),
}

impl fmt::Display for SpdyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpdyError::Malformed(m) => write!(f, "malformed SPDY frame: {m}"),
            SpdyError::Version(v) => write!(f, "SPDY version {v} control frame (only 3 is spoken)"),
            SpdyError::TooLarge(n) => {
                write!(f, "SPDY frame of {n} bytes (at most {FRAME_PAYLOAD_BYTES_MAX} accepted)")
            }
            SpdyError::Inflate(m) => write!(f, "header block does not inflate: {m}"),
            SpdyError::HeaderBlock(m) => write!(f, "bad header block: {m}"),
            SpdyError::Deflate(m) => write!(f, "compressing a header block: {m}"),
        }
    }
}

impl std::error::Error for SpdyError {}

/// A header block: lowercase names, each once, with their values (several joined by NUL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// The value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.0.len() as u32).to_be_bytes());
        for (name, value) in &self.0 {
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    fn decode(mut block: &[u8]) -> Result<Headers, SpdyError> {
        let bad = |m: String| SpdyError::HeaderBlock(m);
        let pairs = take_u32(&mut block).ok_or_else(|| bad("no pair count".into()))?;
        if pairs > HEADER_PAIRS_MAX {
            return Err(bad(format!("{pairs} pairs (at most {HEADER_PAIRS_MAX})")));
        }
        let mut out: Vec<(String, String)> = Vec::new();
        for i in 0..pairs {
            let name = take_string(&mut block).ok_or_else(|| bad(format!("pair {i}: truncated name")))?;
            let value = take_string(&mut block).ok_or_else(|| bad(format!("pair {i}: truncated value")))?;
            if name.is_empty() || name.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(bad(format!("pair {i}: header name {name:?} is empty or not lowercase")));
            }
            if out.iter().any(|(n, _)| *n == name) {
                return Err(bad(format!("header {name:?} appears twice")));
            }
            out.push((name, value));
        }
        if !block.is_empty() {
            return Err(bad(format!("{} bytes after the last pair", block.len())));
        }
        Ok(Headers(out))
    }
}

fn take_u32(buf: &mut &[u8]) -> Option<u32> {
    let (head, rest) = buf.split_first_chunk::<4>()?;
    *buf = rest;
    Some(u32::from_be_bytes(*head))
}

fn take_string(buf: &mut &[u8]) -> Option<String> {
    let len = usize::try_from(take_u32(buf)?).ok()?;
    if buf.len() < len {
        return None;
    }
    let (s, rest) = buf.split_at(len);
    *buf = rest;
    String::from_utf8(s.to_vec()).ok()
}

/// One SPDY/3 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a stream.
    SynStream {
        /// The new stream (odd when the client opens it).
        stream_id: u32,
        /// The stream it belongs to (server push), 0 for none.
        associated_id: u32,
        /// 0 (highest) to 7.
        priority: u8,
        /// The sender will send nothing more on it.
        fin: bool,
        /// The receiver may not send on it.
        unidirectional: bool,
        /// Its headers (`streamtype` for exec).
        headers: Headers,
    },
    /// Accepts a stream.
    SynReply {
        /// The stream accepted.
        stream_id: u32,
        /// The sender will send nothing more on it.
        fin: bool,
        /// Reply headers.
        headers: Headers,
    },
    /// Ends a stream abnormally.
    RstStream {
        /// The stream.
        stream_id: u32,
        /// Why (1 = PROTOCOL_ERROR, 5 = CANCEL, …).
        status: u32,
    },
    /// Connection settings: (flags, id, value) entries.
    Settings(Vec<(u8, u32, u32)>),
    /// A liveness check, answered with the same id.
    Ping(u32),
    /// The sender will open no more streams.
    GoAway {
        /// The last stream the sender accepted.
        last_good_stream_id: u32,
        /// 0 OK, 1 PROTOCOL_ERROR, 2 INTERNAL_ERROR.
        status: u32,
    },
    /// More headers for a stream.
    Headers {
        /// The stream.
        stream_id: u32,
        /// The sender will send nothing more on it.
        fin: bool,
        /// The headers.
        headers: Headers,
    },
    /// Flow control: the receiver may send `delta` more bytes on the stream.
    WindowUpdate {
        /// The stream.
        stream_id: u32,
        /// Bytes.
        delta: u32,
    },
    /// Stream data.
    Data {
        /// The stream.
        stream_id: u32,
        /// The last data on it from the sender.
        fin: bool,
        /// The bytes.
        data: Vec<u8>,
    },
    /// A control frame of a type SPDY/3 does not define; receivers ignore it.
    Unknown(u16),
}

/// The zlib stream of one direction's header blocks, inflated block by block. The output
/// history (the dictionary first, when the stream names it) is kept whole, because miniz_oxide's
/// non-wrapping output buffer is its deflate window.
#[derive(Default)]
pub struct Inflater {
    state: Box<DecompressorOxide>,
    /// The zlib header has been read.
    started: bool,
    /// The zlib stream ended (SPDY never ends it, so a later block is an error).
    ended: bool,
    /// Everything inflated so far; `history[..len]` is valid.
    history: Vec<u8>,
    len: usize,
    /// Where the connection's own output starts in `history` (after the dictionary, if any).
    base: usize,
}

impl Inflater {
    /// Inflates one header block (sync-flushed by the sender) and returns its plain bytes.
    pub fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let err = |m: String| SpdyError::Inflate(m);
        if self.ended {
            return Err(err("the header compression stream already ended".into()));
        }
        let mut rest = block;
        if !self.started {
            let [cmf, flg, after @ ..] = block else {
                return Err(err("a first header block shorter than the 2-byte zlib header".into()));
            };
            if cmf & 0x0f != 8 || cmf >> 4 > 7 || (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 != 0 {
                return Err(err(format!("not a zlib header: {cmf:#04x} {flg:#04x}")));
            }
            rest = after;
            if flg & 0x20 != 0 {
                let Some((id, after)) = rest.split_first_chunk::<4>() else {
                    return Err(err("the zlib header names a dictionary but has no DICTID".into()));
                };
                let id = u32::from_be_bytes(*id);
                let want = adler32(&DICTIONARY);
                if id != want {
                    return Err(err(format!("the zlib header names dictionary {id:#010x}, not SPDY/3's {want:#010x}")));
                }
                self.history.extend_from_slice(&DICTIONARY);
                self.len = DICTIONARY.len();
                self.base = self.len;
                rest = after;
            }
            self.started = true;
        }
        let start = self.len;
        let flags = TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF | TINFL_FLAG_HAS_MORE_INPUT;
        loop {
            if self.history.len() - self.len < 256 {
                let grow = (rest.len() * 4).max(1024);
                self.history.resize(self.len + grow, 0);
            }
            let (status, read, written) =
                miniz_oxide::inflate::core::decompress(&mut self.state, rest, &mut self.history, self.len, flags);
            self.len += written;
            rest = rest.get(read..).unwrap_or_default();
            if self.len - self.base > HEADER_HISTORY_BYTES_MAX {
                return Err(err(format!("more than {HEADER_HISTORY_BYTES_MAX} bytes of headers on one connection")));
            }
            match status {
                TINFLStatus::NeedsMoreInput if rest.is_empty() => break,
                TINFLStatus::HasMoreOutput => continue,
                TINFLStatus::Done => {
                    self.ended = true;
                    if !rest.is_empty() {
                        return Err(err(format!("{} bytes after the end of the zlib stream", rest.len())));
                    }
                    break;
                }
                TINFLStatus::NeedsMoreInput if read > 0 || written > 0 => continue,
                other => return Err(err(format!("{other:?}"))),
            }
        }
        Ok(self.history[start..self.len].to_vec())
    }
}

/// The zlib stream of the server's header blocks: one context, sync-flushed per block, no
/// dictionary.
pub struct Deflater(Compress);

impl Default for Deflater {
    fn default() -> Deflater {
        Deflater(Compress::new(Compression::default(), true))
    }
}

impl Deflater {
    /// Compresses one header block, flushed so that the peer can inflate it whole.
    pub fn deflate(&mut self, plain: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let mut out = Vec::with_capacity(plain.len() + 64);
        let in_start = self.0.total_in();
        loop {
            let consumed = usize::try_from(self.0.total_in() - in_start).unwrap_or(usize::MAX).min(plain.len());
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            self.0
                .compress_vec(&plain[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Deflate(e.to_string()))?;
            let consumed = usize::try_from(self.0.total_in() - in_start).unwrap_or(usize::MAX);
            // The flush is complete when all input is taken and the output did not fill up.
            if consumed >= plain.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// Frames from bytes and back, with one header compression context per direction.
#[derive(Default)]
pub struct Codec {
    inflater: Inflater,
    deflater: Deflater,
}

impl Codec {
    /// Takes one whole frame off the front of `buf`; `Ok(None)` when `buf` holds less than one.
    pub fn decode(&mut self, buf: &mut Vec<u8>) -> Result<Option<Frame>, SpdyError> {
        let Some(head) = buf.first_chunk::<8>() else {
            return Ok(None);
        };
        let head = *head;
        let len = usize::from(head[5]) << 16 | usize::from(head[6]) << 8 | usize::from(head[7]);
        if len > FRAME_PAYLOAD_BYTES_MAX {
            return Err(SpdyError::TooLarge(len));
        }
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let payload: Vec<u8> = buf.drain(..8 + len).skip(8).collect();
        let flags = head[4];
        let fin = flags & FLAG_FIN != 0;
        let word = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if word & 0x8000_0000 == 0 {
            if word == 0 {
                return Err(SpdyError::Malformed("a DATA frame on stream 0".into()));
            }
            return Ok(Some(Frame::Data { stream_id: word, fin, data: payload }));
        }
        let version = (word >> 16) as u16 & 0x7fff;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = word as u16;
        let p = payload.as_slice();
        let malformed = |what: &str| SpdyError::Malformed(format!("{what} with a {len}-byte payload"));
        let id_at = |at: usize| u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]) & 0x7fff_ffff;
        let word_at = |at: usize| u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
        let frame = match kind {
            kind::SYN_STREAM => {
                if len < 10 {
                    return Err(malformed("SYN_STREAM"));
                }
                let stream_id = id_at(0);
                if stream_id == 0 {
                    return Err(SpdyError::Malformed("SYN_STREAM for stream 0".into()));
                }
                let headers = Headers::decode(&self.inflater.inflate(&p[10..])?)?;
                Frame::SynStream {
                    stream_id,
                    associated_id: id_at(4),
                    priority: p[8] >> 5,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            kind::SYN_REPLY | kind::HEADERS => {
                if len < 4 {
                    return Err(malformed(if kind == kind::SYN_REPLY { "SYN_REPLY" } else { "HEADERS" }));
                }
                let stream_id = id_at(0);
                let headers = Headers::decode(&self.inflater.inflate(&p[4..])?)?;
                if kind == kind::SYN_REPLY {
                    Frame::SynReply { stream_id, fin, headers }
                } else {
                    Frame::Headers { stream_id, fin, headers }
                }
            }
            kind::RST_STREAM if len == 8 => Frame::RstStream { stream_id: id_at(0), status: word_at(4) },
            kind::RST_STREAM => return Err(malformed("RST_STREAM")),
            kind::SETTINGS => {
                if len < 4 || (len - 4) % 8 != 0 || (len - 4) / 8 != word_at(0) as usize {
                    return Err(malformed("SETTINGS"));
                }
                let entries = p[4..].chunks_exact(8).map(|e| (e[0], id24(e), word_of(&e[4..]))).collect();
                Frame::Settings(entries)
            }
            kind::PING if len == 4 => Frame::Ping(word_at(0)),
            kind::PING => return Err(malformed("PING")),
            kind::GOAWAY if len == 8 => Frame::GoAway { last_good_stream_id: id_at(0), status: word_at(4) },
            kind::GOAWAY => return Err(malformed("GOAWAY")),
            kind::WINDOW_UPDATE if len == 8 => {
                Frame::WindowUpdate { stream_id: id_at(0), delta: word_at(4) & 0x7fff_ffff }
            }
            kind::WINDOW_UPDATE => return Err(malformed("WINDOW_UPDATE")),
            other => Frame::Unknown(other),
        };
        Ok(Some(frame))
    }

    /// The bytes of `frame`, its header block (if any) compressed in this connection's context.
    pub fn encode(&mut self, frame: &Frame) -> Result<Vec<u8>, SpdyError> {
        let fin = |f: bool| if f { FLAG_FIN } else { 0 };
        let (kind, flags, payload) = match frame {
            Frame::Data { stream_id, fin: f, data } => {
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                out.push(fin(*f));
                out.extend_from_slice(&length24(data.len())?);
                out.extend_from_slice(data);
                return Ok(out);
            }
            Frame::SynStream { stream_id, associated_id, priority, fin: f, unidirectional, headers } => {
                let mut p = Vec::new();
                p.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                p.extend_from_slice(&(associated_id & 0x7fff_ffff).to_be_bytes());
                p.push((priority & 0x07) << 5);
                p.push(0);
                p.extend_from_slice(&self.deflater.deflate(&headers.encode())?);
                let flags = fin(*f) | if *unidirectional { FLAG_UNIDIRECTIONAL } else { 0 };
                (kind::SYN_STREAM, flags, p)
            }
            Frame::SynReply { stream_id, fin: f, headers } | Frame::Headers { stream_id, fin: f, headers } => {
                let mut p = (stream_id & 0x7fff_ffff).to_be_bytes().to_vec();
                p.extend_from_slice(&self.deflater.deflate(&headers.encode())?);
                let kind = if matches!(frame, Frame::SynReply { .. }) { kind::SYN_REPLY } else { kind::HEADERS };
                (kind, fin(*f), p)
            }
            Frame::RstStream { stream_id, status } => {
                (kind::RST_STREAM, 0, two_words(*stream_id & 0x7fff_ffff, *status))
            }
            Frame::Settings(entries) => {
                let mut p = (entries.len() as u32).to_be_bytes().to_vec();
                for (flags, id, value) in entries {
                    p.push(*flags);
                    p.extend_from_slice(&id.to_be_bytes()[1..]);
                    p.extend_from_slice(&value.to_be_bytes());
                }
                (kind::SETTINGS, 0, p)
            }
            Frame::Ping(id) => (kind::PING, 0, id.to_be_bytes().to_vec()),
            Frame::GoAway { last_good_stream_id, status } => {
                (kind::GOAWAY, 0, two_words(*last_good_stream_id & 0x7fff_ffff, *status))
            }
            Frame::WindowUpdate { stream_id, delta } => {
                (kind::WINDOW_UPDATE, 0, two_words(*stream_id & 0x7fff_ffff, *delta & 0x7fff_ffff))
            }
            Frame::Unknown(kind) => (*kind, 0, Vec::new()),
        };
        let mut out = Vec::with_capacity(8 + payload.len());
        out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.push(flags);
        out.extend_from_slice(&length24(payload.len())?);
        out.extend_from_slice(&payload);
        Ok(out)
    }
}

fn id24(e: &[u8]) -> u32 {
    u32::from_be_bytes([0, e[1], e[2], e[3]])
}

fn word_of(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn two_words(a: u32, b: u32) -> Vec<u8> {
    let mut p = a.to_be_bytes().to_vec();
    p.extend_from_slice(&b.to_be_bytes());
    p
}

fn length24(len: usize) -> Result<[u8; 3], SpdyError> {
    if len >= 1 << 24 {
        return Err(SpdyError::Malformed(format!("a {len}-byte payload does not fit SPDY's 24-bit length")));
    }
    let b = (len as u32).to_be_bytes();
    Ok([b[1], b[2], b[3]])
}

/// An exec channel, as named by a stream's `streamtype` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StreamType {
    /// The server writes the command's `Status` here.
    Error,
    /// Client → server input (read and dropped: fake commands take none).
    Stdin,
    /// The command's standard output.
    Stdout,
    /// The command's standard error.
    Stderr,
    /// Terminal size changes (read and dropped).
    Resize,
}

impl StreamType {
    fn parse(s: &str) -> Option<StreamType> {
        Some(match s {
            "error" => StreamType::Error,
            "stdin" => StreamType::Stdin,
            "stdout" => StreamType::Stdout,
            "stderr" => StreamType::Stderr,
            "resize" => StreamType::Resize,
            _ => return None,
        })
    }
}

/// The streams an exec request asks for (its `stdin`, `stdout`, `stderr` and `tty` parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// `stdin=true`.
    pub stdin: bool,
    /// `stdout=true`.
    pub stdout: bool,
    /// `stderr=true` (ignored with a tty, as the kubelet ignores it).
    pub stderr: bool,
    /// `tty=true`: a resize stream.
    pub tty: bool,
}

impl Wanted {
    /// The stream types the client will open, as the kubelet counts them.
    pub fn types(&self) -> Vec<StreamType> {
        let mut out = vec![StreamType::Error];
        for (on, t) in [
            (self.stdin, StreamType::Stdin),
            (self.stdout, StreamType::Stdout),
            (self.stderr && !self.tty, StreamType::Stderr),
            (self.tty, StreamType::Resize),
        ] {
            if on {
                out.push(t);
            }
        }
        out
    }
}

/// One exec to serve over an upgraded connection.
pub struct ExecCall {
    /// The cluster that runs the command.
    pub cluster: Arc<FakeCluster>,
    /// The pod.
    pub pod: ItemKey,
    /// The container.
    pub container: String,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Counts execs whose client went away before the command finished.
    pub cancelled: Arc<AtomicU64>,
    /// The streams the request asked for.
    pub wanted: Wanted,
}

/// Why a session ended early.
#[derive(Debug)]
enum SessionEnd {
    /// The client sent something that is not SPDY/3 as kubectl speaks it.
    Protocol(String),
    /// Reading or writing the connection failed.
    Io(std::io::Error),
    /// The client closed the connection (or reset the error stream, or sent GOAWAY) first.
    ClientGone,
    /// The client did not open the streams in time.
    Timeout(&'static str),
}

impl From<SpdyError> for SessionEnd {
    fn from(e: SpdyError) -> SessionEnd {
        SessionEnd::Protocol(e.to_string())
    }
}

impl From<std::io::Error> for SessionEnd {
    fn from(e: std::io::Error) -> SessionEnd {
        SessionEnd::Io(e)
    }
}

/// One SPDY connection: the byte stream, its codec and what is buffered.
struct Conn<IO> {
    io: IO,
    codec: Codec,
    buf: Vec<u8>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    /// The next frame, or `None` when the client closed the connection. Cancel-safe: bytes are
    /// only taken off `buf` as whole frames.
    async fn next(&mut self) -> Result<Option<Frame>, SessionEnd> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            self.buf.reserve(16 * 1024);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if !self.buf.is_empty() {
                    return Err(SessionEnd::Protocol(format!(
                        "the connection ended inside a frame ({} bytes)",
                        self.buf.len()
                    )));
                }
                return Ok(None);
            }
        }
    }

    async fn send(&mut self, frame: &Frame) -> Result<(), SessionEnd> {
        let bytes = self.codec.encode(frame)?;
        self.io.write_all(&bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Answers what needs no exec state (PING); `Err(ClientGone)` for the client's GOAWAY.
    async fn housekeeping(&mut self, frame: &Frame) -> Result<(), SessionEnd> {
        match frame {
            // Our own pings (even ids) would come back; we send none, so every ping is the client's.
            Frame::Ping(id) => self.send(&Frame::Ping(*id)).await,
            Frame::GoAway { .. } => Err(SessionEnd::ClientGone),
            _ => Ok(()),
        }
    }
}

/// Serves one exec over an upgraded SPDY/3.1 connection; a session that ends early is logged.
pub async fn serve_exec<IO: AsyncRead + AsyncWrite + Unpin>(io: IO, call: ExecCall) {
    let what = format!("SPDY exec in pod {}/{}", call.pod.namespace().unwrap_or(""), call.pod.name());
    let mut conn = Conn { io, codec: Codec::default(), buf: Vec::new() };
    match session(&mut conn, &call).await {
        Ok(()) => {}
        Err(SessionEnd::ClientGone) => tracing::debug!("{what}: the client went away"),
        Err(SessionEnd::Protocol(m)) => tracing::warn!("{what}: closing the connection: {m}"),
        Err(SessionEnd::Io(e)) => tracing::warn!("{what}: closing the connection: {e}"),
        Err(SessionEnd::Timeout(m)) => tracing::warn!("{what}: closing the connection: {m}"),
    }
    let _ = conn.io.shutdown().await;
}

async fn session<IO: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<IO>, call: &ExecCall) -> Result<(), SessionEnd> {
    // 1. The client opens every stream it asked for, one at a time, each waiting for its reply.
    let wanted = call.wanted.types();
    let open = tokio::time::timeout(Duration::from_millis(STREAM_CREATION_MS_MAX), open_streams(conn, &wanted))
        .await
        .map_err(|_| SessionEnd::Timeout("the client did not open its streams in time"))??;
    let stream = |t: StreamType| open.iter().find(|(_, s)| *s == t).map(|(id, _)| *id);
    let last_id = open.iter().map(|(id, _)| *id).max().unwrap_or(0);
    // 2. Run the command, answering pings meanwhile; the client leaving cancels it.
    let run = call.cluster.exec(&call.pod, &call.container, &call.command);
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            r = &mut run => break r,
            frame = conn.next() => {
                let end = match frame {
                    Ok(None) => Some(SessionEnd::ClientGone),
                    Err(e) => Some(e),
                    Ok(Some(Frame::RstStream { stream_id, .. })) if Some(stream_id) == stream(StreamType::Error) => {
                        Some(SessionEnd::ClientGone)
                    }
                    // Pings answered, the client's GOAWAY is its leaving; stdin and resize data dropped.
                    Ok(Some(f)) => conn.housekeeping(&f).await.err(),
                };
                if let Some(end) = end {
                    call.cancelled.fetch_add(1, Ordering::SeqCst);
                    return Err(end);
                }
            }
        }
    };
    // 3. Output, then the Status on the error stream; FIN on each.
    let status = match result {
        Ok(ExecResult { exit_code, stdout, stderr }) => {
            for (t, text) in [(StreamType::Stdout, stdout), (StreamType::Stderr, stderr)] {
                if let Some(id) = stream(t) {
                    send_data(conn, id, text.as_bytes()).await?;
                }
            }
            super::exit_status(exit_code, &call.command)
        }
        Err(e) => json!({"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                         "message": format!("error executing command in container {}: {e}", call.container)}),
    };
    if let Some(id) = stream(StreamType::Error) {
        send_data(conn, id, status.to_string().as_bytes()).await?;
    }
    // 4. GOAWAY, then wait for the client to close: closing first could reset the connection
    //    while the client still reads.
    conn.send(&Frame::GoAway { last_good_stream_id: last_id, status: GOAWAY_OK }).await?;
    let drain = async {
        loop {
            let frame = match conn.next().await {
                Ok(Some(frame)) => frame,
                // Done: a client that exits may reset rather than close.
                Ok(None) | Err(SessionEnd::Io(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            match conn.housekeeping(&frame).await {
                Err(SessionEnd::ClientGone) => return Ok(()),
                other => other?,
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(DRAIN_MS_MAX), drain)
        .await
        .map_err(|_| SessionEnd::Timeout("the client did not close the connection after GOAWAY"))?
}

/// Reads frames until every wanted stream is open, replying to each SYN_STREAM; returns
/// (stream id, type) per stream.
async fn open_streams<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    wanted: &[StreamType],
) -> Result<Vec<(u32, StreamType)>, SessionEnd> {
    let mut open: Vec<(u32, StreamType)> = Vec::new();
    while open.len() < wanted.len() {
        let Some(frame) = conn.next().await? else {
            return Err(SessionEnd::ClientGone);
        };
        match frame {
            Frame::SynStream { stream_id, headers, .. } => {
                let name = headers.get("streamtype").unwrap_or("");
                let Some(t) = StreamType::parse(name) else {
                    return Err(SessionEnd::Protocol(format!("stream {stream_id} has unknown streamtype {name:?}")));
                };
                if !wanted.contains(&t) || open.iter().any(|(_, s)| *s == t) {
                    return Err(SessionEnd::Protocol(format!(
                        "stream {stream_id} of type {name} was not asked for or is open already (asked for {wanted:?})"
                    )));
                }
                if stream_id % 2 == 0 || open.iter().any(|(id, _)| *id >= stream_id) {
                    return Err(SessionEnd::Protocol(format!(
                        "client stream id {stream_id} is even or not increasing"
                    )));
                }
                conn.send(&Frame::SynReply { stream_id, fin: false, headers: Headers::default() }).await?;
                open.push((stream_id, t));
            }
            Frame::RstStream { .. } => return Err(SessionEnd::ClientGone),
            other => conn.housekeeping(&other).await?,
        }
    }
    Ok(open)
}

/// Writes `data` on a stream in frames of at most [`DATA_FRAME_BYTES_MAX`], the last with FIN.
async fn send_data<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    stream_id: u32,
    data: &[u8],
) -> Result<(), SessionEnd> {
    let mut chunks = data.chunks(DATA_FRAME_BYTES_MAX).peekable();
    if chunks.peek().is_none() {
        return conn.send(&Frame::Data { stream_id, fin: true, data: Vec::new() }).await;
    }
    while let Some(chunk) = chunks.next() {
        let fin = chunks.peek().is_none();
        conn.send(&Frame::Data { stream_id, fin, data: chunk.to_vec() }).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::ExecScript;

    /// Two header blocks as a SPDY/3 client compresses them: one zlib stream primed with the
    /// dictionary (FDICT, DICTID 0xe3c6a7c2), level 9, sync-flushed after each block. Made with
    /// Python's `zlib.compressobj(level=9, zdict=DICTIONARY)`; both refer back into the dictionary
    /// (inflating them without it fails with "distance too far back").
    const CLIENT_ERROR_BLOCK: &str = "78f9e3c6a7c202a62346703a2b294a4dcc851625aca9a08006000000ffff";
    const CLIENT_STDOUT_BLOCK: &str = "c22a054ccc29f9a52500000000ffff";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        Headers(pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect())
    }

    /// A SYN_STREAM frame around an already compressed header block.
    fn syn_stream_bytes(stream_id: u32, block: &[u8]) -> Vec<u8> {
        let mut payload = stream_id.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        payload.extend_from_slice(block);
        let mut out = vec![0x80, 0x03, 0x00, 0x01, 0x00];
        out.extend_from_slice(&length24(payload.len()).unwrap());
        out.extend_from_slice(&payload);
        out
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert_eq!(adler32(&DICTIONARY), 0xe3c6_a7c2);
        assert_eq!(&DICTIONARY[..11], b"\0\0\0\x07options");
        assert!(DICTIONARY.ends_with(b",*,enq=0."));
    }

    #[test]
    fn adler32_matches_rfc1950() {
        assert_eq!(adler32(b""), 1);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn a_clients_dictionary_compressed_blocks_inflate_in_one_context() {
        let mut codec = Codec::default();
        let mut buf = syn_stream_bytes(1, &hex(CLIENT_ERROR_BLOCK));
        buf.extend_from_slice(&syn_stream_bytes(3, &hex(CLIENT_STDOUT_BLOCK)));
        let first = codec.decode(&mut buf).unwrap().unwrap();
        let second = codec.decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        let expect = |id, t| Frame::SynStream {
            stream_id: id,
            associated_id: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers: headers(&[("streamtype", t)]),
        };
        assert_eq!(first, expect(1, "error"));
        assert_eq!(second, expect(3, "stdout"));
    }

    #[test]
    fn a_block_naming_another_dictionary_is_refused() {
        let mut block = hex(CLIENT_ERROR_BLOCK);
        block[5] ^= 1;
        let err = Inflater::default().inflate(&block).unwrap_err();
        assert!(matches!(&err, SpdyError::Inflate(m) if m.contains("not SPDY/3's")), "{err}");
    }

    #[test]
    fn a_block_that_does_not_inflate_is_an_error_not_a_panic() {
        for block in [&b""[..], b"\x78", b"\x12\x34", b"\x78\x9c\xff\xff\xff\xff"] {
            assert!(Inflater::default().inflate(block).is_err(), "{block:?}");
        }
        // The second block of a stream, without the first: refers to history it does not have.
        let mut i = Inflater::default();
        let mut block = vec![0x78, 0x01];
        block.extend_from_slice(&hex(CLIENT_STDOUT_BLOCK));
        assert!(i.inflate(&block).is_err());
    }

    #[test]
    fn every_frame_round_trips_with_header_blocks_in_one_context() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 3,
                fin: false,
                unidirectional: true,
                headers: headers(&[("streamtype", "error")]),
            },
            Frame::SynReply { stream_id: 1, fin: false, headers: Headers::default() },
            Frame::SynStream {
                stream_id: 3,
                associated_id: 1,
                priority: 0,
                fin: true,
                unidirectional: false,
                headers: headers(&[("streamtype", "stdout"), ("x", "a\0b")]),
            },
            Frame::Headers { stream_id: 3, fin: true, headers: headers(&[("streamtype", "stdout")]) },
            Frame::Data { stream_id: 3, fin: true, data: b"hi\n".to_vec() },
            Frame::Data { stream_id: 5, fin: false, data: Vec::new() },
            Frame::RstStream { stream_id: 3, status: 5 },
            Frame::Settings(vec![(1, 4, 100), (0, 7, 65_536)]),
            Frame::Ping(7),
            Frame::GoAway { last_good_stream_id: 3, status: GOAWAY_OK },
            Frame::WindowUpdate { stream_id: 1, delta: 1000 },
        ];
        let mut writer = Codec::default();
        let mut reader = Codec::default();
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&writer.encode(f).unwrap());
        }
        // Fed a byte at a time: a frame is only taken whole.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in wire {
            buf.push(b);
            if let Some(f) = reader.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got, frames);
    }

    #[test]
    fn the_servers_blocks_are_zlib_without_a_dictionary() {
        let mut d = Deflater::default();
        let first = d.deflate(&headers(&[("a", "b")]).encode()).unwrap();
        assert_eq!(first[0], 0x78, "a zlib header");
        assert_eq!(first[1] & 0x20, 0, "no FDICT: a reader needs no dictionary");
        assert!(first.ends_with(&[0, 0, 0xff, 0xff]), "sync-flushed: {first:x?}");
    }

    #[track_caller]
    fn check_malformed(bytes: &[u8], expected: &str) {
        let mut buf = bytes.to_vec();
        let err = Codec::default().decode(&mut buf).unwrap_err();
        assert!(err.to_string().contains(expected), "{err} does not contain {expected:?}");
    }

    #[test]
    fn malformed_frames_are_errors() {
        check_malformed(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1], "SPDY version 2");
        check_malformed(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1], "PING with a 3-byte payload");
        check_malformed(&[0x80, 0x03, 0x00, 0x07, 0, 0, 0, 4, 0, 0, 0, 1], "GOAWAY");
        check_malformed(&[0x80, 0x03, 0x00, 0x01, 0, 0, 0, 2, 0, 1], "SYN_STREAM");
        check_malformed(&[0x80, 0x03, 0x00, 0x04, 0, 0, 0, 4, 0, 0, 0, 1], "SETTINGS");
        check_malformed(&[0, 0, 0, 0, 0, 0, 0, 0], "stream 0");
        check_malformed(&[0, 0, 0, 1, 0, 0x20, 0, 0], "at most");
        // A header block with a pair count and nothing else.
        let mut d = Deflater::default();
        let block = d.deflate(&[0, 0, 0, 2, 0, 0, 0, 1]).unwrap();
        check_malformed(&syn_stream_bytes(1, &block), "truncated");
        let block = Deflater::default().deflate(&headers(&[("Upper", "x")]).encode()).unwrap();
        check_malformed(&syn_stream_bytes(1, &block), "not lowercase");
    }

    #[test]
    fn unknown_control_frames_are_skipped_not_errors() {
        let mut buf = vec![0x80, 0x03, 0x00, 0x0a, 0, 0, 0, 2, 9, 9];
        assert_eq!(Codec::default().decode(&mut buf).unwrap(), Some(Frame::Unknown(10)));
        assert!(buf.is_empty());
    }

    /// A session on one end of an in-memory pipe; the other end is the client's.
    struct Session {
        client: Conn<tokio::io::DuplexStream>,
        server: tokio::task::JoinHandle<()>,
        cluster: Arc<FakeCluster>,
        cancelled: Arc<AtomicU64>,
    }

    fn session_for(command: &[&str], wanted: Wanted) -> Session {
        let mut cluster = crate::demo_cluster(60, crate::DEMO_SEED);
        let pod = crate::demo_failing_hook_pod();
        let out = ExecScript::Output { exit_code: 0, stdout: "hi\n".into(), stderr: String::new() };
        cluster.script_exec(pod.clone(), vec!["echo".into(), "hi".into()], out);
        cluster.script_exec(pod.clone(), vec!["hang".into()], ExecScript::Hang);
        let cluster = Arc::new(cluster.with_clock(Arc::new(blockwise_adapters::world::TokioRuntime)));
        let container = cluster.object(&pod).unwrap()["spec"]["containers"][0]["name"].as_str().unwrap().to_string();
        let cancelled = Arc::new(AtomicU64::new(0));
        let call = ExecCall {
            cluster: cluster.clone(),
            pod,
            container,
            command: command.iter().map(|c| c.to_string()).collect(),
            cancelled: cancelled.clone(),
            wanted,
        };
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve_exec(server, call));
        Session { client: Conn { io: client, codec: Codec::default(), buf: Vec::new() }, server, cluster, cancelled }
    }

    const STDOUT_ONLY: Wanted = Wanted { stdin: false, stdout: true, stderr: false, tty: false };

    async fn write_raw(s: &mut Session, bytes: &[u8]) {
        s.client.io.write_all(bytes).await.unwrap();
    }

    #[tokio::test]
    async fn an_exec_runs_once_its_streams_are_open_and_ends_with_status_fin_and_goaway() {
        let mut s = session_for(&["echo", "hi"], STDOUT_ONLY);
        // The streams as kubectl opens them: header blocks compressed with the dictionary.
        write_raw(&mut s, &syn_stream_bytes(1, &hex(CLIENT_ERROR_BLOCK))).await;
        let reply = |id| Frame::SynReply { stream_id: id, fin: false, headers: Headers::default() };
        assert_eq!(s.client.next().await.unwrap(), Some(reply(1)));
        s.client.send(&Frame::Ping(1)).await.unwrap();
        assert_eq!(s.client.next().await.unwrap(), Some(Frame::Ping(1)));
        assert!(s.cluster.exec_records().is_empty(), "no exec before every stream is open");
        write_raw(&mut s, &syn_stream_bytes(3, &hex(CLIENT_STDOUT_BLOCK))).await;
        assert_eq!(s.client.next().await.unwrap(), Some(reply(3)));
        let data = |id, data: &[u8]| Frame::Data { stream_id: id, fin: true, data: data.to_vec() };
        assert_eq!(s.client.next().await.unwrap(), Some(data(3, b"hi\n")));
        assert_eq!(s.client.next().await.unwrap(), Some(data(1, br#"{"metadata":{},"status":"Success"}"#)));
        assert_eq!(s.client.next().await.unwrap(), Some(Frame::GoAway { last_good_stream_id: 3, status: GOAWAY_OK }));
        drop(s.client);
        s.server.await.unwrap();
        assert_eq!(s.cluster.exec_records().len(), 1);
        assert_eq!(s.cancelled.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_nonzero_exit_is_a_v4_failure_status_with_the_code() {
        let wanted = Wanted { stdin: false, stdout: true, stderr: true, tty: false };
        let mut s = session_for(&["sh", "-c", "exit 3"], wanted);
        for (id, t) in [(1, "error"), (3, "stdout"), (5, "stderr")] {
            let h = headers(&[("streamtype", t)]);
            let f = Frame::SynStream {
                stream_id: id,
                associated_id: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: h,
            };
            s.client.send(&f).await.unwrap();
            assert!(
                matches!(s.client.next().await.unwrap(), Some(Frame::SynReply { stream_id, .. }) if stream_id == id)
            );
        }
        let mut frames = Vec::new();
        loop {
            match s.client.next().await.unwrap() {
                Some(Frame::GoAway { .. }) => break,
                Some(f) => frames.push(f),
                None => panic!("closed before GOAWAY: {frames:?}"),
            }
        }
        let [Frame::Data { stream_id: 3, fin: true, data: out }, Frame::Data { stream_id: 5, fin: true, data: err }, Frame::Data { stream_id: 1, fin: true, data: status }] =
            frames.as_slice()
        else {
            panic!("stdout, stderr, then the status, each with FIN: {frames:?}");
        };
        assert!(out.is_empty() && err.is_empty());
        let status: serde_json::Value = serde_json::from_slice(status).unwrap();
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0], json!({"reason": "ExitCode", "message": "3"}));
    }

    #[tokio::test]
    async fn a_client_that_leaves_during_the_command_cancels_it() {
        let mut s = session_for(&["hang"], STDOUT_ONLY);
        write_raw(&mut s, &syn_stream_bytes(1, &hex(CLIENT_ERROR_BLOCK))).await;
        write_raw(&mut s, &syn_stream_bytes(3, &hex(CLIENT_STDOUT_BLOCK))).await;
        assert!(matches!(s.client.next().await.unwrap(), Some(Frame::SynReply { stream_id: 1, .. })));
        assert!(matches!(s.client.next().await.unwrap(), Some(Frame::SynReply { stream_id: 3, .. })));
        drop(s.client);
        s.server.await.unwrap();
        assert_eq!(s.cancelled.load(Ordering::SeqCst), 1);
    }

    /// Bad input closes the connection without an exec (and without a panic: the task ends).
    async fn check_closed(input: &[u8]) {
        let mut s = session_for(&["echo", "hi"], STDOUT_ONLY);
        write_raw(&mut s, input).await;
        // Whatever the server answered before it saw the bad frame, then the end.
        loop {
            match s.client.next().await {
                Ok(Some(Frame::SynReply { .. })) => continue,
                Ok(None) => break,
                other => panic!("{input:x?}: {other:?}"),
            }
        }
        s.server.await.unwrap();
        assert!(s.cluster.exec_records().is_empty(), "{input:x?}");
    }

    #[tokio::test]
    async fn bad_input_closes_the_connection() {
        let unknown = Deflater::default().deflate(&headers(&[("streamtype", "video")]).encode()).unwrap();
        check_closed(&syn_stream_bytes(1, &unknown)).await;
        // A second block that does not continue the first's zlib stream.
        let mut twice = syn_stream_bytes(1, &hex(CLIENT_ERROR_BLOCK));
        twice.extend_from_slice(&syn_stream_bytes(3, &[0xde, 0xad]));
        check_closed(&twice).await;
        check_closed(&syn_stream_bytes(1, b"\x78\x9c\xff\xff")).await;
        check_closed(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1]).await;
        check_closed(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1]).await;
        check_closed(&[0, 0, 0, 0, 0, 0, 0, 0]).await;
        // A stream type the request did not ask for.
        let stderr = Deflater::default().deflate(&headers(&[("streamtype", "stderr")]).encode()).unwrap();
        check_closed(&syn_stream_bytes(1, &stderr)).await;
    }

    #[test]
    fn the_streams_an_exec_waits_for_are_the_kubelets() {
        let w = |stdin, stdout, stderr, tty| Wanted { stdin, stdout, stderr, tty }.types();
        use StreamType::*;
        assert_eq!(w(false, true, true, false), [Error, Stdout, Stderr]);
        assert_eq!(w(true, true, true, true), [Error, Stdin, Stdout, Resize]);
        assert_eq!(w(false, false, true, false), [Error, Stderr]);
    }
}
