//! Progress bars on stderr for long work: one shape for every command, hidden where nobody
//! watches (the commands pass `visible` = stderr is a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `n` units; `template` (indicatif's, a constant of the caller) replaces the
/// default look.
pub fn bar(n: u64, visible: bool, template: Option<&str>) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n);
    if let Some(t) = template {
        bar.set_style(ProgressStyle::with_template(t).expect("valid template"));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_nobody_watches_is_hidden() {
        assert!(bar(3, false, Some("{bar}")).is_hidden());
        let shown = bar(3, true, Some("{bar} {pos}/{len}"));
        assert_eq!(shown.length(), Some(3));
    }
}
