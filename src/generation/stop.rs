//! Stop strings over streamed text: text is released as soon as it can no longer be part of a
//! stop string, and generation ends at the first stop string, which is never released.
//!
//! Why holding back is enough: if a stop string starts at byte `p` of the text, then every time
//! text before its end was released, the text from `p` on was a proper prefix of that stop
//! string, so it was held back. A match therefore always starts inside the held-back text, and
//! only the held text plus the new piece needs searching.

/// The stop strings of one sequence and the text held back because it could still begin one.
#[derive(Clone, Debug, Default)]
pub(crate) struct StopText {
    stops: Vec<String>,
    held: String,
}

impl StopText {
    /// Watches for `stops` (none of them empty: the caller checks).
    pub(crate) fn new(stops: &[String]) -> Self {
        StopText {
            stops: stops.to_vec(),
            held: String::new(),
        }
    }

    /// Adds a piece of text. Returns the text that can be released now and, when a stop string
    /// has appeared, its index in the list (the earliest match in the text; among matches at
    /// the same place, the first listed). After a match the text from the stop string on is
    /// dropped.
    pub(crate) fn push(&mut self, piece: &str) -> (String, Option<usize>) {
        self.held.push_str(piece);
        let found = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at, i)))
            .min();
        if let Some((at, which)) = found {
            let released = self.held[..at].to_string();
            self.held.clear();
            return (released, Some(which));
        }
        // The longest end of the text that a stop string begins with (but does not equal: that
        // would have matched). A match of a prefix of a UTF-8 string starts on a character
        // boundary of the text too, so the split below is always at one.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k) && self.held.ends_with(&s[..k]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let keep = self.held.split_off(self.held.len() - hold);
        (std::mem::replace(&mut self.held, keep), None)
    }

    /// Releases whatever is held back (the text has ended without a stop string).
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns the released text, the stop found, and the text a
    /// non-streaming search would return (everything before the first stop string).
    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut st = StopText::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (text, stop) = st.push(p);
            out.push_str(&text);
            if stop.is_some() {
                return (out, stop);
            }
        }
        out.push_str(&st.flush());
        (out, None)
    }

    /// The same answer without holding anything back: after each piece, search all the text so
    /// far; generation ends at the first piece after which some stop string occurs.
    fn whole(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
        let mut text = String::new();
        for p in pieces {
            text.push_str(p);
            let found = stops
                .iter()
                .enumerate()
                .filter_map(|(i, s)| text.find(s).map(|at| (at, i)))
                .min();
            if let Some((at, i)) = found {
                return (text[..at].to_string(), Some(i));
            }
        }
        (text, None)
    }

    #[test]
    fn streamed_pieces_give_what_a_search_of_the_whole_text_gives() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["\n\n"], &["Hello", "\n", "\n", "world"]),
            (&["END"], &["the E", "N", "D is near"]),
            (&["END"], &["the E", "N", "O is near"]),
            (&["ab", "b"], &["xa", "b"]),
            (&["abc", "bcd"], &["a", "bc", "d"]),
            (&["é!"], &["caf", "é", "!"]),
            (&["é!"], &["café", " ok"]),
            (&["stop"], &["no match at all"]),
            (&["aaa"], &["aa", "aa"]),
            (&["xyz", "y"], &["x", "y", "z"]),
        ];
        for (stops, pieces) in cases {
            assert_eq!(
                run(stops, pieces),
                whole(stops, pieces),
                "{stops:?} {pieces:?}"
            );
        }
    }

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_back_and_no_more() {
        let mut st = StopText::new(&["</end>".to_string()]);
        assert_eq!(st.push("done </"), ("done ".to_string(), None));
        // "</e" could still become "</end>"; "x" proves it cannot.
        assert_eq!(st.push("e"), (String::new(), None));
        assert_eq!(st.push("x"), ("</ex".to_string(), None));
        assert_eq!(st.push("</end> tail"), (String::new(), Some(0)));
        assert_eq!(st.flush(), "");
    }
}
