//! A reader of Server-Sent Events (the WHATWG `text/event-stream` format) fed with the chunks
//! of a response as they arrive: the fields the API sends (`id`, `event`, `data`) and
//! comments (keep-alives), which it skips. Lines end with LF, CRLF or CR.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The stream's last event id when this event was dispatched (what `Last-Event-ID` sends).
    pub id: Option<String>,
    /// `message` unless the event named its type.
    pub event: String,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of a line not complete yet (a chunk may end anywhere, inside a character too).
    pending: Vec<u8>,
    /// The previous chunk ended with CR: an LF starting this one belongs to it.
    after_cr: bool,
    last_id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// The events completed by `chunk`, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &byte in chunk {
            let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
            match byte {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    let line = std::mem::take(&mut self.pending);
                    events.extend(self.line(&String::from_utf8_lossy(&line)));
                }
                _ => self.pending.push(byte),
            }
        }
        events
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        let (field, value) = match line.split_once(':') {
            Some(("", _)) => return None,
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        let data = self.data.take()?;
        Some(SseEvent {
            id: self.last_id.clone(),
            event: event
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "message".to_owned()),
            data,
        })
    }

    /// The id a reconnect sends as `Last-Event-ID`.
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_comments_and_split_chunks() {
        let mut parser = SseParser::default();
        let wire = ": keep-alive\n\nid: 7\nevent: step\ndata: {\"a\":\ndata: 1}\n\nid: 8\r\nevent: job\r\ndata:{\"é\":2}\r\n\r\n";
        let mut events = Vec::new();
        // Byte by byte: every split point, inside the CRLF and the two-byte character too.
        for byte in wire.as_bytes() {
            events.extend(parser.feed(std::slice::from_ref(byte)));
        }
        assert_eq!(
            events,
            [
                SseEvent {
                    id: Some("7".into()),
                    event: "step".into(),
                    data: "{\"a\":\n1}".into(),
                },
                SseEvent {
                    id: Some("8".into()),
                    event: "job".into(),
                    data: "{\"é\":2}".into(),
                },
            ]
        );
        assert_eq!(parser.last_id(), Some("8"));
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_but_its_id_counts() {
        let mut parser = SseParser::default();
        assert!(parser.feed(b"id: 3\nevent: step\n\n").is_empty());
        assert_eq!(parser.last_id(), Some("3"));
        let events = parser.feed(b"data: x\n\n");
        assert_eq!(events[0].event, "message");
        assert_eq!(events[0].id.as_deref(), Some("3"));
    }
}
