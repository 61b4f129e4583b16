//! What the tests that run `prompt-salience bench` share.

/// The cells of the markdown rows whose first cell is `first`.
pub fn rows<'a>(out: &'a str, first: &str) -> Vec<Vec<&'a str>> {
    out.lines()
        .filter_map(|l| l.strip_prefix("| ")?.strip_suffix(" |"))
        .map(|l| l.split(" | ").collect::<Vec<_>>())
        .filter(|cells| cells[0] == first)
        .collect()
}
