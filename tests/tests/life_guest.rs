//! The VM's life with a real guest under TCG: graceful shutdown through the agent and through
//! the ACPI power button (busybox's `acpid` in the test guest), a guest that ignores the button
//! quit at the deadline, a reboot through the agent, pause and resume, the run state, and a guest
//! panic reported through pvpanic as a typed event.

use std::time::Duration;

use qhotplug::{EventKind, PowerVia, RunState, Stopped, VmSpec};
use qhotplug_tests::{pc_spec, Guest};

const SEEN: Duration = Duration::from_secs(90);

/// Boots `spec` (with the agent's port when `agent`, and waits for the agent).
async fn boot(spec: VmSpec, agent: bool) -> Guest {
    if agent {
        Guest::boot_with_agent(spec).await
    } else {
        Guest::boot(spec, |l| l).await
    }
}

/// True while a process with this pid exists (a zombie included: reaped means gone).
fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn graceful_shutdown_through_the_agent_ends_with_shutdown_inside_the_deadline() {
    qhotplug_tests::serial_test(async {
        let g = boot(pc_spec(), true).await;
        let pid = g.vm.pid().unwrap();
        let deadline = SEEN;
        match g.vm.shutdown(PowerVia::Auto, deadline).await.unwrap() {
            Stopped::Graceful { via, reason, after } => {
                assert_eq!(via, PowerVia::Agent);
                assert_eq!(reason.as_deref(), Some("guest-shutdown"));
                assert!(after < deadline);
            }
            other => panic!("{other:?}"),
        }
        // QEMU exited by itself and was reaped.
        assert!(!exists(pid), "QEMU {pid} is still there");
    });
}

#[test]
fn the_power_button_shuts_a_listening_guest_down_and_one_that_ignores_it_is_quit_at_the_deadline() {
    qhotplug_tests::serial_test(async {
        // No agent: Auto presses the ACPI button; the guest's acpid powers off.
        let g = boot(pc_spec(), false).await;
        let pid = g.vm.pid().unwrap();
        match g.vm.shutdown(PowerVia::Auto, SEEN).await.unwrap() {
            Stopped::Graceful { via, reason, .. } => {
                assert_eq!(via, PowerVia::Acpi);
                assert_eq!(reason.as_deref(), Some("guest-shutdown"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!exists(pid));

        // A guest that ignores the button (no acpid) is quit at the deadline; it says so.
        let mut spec = pc_spec();
        spec.append = Some("qhg.power_button=ignore".into());
        let g = boot(spec, false).await;
        let pid = g.vm.pid().unwrap();
        let mut events = g.vm.client().events();
        let deadline = Duration::from_secs(3);
        let started = tokio::time::Instant::now();
        let stopped = g.vm.shutdown(PowerVia::Acpi, deadline).await.unwrap();
        assert_eq!(
            stopped,
            Stopped::Forced {
                via: PowerVia::Acpi,
                deadline
            }
        );
        assert!(!stopped.is_graceful());
        assert!(started.elapsed() >= deadline);
        assert!(!exists(pid), "QEMU {pid} is still there");
        // The button was pressed (`POWERDOWN`), and the shutdown was the host's (`quit`).
        let mut seen = Vec::new();
        while let Some(Ok(e)) = futures::StreamExt::next(&mut events).await {
            seen.push(e.kind().clone());
        }
        assert!(seen.contains(&EventKind::Powerdown), "{seen:?}");
        assert!(
            seen.iter().any(
                |k| matches!(k, EventKind::Shutdown(c) if c.reason == "host-qmp-quit" && !c.guest)
            ),
            "{seen:?}"
        );
    });
}

#[test]
fn the_guest_reboots_through_its_agent_and_pauses_and_resumes() {
    qhotplug_tests::serial_test(async {
        let g = boot(pc_spec(), true).await;
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Running);

        // Pause: the vCPUs stop (`STOP`), and QEMU says paused; resume: running again.
        let mut events = g.vm.client().events();
        g.vm.pause().await.unwrap();
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Paused);
        let until = tokio::time::Instant::now() + SEEN;
        assert!(events.wait_for(until, |k| *k == EventKind::Stop).await);
        g.vm.resume().await.unwrap();
        assert!(events.wait_for(until, |k| *k == EventKind::Resume).await);
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Running);
        // The paused guest lost nothing: its shell answers.
        assert_eq!(g.console.run("echo still-here", SEEN).await, ["still-here"]);

        // A reboot through the agent: `RESET` from the guest, and the guest boots again.
        let mark = g.console.mark();
        match g.vm.reboot(PowerVia::Auto, SEEN).await.unwrap() {
            Stopped::Graceful { via, reason, .. } => {
                assert_eq!(via, PowerVia::Agent);
                assert_eq!(reason.as_deref(), Some("guest-reset"));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            g.console.wait_for(mark, "qhg: ready", SEEN).await.is_some(),
            "the guest did not boot again"
        );
        // Its agent is back, and answers.
        let agent = g.vm.agent().await.unwrap();
        agent.wait_running(SEEN).await.unwrap();
        agent
            .with_timeout(SEEN)
            .execute(&qhotplug::agent::GuestPing)
            .await
            .unwrap();
    });
}

#[test]
fn a_guest_panic_reported_through_pvpanic_is_a_typed_event() {
    qhotplug_tests::serial_test(async {
        let g = boot(pc_spec(), false).await;
        // A pvpanic-pci device (the SDK has no kind for it: the test's own QMP), bound by the
        // guest's driver.
        g.vm.client()
            .execute_raw(
                "device_add",
                &serde_json::json!({"driver": "pvpanic-pci", "id": "panic0", "bus": "pci.0", "addr": "0x9"}),
            )
            .await
            .unwrap();
        g.console
            .until(
                "ls /sys/bus/pci/drivers/pvpanic-pci/ | grep -c :",
                |out| out.last().map(String::as_str) == Some("1"),
                SEEN,
            )
            .await;
        let mut events = g.vm.client().events();
        g.console.send("echo c > /proc/sysrq-trigger").await;
        let until = tokio::time::Instant::now() + SEEN;
        let mut panicked = None;
        let seen = events
            .wait_for(until, |k| {
                if let EventKind::GuestPanicked(p) = k {
                    panicked = Some(p.clone());
                    true
                } else {
                    false
                }
            })
            .await;
        assert!(seen, "no GUEST_PANICKED");
        // QEMU's `-action panic=` default on 7.2 and 10.0: power off, the guest's doing.
        assert_eq!(panicked.unwrap().action, "poweroff");
        let mut reason = None;
        assert!(
            events
                .wait_for(until, |k| match k {
                    EventKind::Shutdown(c) => {
                        reason = Some((c.guest, c.reason.clone()));
                        true
                    }
                    _ => false,
                })
                .await
        );
        assert_eq!(reason, Some((true, "guest-panic".to_owned())));
    });
}
