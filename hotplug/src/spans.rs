//! The names of the SDK's tracing spans: a contract (see the crate docs' table), spelled here
//! once. The SDK opens its spans with these, and tests and tools that read spans match on them.
//!
//! ```
//! assert_eq!(qhotplug::spans::ALL, ["hotplug", "step", "undo", "rollback", "qmp", "qga"]);
//! ```

/// One public operation: fields `op`, `id`.
pub const HOTPLUG: &str = "hotplug";
/// One step of a hot-add, hot-remove or change: fields `name`, `id` (and `press` on `device_del`).
pub const STEP: &str = "step";
/// One undo step of a rollback: field `step`.
pub const UNDO: &str = "undo";
/// The background clean-up of anything dropped part-way (a hot-add or change, a job handle, a pull
/// backup, a migration and its storage copy), at `info`: fields `id`, `reason`.
pub const ROLLBACK: &str = "rollback";
/// One QMP command, from `qhotplug-qmp`: fields `command`, `id`.
pub const QMP: &str = qhotplug_qmp::QMP_SPAN;
/// One guest agent command (or resynchronisation), from `qhotplug-qga`: fields `command`, `id`.
pub const QGA: &str = qhotplug_qga::QGA_SPAN;
/// Every span name above.
pub const ALL: [&str; 6] = [HOTPLUG, STEP, UNDO, ROLLBACK, QMP, QGA];

/// Runs one QMP step in a [`STEP`] span named `name`.
pub(crate) async fn step<T>(
    name: &'static str,
    fut: impl std::future::Future<Output = qhotplug_qmp::Result<T>>,
) -> crate::Result<T> {
    use tracing::Instrument;
    let span = tracing::debug_span!(STEP, name);
    Ok(fut.instrument(span).await?)
}
