//! Stop strings over streamed text: find them across token boundaries and hold back text that
//! might still turn into one.

/// Accumulates detokenised text, finds stop strings, and releases only text that can no
/// longer turn out to be the start of a stop string.
#[derive(Debug)]
pub(crate) struct TextTracker {
    stop: Vec<String>,
    text: String,
    released: usize,
    stopped: bool,
}

impl TextTracker {
    pub(crate) fn new(stop: Vec<String>) -> Self {
        Self { stop, text: String::new(), released: 0, stopped: false }
    }

    /// Adds a piece; returns the newly releasable text and whether a stop string was hit.
    pub(crate) fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        let search_from = self.released;
        self.text.push_str(piece);
        let hit = self
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[search_from..].find(s.as_str()).map(|i| search_from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.stopped = true;
            let out = self.text[self.released..].to_string();
            self.released = self.text.len();
            return (out, true);
        }
        let hold = self.pending_stop_prefix();
        let safe = self.text.len() - hold;
        let out = self.text[self.released..safe].to_string();
        self.released = safe;
        (out, false)
    }

    /// Length of the longest suffix of the text that starts some stop string.
    fn pending_stop_prefix(&self) -> usize {
        let tail = &self.text[self.released..];
        let mut best = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if i > best && tail.ends_with(&s[..i]) {
                    best = i;
                }
            }
        }
        best
    }

    /// Releases whatever is held back (generation ended without completing a stop string).
    pub(crate) fn flush(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }

    pub(crate) fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::TextTracker;

    #[test]
    fn stop_string_truncates_and_holds_back_prefixes() {
        let stop = vec!["END".to_string()];
        let mut t = TextTracker::new(stop);
        assert_eq!(t.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(t.push("N"), (String::new(), false));
        assert_eq!(t.push("Dgame"), (String::new(), true));
        assert_eq!(t.into_text(), "hello ");
    }

    #[test]
    fn false_alarm_prefix_is_released_later() {
        let stop = vec!["END".to_string()];
        let mut t = TextTracker::new(stop);
        assert_eq!(t.push("E"), (String::new(), false));
        assert_eq!(t.push("x"), ("Ex".to_string(), false));
        assert_eq!(t.push("EN"), (String::new(), false));
        assert_eq!(t.flush(), "EN");
        assert_eq!(t.into_text(), "ExEN");
    }

    #[test]
    fn stop_string_spanning_pieces_and_multibyte() {
        let stop = vec!["é!".to_string(), "zz".to_string()];
        let mut t = TextTracker::new(stop);
        assert_eq!(t.push("caf"), ("caf".to_string(), false));
        assert_eq!(t.push("é"), (String::new(), false));
        assert_eq!(t.push("!x"), (String::new(), true));
        assert_eq!(t.into_text(), "caf");
    }
}
