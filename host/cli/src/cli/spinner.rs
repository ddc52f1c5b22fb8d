//! Feedback while something slow runs (a component compiling can take a minute): a spinner
//! with the elapsed time on a terminal's stderr, nothing when stderr is not a terminal.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A running spinner; [`Spinner::finish`] clears it and says how long it ran.
pub struct Spinner {
    bar: ProgressBar,
    started: Instant,
}

impl Spinner {
    /// Shows `message` with a spinner and the elapsed seconds (on a terminal only).
    pub fn start(message: impl Into<String>) -> Spinner {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            bar.set_style(style);
        }
        bar.set_message(message.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        Spinner {
            bar,
            started: Instant::now(),
        }
    }

    /// Removes the spinner; returns how long it ran.
    pub fn finish(self) -> Duration {
        self.bar.finish_and_clear();
        self.started.elapsed()
    }
}
