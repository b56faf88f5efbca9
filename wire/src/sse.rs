//! Server-sent events as the WHATWG HTML standard defines the stream
//! ("Interpreting an event stream"): lines end with CRLF, LF or CR; an
//! empty line ends an event; a line starting with a colon is a comment; a
//! field is `name[: value]`, one leading space of the value dropped; `data`
//! lines join with LF; `event`, `id` and `retry` are kept; a UTF-8 BOM may
//! open the stream.
//!
//! The sidecar relays streams byte for byte, so what it needs is where each
//! event ends ([`Boundaries`]), whole events to pass on as soon as they are
//! complete ([`EventStream`]), and an event's fields when it must look
//! inside one ([`decode`]). Comments, keep-alives and unknown fields pass
//! through untouched because nothing is rewritten, only cut at event ends.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Where events end in a byte stream read piece by piece. Carries across
/// reads the two facts a boundary can depend on: whether the current line
/// has any bytes yet, and whether the last event ended on a CR whose LF may
/// open the next read.
#[derive(Debug, Clone, Default)]
pub struct Boundaries {
    line_has_bytes: bool,
    /// The previous line ended on a CR that was the last byte read: an LF
    /// opening the next read completes that CRLF.
    after_cr: bool,
    /// ... and that line was the empty line ending an event, so such an
    /// LF belongs to the event already returned.
    after_event_cr: bool,
}

impl Boundaries {
    /// Whether `next` (the read after the previous one) opens with the LF of
    /// a CRLF that ended the event last returned: that byte belongs to that
    /// event. Consumes the fact either way; call once per read, first.
    pub fn owes_lf(&mut self, next: &[u8]) -> bool {
        if next.is_empty() {
            return false;
        }
        let owed = self.after_event_cr && next.first() == Some(&b'\n');
        if owed {
            self.after_cr = false;
        }
        self.after_event_cr = false;
        owed
    }

    /// Scans `bytes`, the stream's continuation, and returns the offset
    /// just past the end of the first event that ends in it (its closing
    /// CRLF whole when both bytes are there). Call again on the rest.
    pub fn find_end(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if self.after_cr {
                self.after_cr = false;
                self.after_event_cr = false;
                if bytes.get(i) == Some(&b'\n') {
                    i += 1;
                    continue;
                }
            }
            let rest = bytes.get(i..).unwrap_or_default();
            let Some(k) = memchr::memchr2(b'\r', b'\n', rest) else {
                self.line_has_bytes |= !rest.is_empty();
                return None;
            };
            let at = i + k;
            let ends_event = k == 0 && !self.line_has_bytes;
            self.line_has_bytes = false;
            i = at + 1;
            if bytes.get(at) == Some(&b'\r') {
                match bytes.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => {
                        self.after_cr = true;
                        self.after_event_cr = ends_event;
                    }
                }
            }
            if ends_event {
                return Some(i);
            }
        }
        None
    }
}

/// What to do with one whole event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

/// An incomplete event larger than this is not held: the stream is then
/// passed on as it comes, unframed (a provider that never ends its events
/// is not speaking SSE).
pub const MAX_HELD: usize = 1 << 20;

/// A stream cut into whole events. Each read gives back every event it
/// completes, as one buffer, without copying when the read holds whole
/// events only; the start of an event that has not ended yet is held until
/// its end arrives, so the app never sees half an event.
#[derive(Debug, Default)]
pub struct EventStream {
    bounds: Boundaries,
    held: BytesMut,
    unframed: bool,
    last_dropped: bool,
    started: bool,
}

/// Output of one read, joined only when it is not one slice.
#[derive(Default)]
struct Out {
    one: Option<Bytes>,
    joined: Option<BytesMut>,
}

impl Out {
    fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        if let Some(j) = &mut self.joined {
            j.extend_from_slice(&b);
        } else if let Some(first) = self.one.take() {
            let mut j = BytesMut::with_capacity((first.len() + b.len()) * 2);
            j.extend_from_slice(&first);
            j.extend_from_slice(&b);
            self.joined = Some(j);
        } else {
            self.one = Some(b);
        }
    }

    fn into_bytes(self) -> Bytes {
        match (self.joined, self.one) {
            (Some(j), _) => j.freeze(),
            (None, Some(b)) => b,
            (None, None) => Bytes::new(),
        }
    }
}

impl EventStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next read of the stream; returns what to pass on: every
    /// event it completes that `judge` keeps, in order, byte for byte.
    /// `judge` sees each whole event (a leading BOM of the stream left out).
    pub fn push(&mut self, chunk: Bytes, judge: &mut impl FnMut(&[u8]) -> Verdict) -> Bytes {
        if self.unframed {
            return chunk;
        }
        let mut chunk = chunk;
        let mut out = Out::default();
        // The kept bytes of `chunk` not yet pushed start at `run`; events
        // are looked for from `pos`.
        let mut run = 0;
        let mut pos = 0;
        if self.bounds.owes_lf(&chunk) {
            // The LF closing the last event's CRLF: it goes where that
            // event went.
            if self.last_dropped {
                chunk = chunk.slice(1..);
            } else {
                pos = 1;
            }
        }
        if !self.held.is_empty() {
            let Some(end) = self.bounds.find_end(&chunk) else {
                return self.hold(&chunk, out);
            };
            self.held
                .extend_from_slice(chunk.get(..end).unwrap_or_default());
            let event = self.held.split().freeze();
            if self.judge(&event, judge) == Verdict::Pass {
                out.push(event);
            }
            run = end;
            pos = end;
        }
        while let Some(len) = self.bounds.find_end(chunk.get(pos..).unwrap_or_default()) {
            let end = pos + len;
            let event = chunk.get(pos..end).unwrap_or_default();
            if self.judge(event, judge) == Verdict::Drop {
                out.push(chunk.slice(run..pos));
                run = end;
            }
            pos = end;
        }
        out.push(chunk.slice(run..pos));
        let tail = chunk.get(pos..).unwrap_or_default();
        self.hold(tail, out)
    }

    fn judge(&mut self, event: &[u8], judge: &mut impl FnMut(&[u8]) -> Verdict) -> Verdict {
        let first = !std::mem::replace(&mut self.started, true);
        let seen = if first {
            event.strip_prefix(BOM).unwrap_or(event)
        } else {
            event
        };
        let v = judge(seen);
        self.last_dropped = v == Verdict::Drop;
        v
    }

    fn hold(&mut self, tail: &[u8], mut out: Out) -> Bytes {
        if self.held.len() + tail.len() > MAX_HELD {
            self.unframed = true;
            out.push(self.held.split().freeze());
            out.push(Bytes::copy_from_slice(tail));
        } else {
            self.held.extend_from_slice(tail);
        }
        out.into_bytes()
    }

    /// Whether part of an event is held (not yet passed on).
    pub fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// At the stream's clean end: the incomplete last event, if any, passed
    /// on as it came (a client drops an event that never ended, as the
    /// standard says; the sidecar does not decide that for it).
    pub fn finish(&mut self) -> Bytes {
        self.held.split().freeze()
    }

    /// At a broken stream: the incomplete event is dropped, so what the app
    /// got ends on an event boundary and an error event can follow it.
    pub fn abandon(&mut self) {
        self.held.clear();
    }
}

/// The lines of an event, split at CRLF, LF or CR, terminators left out.
pub fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = event;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match memchr::memchr2(b'\r', b'\n', rest) {
            None => Some(std::mem::take(&mut rest)),
            Some(k) => {
                let (line, after) = rest.split_at(k);
                let skip = if after.starts_with(b"\r\n") { 2 } else { 1 };
                rest = after.get(skip..).unwrap_or_default();
                Some(line)
            }
        }
    })
}

/// One line's field name and value (`None` for a comment).
fn field(line: &[u8]) -> Option<(&[u8], &[u8])> {
    if line.first() == Some(&b':') {
        return None;
    }
    Some(match memchr::memchr(b':', line) {
        None => (line, &[][..]),
        Some(c) => {
            let value = line.get(c + 1..).unwrap_or_default();
            (
                line.get(..c).unwrap_or_default(),
                value.strip_prefix(b" ").unwrap_or(value),
            )
        }
    })
}

/// An event's `data`: its data lines joined with LF, borrowed when there is
/// one line. `None` when it has no data field (a comment, a keep-alive, or
/// an event the standard does not dispatch).
pub fn data(event: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut out: Option<Cow<'_, [u8]>> = None;
    for line in lines(event) {
        if line.is_empty() {
            break;
        }
        let Some((b"data", value)) = field(line) else {
            continue;
        };
        out = Some(match out {
            None => Cow::Borrowed(value),
            Some(prev) => {
                let mut v = prev.into_owned();
                v.push(b'\n');
                v.extend_from_slice(value);
                Cow::Owned(v)
            }
        });
    }
    out
}

/// An event's fields as the standard reads them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event<'a> {
    /// `event`: the type, `None` for the default (`message`).
    pub kind: Option<Cow<'a, [u8]>>,
    pub data: Option<Cow<'a, [u8]>>,
    /// `id`, when the event sets one (an id with a NUL is ignored).
    pub id: Option<Cow<'a, [u8]>>,
    /// `retry` in milliseconds, when it is all ASCII digits.
    pub retry: Option<u64>,
}

impl Event<'_> {
    /// Whether a client dispatches it: only events with data are.
    pub fn dispatched(&self) -> bool {
        self.data.is_some()
    }
}

/// Decodes one whole event (up to its first empty line).
pub fn decode(event: &[u8]) -> Event<'_> {
    let mut e = Event {
        data: data(event),
        ..Event::default()
    };
    for line in lines(event) {
        if line.is_empty() {
            break;
        }
        match field(line) {
            Some((b"event", v)) => e.kind = Some(Cow::Borrowed(v)),
            Some((b"id", v)) if !v.contains(&0) => e.id = Some(Cow::Borrowed(v)),
            Some((b"retry", v)) if !v.is_empty() && v.iter().all(u8::is_ascii_digit) => {
                e.retry = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
            }
            _ => {}
        }
    }
    e
}

#[cfg(test)]
mod tests;
