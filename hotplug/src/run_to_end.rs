//! A call that runs to its end whether or not its caller waits: the caller's task polls it, and
//! if the caller drops it part-way, what is left of it moves into a task of its own and finishes
//! there. No task, and no hop between threads, for a call that is awaited to its end (almost
//! all of them).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// The work of one call; see the module docs.
pub(crate) struct RunToEnd<T: Send + 'static> {
    work: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
}

impl<T: Send + 'static> RunToEnd<T> {
    pub(crate) fn new(work: impl Future<Output = T> + Send + 'static) -> Self {
        RunToEnd {
            work: Some(Box::pin(work)),
        }
    }
}

impl<T: Send + 'static> Future for RunToEnd<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let work = self.work.as_mut().expect("polled after it completed");
        let done = work.as_mut().poll(cx);
        if done.is_ready() {
            self.work = None;
        }
        done
    }
}

impl<T: Send + 'static> Drop for RunToEnd<T> {
    fn drop(&mut self) {
        let Some(work) = self.work.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = work.await;
                });
            }
            // No runtime left (it is shutting down): the work is dropped here, and its own guards
            // roll back what they can (a transaction's undo needs a runtime too: see
            // `Transaction`'s drop).
            Err(_) => tracing::warn!("a call dropped outside a runtime cannot run to its end"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RunToEnd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_call_awaited_runs_in_the_callers_task() {
        let here = std::thread::current().id();
        let there = RunToEnd::new(async { std::thread::current().id() }).await;
        assert_eq!(here, there);
    }

    #[tokio::test]
    async fn a_call_dropped_part_way_finishes_in_a_task_of_its_own() {
        let finished = Arc::new(AtomicBool::new(false));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let call = RunToEnd::new({
            let finished = finished.clone();
            async move {
                wait.await.unwrap();
                finished.store(true, Ordering::SeqCst);
            }
        });
        // Started, then given up on.
        assert!(tokio::time::timeout(Duration::from_millis(1), call)
            .await
            .is_err());
        assert!(!finished.load(Ordering::SeqCst));
        go.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !finished.load(Ordering::SeqCst) {
            assert!(tokio::time::Instant::now() < deadline, "never finished");
            tokio::task::yield_now().await;
        }
    }
}
