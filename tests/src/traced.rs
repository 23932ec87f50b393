//! Everything a test process's tracing says, at every level, kept for a test that proves a
//! secret never reaches a log.

use std::sync::{Arc, Mutex};

/// The text traced since [`Captured::install`], span events included.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Makes a capture this process's only tracing subscriber, at `TRACE`, every span's events
    /// with it. Once per process (nextest runs each test in a process of its own).
    pub fn install() -> Captured {
        let traced = Captured::default();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
                .with_ansi(false)
                .with_writer(traced.clone())
                .finish(),
        )
        .expect("the only subscriber of this test process (nextest runs one test a process)");
        traced
    }

    /// What was traced so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// What the SDK traced so far: every line but the test's own guest console's (target
    /// `guest`), which shows what a test typed into the guest.
    pub fn sdk_text(&self) -> String {
        self.text()
            .lines()
            .filter(|l| !l.contains(" guest: "))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}
