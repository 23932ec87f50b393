//! The runner: a plan's steps, each started once every step it waits for is done, at most
//! `concurrency` at once, each with its outcome. A step whose predecessor failed or was skipped
//! is skipped; a failure undoes nothing that other steps did.

use std::future::Future;

use futures::stream::{FuturesUnordered, StreamExt};

use super::{Outcome, Step};
use crate::error::Result;

/// Runs `steps` (each after its [`Step::after`], which come before it) through `exec`, which
/// does step `i`; returns each step's outcome, in order.
pub(crate) async fn run<F, Fut>(steps: &[Step], concurrency: usize, mut exec: F) -> Vec<Outcome>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let n = steps.len();
    let mut outcomes: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
    let mut started = vec![false; n];
    let mut running = FuturesUnordered::new();
    loop {
        // Start, in plan order, what may start; skip what cannot run.
        for i in 0..n {
            if started[i] || running.len() >= concurrency.max(1) {
                continue;
            }
            let after = &steps[i].after;
            if let Some(&because) = after.iter().find(|&&j| {
                matches!(
                    outcomes[j],
                    Some(Outcome::Failed(_) | Outcome::Skipped { .. })
                )
            }) {
                started[i] = true;
                outcomes[i] = Some(Outcome::Skipped { because });
                continue;
            }
            if after
                .iter()
                .all(|&j| matches!(outcomes[j], Some(Outcome::Done)))
            {
                started[i] = true;
                let work = exec(i);
                running.push(async move { (i, work.await) });
            }
        }
        let Some((i, result)) = running.next().await else {
            break;
        };
        outcomes[i] = Some(match result {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Failed(e),
        });
    }
    outcomes
        .into_iter()
        .map(|o| o.expect("every step runs or is skipped: predecessors come first"))
        .collect()
}
