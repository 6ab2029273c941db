//! Per-stage progress (indicatif spinners, hidden with --quiet) and stage timings.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::export::Timings;

pub struct Progress {
    quiet: bool,
    pub timings: Timings,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            timings: Timings::default(),
        }
    }

    /// Runs one stage under a spinner and records its duration.
    pub fn stage<T>(
        &mut self,
        name: &str,
        what: &str,
        f: impl FnOnce() -> crate::Result<T>,
    ) -> crate::Result<T> {
        crate::interrupt::check()?;
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new_spinner()
        };
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:>8} {msg} {elapsed}")
                .expect("template"),
        );
        bar.set_prefix(name.to_string());
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        let t = Instant::now();
        tracing::info!(stage = name, "start");
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        let secs = (secs * 100.0).round() / 100.0;
        self.timings.0.insert(name.to_string(), secs);
        bar.set_style(ProgressStyle::with_template("{prefix:>10} {msg}").expect("template"));
        match &r {
            Ok(_) => bar.finish_with_message(format!("{what}: {secs:.1} s")),
            Err(_) => bar.abandon_with_message(format!("{what}: failed after {secs:.1} s")),
        }
        tracing::info!(stage = name, secs, ok = r.is_ok(), "end");
        r
    }

    pub fn note(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }
}

/// A transfer bar (bytes, throughput, eta) for `size` bytes labelled `prefix`; hidden when quiet.
pub fn transfer_bar(
    size: u64,
    prefix: impl Into<std::borrow::Cow<'static, str>>,
    quiet: bool,
) -> indicatif::ProgressBar {
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(size)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar
}
