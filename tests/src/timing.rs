//! Where the time of a hotplug goes: a `tracing` layer that times the SDK's spans — one per
//! hotplug (`hotplug`), per hotplug step (`step`) and per QMP command (`qmp`) — and keeps them
//! in order, for the demo's table and the hotplug benchmark.

use qhotplug::spans;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// One finished span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timed {
    /// `hotplug`, `step` or `qmp`.
    pub kind: &'static str,
    /// The operation (`add_disk`), the step (`blockdev-add`) or the command (`query-status`).
    pub name: String,
    /// The device id, for `hotplug` and `step` spans.
    pub id: Option<String>,
    /// From creation to close.
    pub elapsed: Duration,
}

/// The layer; clone it to read what it recorded.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    done: Arc<Mutex<Vec<Timed>>>,
}

struct Started {
    at: Instant,
    name: String,
    id: Option<String>,
}

#[derive(Default)]
struct Fields {
    name: Option<String>,
    id: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record(field, format!("{value:?}").trim_matches('"').to_owned());
    }
}

impl Fields {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "name" | "op" | "command" => self.name = Some(value),
            "id" => self.id = Some(value),
            _ => {}
        }
    }
}

impl Timings {
    /// A new, empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded so far, in the order the spans closed, and clears it.
    pub fn take(&self) -> Vec<Timed> {
        std::mem::take(&mut *self.done.lock().unwrap())
    }
}

impl<S> Layer<S> for Timings
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let kind = attrs.metadata().name();
        if !matches!(kind, spans::HOTPLUG | spans::STEP | spans::QMP | spans::QGA) {
            return;
        }
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Started {
                at: Instant::now(),
                name: fields.name.unwrap_or_default(),
                id: fields.id,
            });
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let kind = span.metadata().name();
        let started = span.extensions_mut().remove::<Started>();
        if let Some(started) = started {
            self.done.lock().unwrap().push(Timed {
                kind,
                name: started.name,
                id: started.id,
                elapsed: started.at.elapsed(),
            });
        }
    }
}

/// Calls a function when the SDK starts its `n`-th hotplug step (counting from 0), from inside the
/// step's span creation: the step's command has not been sent yet, and is sent before the hotplug
/// future next yields. Fault and cancellation tests use it to act "at step n".
#[derive(Clone)]
pub struct AtStep {
    target: usize,
    /// Or the first step of this name.
    want: Option<&'static str>,
    seen: Arc<std::sync::atomic::AtomicUsize>,
    name: Arc<Mutex<Option<String>>>,
    action: Arc<dyn Fn() + Send + Sync>,
}

impl AtStep {
    /// Runs `action` when step `n` begins.
    pub fn new(n: usize, action: impl Fn() + Send + Sync + 'static) -> Self {
        AtStep {
            target: n,
            want: None,
            seen: Arc::default(),
            name: Arc::default(),
            action: Arc::new(action),
        }
    }

    /// Runs `action` when the first step named `name` begins.
    pub fn named(name: &'static str, action: impl Fn() + Send + Sync + 'static) -> Self {
        AtStep {
            want: Some(name),
            ..AtStep::new(usize::MAX, action)
        }
    }

    /// The name of the step the action ran at, if it ran.
    pub fn fired_at(&self) -> Option<String> {
        self.name.lock().unwrap().clone()
    }
}

impl<S> Layer<S> for AtStep
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
        if attrs.metadata().name() != spans::STEP {
            return;
        }
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let fire = match self.want {
            Some(want) => fields.name.as_deref() == Some(want) && self.fired_at().is_none(),
            None => n == self.target,
        };
        if fire {
            *self.name.lock().unwrap() = fields.name;
            (self.action)();
        }
    }
}

/// Records the verdict QEMU gave each `device_del` the SDK sent (`accepted`, `busy`,
/// `under way`, `absent`, `error`), in order: what the unplug policy actually pressed.
#[derive(Debug, Clone, Default)]
pub struct Presses {
    verdicts: Arc<Mutex<Vec<String>>>,
}

impl Presses {
    /// The verdicts so far.
    pub fn verdicts(&self) -> Vec<String> {
        self.verdicts.lock().unwrap().clone()
    }
}

struct Verdict(Option<String>);

impl Visit for Verdict {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "verdict" {
            self.0 = Some(value.to_owned());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "verdict" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}

impl<S> Layer<S> for Presses
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut verdict = Verdict(None);
        event.record(&mut verdict);
        if let Some(v) = verdict.0 {
            self.verdicts.lock().unwrap().push(v);
        }
    }
}

/// Runs this test binary's `child` test (an `#[ignore]`d one that reads its orders from `env`)
/// in a process of its own, awaited, not blocked on (a guest's console must be read meanwhile):
/// true when it finished, false when it SIGKILLed itself (an [`AtStep`] hook); a child that
/// ends any other way (a panic) fails the caller. It writes `done` in `dir` when it finishes,
/// and a `done` left by an earlier child is removed first.
pub async fn run_killed_child(child: &str, dir: &std::path::Path, env: &[(&str, String)]) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let done = dir.join("done");
    let _ = std::fs::remove_file(&done);
    let status = tokio::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", child, "--ignored", "--nocapture"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .await
        .expect("the child runs");
    let finished = done.exists();
    let killed = status.signal() == Some(libc::SIGKILL);
    assert!(
        finished && status.success() || !finished && killed,
        "{child} {env:?}: {status}"
    );
    finished
}

/// The child's side of [`run_killed_child`]: this process SIGKILLs itself when the SDK's step
/// `step` begins (dead at once: no destructor, no drop of a future, no word to QEMU), for the
/// rest of its life (the hook is the global tracing subscriber).
pub fn kill_at_step(step: usize) {
    use tracing_subscriber::layer::SubscriberExt;
    let hook = AtStep::new(step, || {
        crate::kill(std::process::id(), libc::SIGKILL).expect("SIGKILL myself");
    });
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(hook))
        .expect("the child's only subscriber");
}
