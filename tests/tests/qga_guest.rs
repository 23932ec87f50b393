//! The guest agent in a booted guest under TCG: Debian's `qemu-ga` in the test guest, on a
//! virtio-serial port named `org.qemu.guest_agent.0` given at boot or hot-plugged, driven by
//! `qhotplug-qga` alone and through the VM (`Vm::agent`), which knows from QMP whether an agent
//! runs.

use std::path::PathBuf;
use std::time::Duration;

use qhotplug::{NicConfig, RunState, SerialPortConfig, TapBuilder, VirtioSerialConfig};
use qhotplug_qga::command::{
    ExecStatus, FreezeStatus, GuestExec, GuestExecStatus, GuestFileClose, GuestFileOpen,
    GuestFileRead, GuestFileWrite, GuestFsfreezeFreeze, GuestFsfreezeStatus, GuestFstrim,
    GuestGetDisks, GuestGetFsinfo, GuestGetHostName, GuestGetOsinfo, GuestGetTime,
    GuestGetTimezone, GuestGetUsers, GuestGetVcpus, GuestNetworkGetInterfaces, GuestPing,
    GuestSetTime, GuestSshAddAuthorizedKeys, GuestSshGetAuthorizedKeys,
    GuestSshRemoveAuthorizedKeys, Redacted,
};
use qhotplug_qga::{Agent, Config, Error, FreezeState};
use qhotplug_tests::{pc_spec, with_guest_agent, Guest};

const SEEN: Duration = Duration::from_secs(60);

/// A booted guest, its agent's socket, and the folder that holds it.
async fn boot() -> (Guest, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qga.sock");
    let mut spec = pc_spec();
    with_guest_agent(&mut spec, &socket);
    let guest = Guest::boot(spec, |l| l).await;
    (guest, socket, dir)
}

/// An ext4 filesystem made on the host in `dir`, hot-plugged and mounted at `/mnt` in the guest.
async fn mount_ext4(g: &Guest, dir: &std::path::Path) {
    let fs = qhotplug_tests::storage::ext4_image(dir, "fs.raw", 16);
    let mark = g.console.mark();
    g.vm.add_disk(qhotplug::DiskConfig::virtio_blk("fs", &fs))
        .await
        .unwrap();
    let dev = g.console.added(mark, "block").await;
    let mount = format!("mkdir -p /mnt && mount -t ext4 /dev/{dev} /mnt && echo mounted");
    assert_eq!(g.console.run(&mount, SEEN).await, ["mounted"]);
}

/// Under TCG the agent starts a few seconds after boot and answers slowly: generous waits.
fn patient() -> Config {
    Config::new()
        .timeout(Duration::from_secs(30))
        .sync_timeout(SEEN)
}

/// Waits, with a deadline, until the program the agent started has exited.
async fn exited(agent: &Agent, pid: i64) -> ExecStatus {
    let deadline = tokio::time::Instant::now() + SEEN;
    loop {
        let status = agent.execute(&GuestExecStatus { pid }).await.unwrap();
        if status.exited {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pid {pid} never exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_agent_pings_runs_programs_moves_files_and_lists_a_hot_plugged_nic() {
    qhotplug_tests::serial_test(async {
        let (g, socket, _dir) = boot().await;
        let agent = Agent::connect(&socket, patient()).await.unwrap();
        agent.execute(&GuestPing).await.unwrap();

        // OS info: the kernel the shell reports.
        let os = agent.execute(&GuestGetOsinfo).await.unwrap();
        let uname = g.console.run("uname -r", SEEN).await;
        assert_eq!(os.kernel_release.as_deref(), Some(uname[0].as_str()));
        // And the guest image's /etc/os-release.
        assert_eq!(os.id.as_deref(), Some("qhotplug-guest"));

        // A program's output, error output and exit code.
        let started = agent
            .execute(&GuestExec {
                path: "/bin/sh".into(),
                arg: vec![
                    "-c".into(),
                    "echo from-the-agent; echo oops >&2; exit 3".into(),
                ],
                capture_output: true,
            })
            .await
            .unwrap();
        let status = exited(&agent, started.pid).await;
        assert_eq!(status.exitcode, Some(3));
        assert_eq!(status.stdout(), b"from-the-agent\n");
        assert_eq!(status.stderr(), b"oops\n");

        // A file written by the agent, read by the shell and read back by the agent.
        let open = |mode: &str| GuestFileOpen {
            path: "/tmp/by-agent".into(),
            mode: mode.into(),
        };
        let handle = agent.execute(&open("w")).await.unwrap();
        let written = agent
            .execute(&GuestFileWrite::bytes(handle, b"written by the agent\n"))
            .await
            .unwrap();
        assert_eq!(written.count, 21);
        agent.execute(&GuestFileClose { handle }).await.unwrap();
        assert_eq!(
            g.console.run("cat /tmp/by-agent", SEEN).await,
            ["written by the agent"]
        );
        let handle = agent.execute(&open("r")).await.unwrap();
        let read = agent
            .execute(&GuestFileRead {
                handle,
                count: 4096,
            })
            .await
            .unwrap();
        agent.execute(&GuestFileClose { handle }).await.unwrap();
        assert_eq!(read.bytes(), b"written by the agent\n");

        // The guest's one vCPU, online.
        let vcpus = agent.execute(&GuestGetVcpus).await.unwrap();
        assert_eq!(vcpus.len(), 1);
        assert!(vcpus[0].online);

        // A NIC the SDK hot-plugs shows up in the agent's interface list with its MAC.
        let mac: qhotplug::MacAddr = "52:54:00:a9:0a:01".parse().unwrap();
        let tap = TapBuilder::new("qga%d").create().unwrap();
        let mark = g.console.mark();
        g.vm.add_nic(NicConfig::new("n1", tap).no_vhost().mac(mac))
            .await
            .unwrap();
        g.console.added(mark, "net").await;
        let interfaces = agent.execute(&GuestNetworkGetInterfaces).await.unwrap();
        let macs: Vec<&str> = interfaces
            .iter()
            .filter_map(|i| i.hardware_address.as_deref())
            .collect();
        assert!(macs.contains(&mac.to_string().as_str()), "{interfaces:?}");
    });
}

#[test]
fn an_agent_stopped_mid_command_times_out_typed_and_its_successor_answers_the_next_call() {
    qhotplug_tests::serial_test(async {
        let (g, socket, _dir) = boot().await;
        let agent = Agent::connect(&socket, patient()).await.unwrap();
        agent.execute(&GuestPing).await.unwrap();

        // The agent stops (as if hung); a ping goes unanswered: a timeout, typed, in doubt.
        assert_eq!(
            g.console
                .run("kill -STOP $(pidof qemu-ga) && echo stopped", SEEN)
                .await,
            ["stopped"]
        );
        let hung = agent
            .execute_timeout(&GuestPing, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(
            matches!(hung, Error::Timeout { .. }) && hung.is_in_doubt(),
            "{hung:?}"
        );
        // It is killed and a new one started: it finds the unanswered ping in the port and
        // answers it. The next call resyncs past that stale reply and gets its own.
        let restart = "kill -9 $(pidof qemu-ga); while pidof qemu-ga >/dev/null; do :; done; \
                       start-agent && echo restarted";
        assert_eq!(g.console.run(restart, SEEN).await, ["restarted"]);
        let name = agent.execute(&GuestGetHostName).await.unwrap();
        assert!(!name.host_name.is_empty());
        agent.execute(&GuestPing).await.unwrap();
    });
}

#[test]
fn a_freeze_of_a_mounted_ext4_disk_shows_frozen_and_a_dropped_guard_thaws_it() {
    qhotplug_tests::serial_test(async {
        let (g, socket, dir) = boot().await;
        mount_ext4(&g, dir.path()).await;

        let agent = std::sync::Arc::new(Agent::connect(&socket, patient()).await.unwrap());
        let frozen = agent.freeze(SEEN).await.unwrap();
        assert_eq!(
            frozen.count(),
            1,
            "the ext4 mount (rootfs, proc, sysfs are not frozen)"
        );
        assert_eq!(
            agent.execute(&GuestFsfreezeStatus).await.unwrap(),
            FreezeStatus::Frozen
        );
        // While frozen the agent refuses all but a few commands, typed.
        let refused = agent.execute(&GuestGetHostName).await.unwrap_err();
        assert!(matches!(refused, Error::Frozen { .. }), "{refused:?}");
        // Dropped: a task thaws.
        drop(frozen);
        let deadline = tokio::time::Instant::now() + SEEN;
        while agent.execute(&GuestFsfreezeStatus).await.unwrap() != FreezeStatus::Thawed {
            assert!(tokio::time::Instant::now() < deadline, "never thawed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let write = "echo after > /mnt/f && sync && cat /mnt/f";
        assert_eq!(g.console.run(write, SEEN).await, ["after"]);
    });
}

#[test]
fn a_second_freeze_leaves_the_first_alone_and_a_thaw_the_stopped_agent_never_answers_goes_through_its_successor(
) {
    qhotplug_tests::serial_test(async {
        let (g, socket, dir) = boot().await;
        mount_ext4(&g, dir.path()).await;

        // Short waits per try, and a thaw that keeps trying for two minutes.
        let config = Config::new()
            .timeout(Duration::from_secs(5))
            .sync_timeout(Duration::from_secs(5))
            .thaw_deadline(Duration::from_secs(120));
        let agent = std::sync::Arc::new(Agent::new(&socket, config));
        agent
            .execute_timeout(&GuestPing, SEEN)
            .await
            .expect("the agent answers");
        let first = agent.freeze(Duration::from_secs(600)).await.unwrap();
        assert_eq!(first.state(), FreezeState::Frozen);

        // A second freeze while the guard lives: refused, and the guest stays frozen.
        let second = agent.freeze(SEEN).await.unwrap_err();
        assert!(matches!(second, Error::Frozen { .. }), "{second:?}");
        // qemu-ga's own answer to a freeze while frozen reads as the same refusal.
        let raw = agent.execute(&GuestFsfreezeFreeze).await.unwrap_err();
        assert!(matches!(raw, Error::Frozen { .. }), "{raw:?}");
        assert_eq!(
            agent.execute(&GuestFsfreezeStatus).await.unwrap(),
            FreezeStatus::Frozen
        );
        assert_eq!(first.state(), FreezeState::Frozen);

        // The agent stops (hung): the thaw is not answered, so the guard does not say thawed.
        assert_eq!(
            g.console
                .run("kill -STOP $(pidof qemu-ga) && echo stopped", SEEN)
                .await,
            ["stopped"]
        );
        let watch = agent.clone();
        let thaw = tokio::spawn(first.thaw());
        let deadline = tokio::time::Instant::now() + SEEN;
        while !matches!(watch.freeze_state(), FreezeState::Unknown { .. }) {
            assert!(tokio::time::Instant::now() < deadline, "no try failed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!thaw.is_finished());
        // Its successor starts (the filesystems are still frozen in the kernel): the thaw's
        // next try, after a resync, goes through it.
        // (qemu-ga says on its stderr that it found the filesystems frozen: only the shell's
        // last line is ours.)
        let restart = "kill -9 $(pidof qemu-ga); while pidof qemu-ga >/dev/null; do :; done; \
                       start-agent && echo restarted";
        let said = g.console.run(restart, SEEN).await;
        assert_eq!(
            said.last().map(String::as_str),
            Some("restarted"),
            "{said:?}"
        );
        let thawed = thaw.await.unwrap().unwrap();
        assert_eq!(watch.freeze_state(), FreezeState::Thawed);
        assert!(thawed <= 1, "{thawed}");
        assert_eq!(
            agent.execute(&GuestFsfreezeStatus).await.unwrap(),
            FreezeStatus::Thawed
        );
        let write = "echo after > /mnt/f && sync && cat /mnt/f";
        assert_eq!(g.console.run(write, SEEN).await, ["after"]);
    });
}

#[test]
fn the_vms_agent_is_not_running_until_a_hot_plugged_port_opens_and_one_killed_mid_command_is_gone()
{
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let g = Guest::boot(pc_spec(), |l| l).await;
        // No port: typed, nothing sent.
        assert!(matches!(
            g.vm.agent().await,
            Err(qhotplug::Error::NoGuestAgent)
        ));

        // The controller and the agent's port, hot-plugged; the guest starts qemu-ga on the
        // port's uevent, and QEMU says the port opened.
        g.vm.add_virtio_serial(VirtioSerialConfig::new("vser0"))
            .await
            .unwrap();
        g.vm.add_serial_port(SerialPortConfig::guest_agent(
            "qga0",
            "vser0",
            dir.path().join("qga.sock"),
        ))
        .await
        .unwrap();
        let agent = g.vm.agent().await.unwrap().with_timeout(SEEN);
        agent.wait_running(SEEN).await.unwrap();
        agent.execute(&GuestPing).await.unwrap();

        // Killed: the port closes, and a call is "not running" at once (not a timeout).
        let kill =
            "kill -9 $(pidof qemu-ga); while pidof qemu-ga >/dev/null; do :; done; echo killed";
        assert_eq!(g.console.run(kill, SEEN).await, ["killed"]);
        let closed = tokio::time::Instant::now() + SEEN;
        while agent.is_running() {
            assert!(
                tokio::time::Instant::now() < closed,
                "QEMU never said the port closed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match agent.execute(&GuestPing).await {
            Err(Error::NotRunning { port }) => assert_eq!(port, "qga0"),
            other => panic!("{other:?}"),
        }
        let start = "start-agent && echo started";
        assert_eq!(g.console.run(start, SEEN).await, ["started"]);
        agent.wait_running(SEEN).await.unwrap();
        agent.execute(&GuestPing).await.unwrap();

        // Killed mid-command: the agent hangs (SIGSTOP) with a ping in hand, then is killed.
        // The caller gets "gone", in doubt; after a restart the next call resyncs past the stale
        // ping and gets its own reply.
        let stop = "kill -STOP $(pidof qemu-ga) && echo stopped";
        assert_eq!(g.console.run(stop, SEEN).await, ["stopped"]);
        let pending = tokio::spawn({
            let agent = agent.clone();
            async move { agent.execute(&GuestPing).await }
        });
        assert_eq!(g.console.run(kill, SEEN).await, ["killed"]);
        match pending.await.unwrap() {
            Err(e @ Error::Gone { .. }) => assert!(e.is_in_doubt()),
            other => panic!("{other:?}"),
        }
        assert_eq!(g.console.run(start, SEEN).await, ["started"]);
        agent.wait_running(SEEN).await.unwrap();
        let name = agent.execute(&GuestGetHostName).await.unwrap();
        assert!(!name.host_name.is_empty());
        agent.execute(&GuestPing).await.unwrap();
    });
}

#[test]
fn the_agents_file_system_clock_and_account_calls_do_what_they_say_in_the_guest() {
    let traced = qhotplug_tests::traced::Captured::install();
    let key_material = "AAAAC3NzaC1lZDI1NTE5AAAAI";
    qhotplug_tests::serial_test(async move {
        let (g, socket, dir) = boot().await;
        mount_ext4(&g, dir.path()).await;
        let agent = Agent::connect(&socket, patient()).await.unwrap();
        let slot = match &g
            .vm
            .spec()
            .disks
            .iter()
            .find(|d| d.id == "fs")
            .unwrap()
            .frontend
        {
            qhotplug::DiskFrontend::VirtioBlk(pci) => i64::from(pci.slot),
            other => panic!("{other:?}"),
        };

        // The ext4 disk, mounted at /mnt, at its PCI slot, in both lists.
        let fs = agent.execute(&GuestGetFsinfo).await.unwrap();
        let mnt = fs.iter().find(|f| f.mountpoint == "/mnt").expect("/mnt");
        assert_eq!(mnt.fs_type, "ext4", "{fs:?}");
        assert!(mnt.total_bytes.is_some_and(|t| t > 8 << 20), "{mnt:?}");
        let at = &mnt.disk[0];
        assert_eq!(
            (at.bus_type.as_str(), at.pci_controller.slot),
            ("virtio", slot)
        );
        let disks = agent.execute(&GuestGetDisks).await.unwrap();
        let disk = disks
            .iter()
            .find(|d| {
                d.address
                    .as_ref()
                    .is_some_and(|a| a.pci_controller.slot == slot)
            })
            .expect("the disk in guest-get-disks");
        assert!(
            !disk.partition && disk.name.starts_with("/dev/vd"),
            "{disk:?}"
        );

        // A file written and removed leaves blocks the trim discards.
        let churn = "dd if=/dev/urandom of=/mnt/junk bs=1M count=4 2>/dev/null && sync && rm /mnt/junk && sync && echo gone";
        assert_eq!(g.console.run(churn, SEEN).await, ["gone"]);
        let trim = agent.execute(&GuestFstrim { minimum: None }).await.unwrap();
        let mnt = trim
            .paths
            .iter()
            .find(|p| p.path == "/mnt")
            .expect("/mnt trimmed");
        assert_eq!(mnt.error, None, "{trim:?}");
        assert!(mnt.trimmed.is_some_and(|t| t >= 4 << 20), "{trim:?}");

        // The clock: an hour back, read back; the guest's RTC write reaches QMP; then from the
        // hardware clock, which the set wrote.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        let hour = 3_600_000_000_000i64;
        let mut events = g.vm.client().events();
        agent
            .execute(&GuestSetTime {
                time: Some(now - hour),
            })
            .await
            .unwrap();
        let read = agent.execute(&GuestGetTime).await.unwrap();
        assert!(
            (read - (now - hour)).abs() < 60_000_000_000,
            "{read} vs {now}"
        );
        let rtc = |e: &qhotplug_qmp::EventKind| matches!(e, qhotplug_qmp::EventKind::Other { name } if name == "RTC_CHANGE");
        assert!(
            events
                .wait_for(tokio::time::Instant::now() + SEEN, rtc)
                .await
        );
        agent.execute(&GuestSetTime { time: None }).await.unwrap();
        let read = agent.execute(&GuestGetTime).await.unwrap();
        assert!(
            (read - (now - hour)).abs() < 60_000_000_000,
            "from the RTC: {read}"
        );
        agent
            .execute(&GuestSetTime { time: Some(now) })
            .await
            .unwrap();
        let zone = agent.execute(&GuestGetTimezone).await.unwrap();
        assert_eq!((zone.zone.as_deref(), zone.offset), (Some("UTC"), 0));
        // Nobody logged in (no utmp).
        assert_eq!(agent.execute(&GuestGetUsers).await.unwrap(), []);

        // ssh keys: added, listed, replaced, removed, as root's authorized_keys shows them.
        let key = |n: u8| Redacted::new(format!("ssh-ed25519 {key_material}{n} k{n}@host"));
        let get = GuestSshGetAuthorizedKeys {
            username: "root".into(),
        };
        let add = |keys, reset| GuestSshAddAuthorizedKeys {
            username: "root".into(),
            keys,
            reset,
        };
        agent.execute(&add(vec![key(1)], None)).await.unwrap();
        agent.execute(&add(vec![key(2)], None)).await.unwrap();
        // In whatever order the agent keeps them (7.2 puts a new one first).
        let exposed = |keys: Vec<Redacted>| -> Vec<String> {
            let mut keys: Vec<String> = keys.iter().map(|k| k.expose().to_owned()).collect();
            keys.sort();
            keys
        };
        let got = exposed(agent.execute(&get).await.unwrap().keys);
        assert_eq!(got, exposed(vec![key(1), key(2)]));
        // (Its last line has no newline: sorted, every line has one.)
        let file = "sort /root/.ssh/authorized_keys";
        let lines: Vec<String> = [key(1), key(2)]
            .iter()
            .map(|k| k.expose().to_owned())
            .collect();
        assert_eq!(g.console.run(file, SEEN).await, lines);
        agent.execute(&add(vec![key(3)], Some(true))).await.unwrap();
        assert_eq!(agent.execute(&get).await.unwrap().keys, [key(3)]);
        let remove = GuestSshRemoveAuthorizedKeys {
            username: "root".into(),
            keys: vec![key(3)],
        };
        agent.execute(&remove).await.unwrap();
        assert!(agent.execute(&get).await.unwrap().keys.is_empty());

        // A password, through the VM's agent handle, as a Secret: the guest's shadow entry is
        // that password's hash (checked in the guest with its own salt).
        drop(agent); // The port's socket takes one client at a time.
        let vm_agent = g.vm.agent().await.unwrap();
        vm_agent.wait_running(SEEN).await.unwrap();
        let password = qhotplug::Secret::new("Hunter2-in-guest");
        vm_agent
            .set_user_password("root", &password, false)
            .await
            .unwrap();
        let check = "h=$(grep ^root: /etc/shadow | cut -d: -f2); s=$(echo \"$h\" | cut -d'$' -f3); \
                     [ \"$(printf %s Hunter2-in-guest | mkpasswd -P 0 -m sha512 -S \"$s\")\" = \"$h\" ] && echo match";
        assert_eq!(g.console.run(check, SEEN).await, ["match"]);
        let unresolved = qhotplug::Secret::unresolved("vault:root");
        let refused = vm_agent
            .set_user_password("root", &unresolved, false)
            .await
            .unwrap_err();
        assert!(matches!(refused, qhotplug::Error::Spec(_)), "{refused:?}");
    });
    // Nothing the SDK traced, at any level, holds the password or a key (base64 either).
    let traced = traced.sdk_text();
    assert!(
        traced.contains("guest-set-user-password"),
        "the capture saw the calls"
    );
    let sent = qhotplug_qga::command::GuestSetUserPassword::new("root", b"Hunter2-in-guest", false);
    for secret in ["Hunter2-in-guest", sent.password.expose(), key_material] {
        let at = traced.find(secret);
        let around = at.map(|i| &traced[i.saturating_sub(300)..(i + 100).min(traced.len())]);
        assert!(at.is_none(), "{secret} traced: {around:?}");
    }
}

#[test]
fn the_guest_suspends_to_ram_through_its_agent_and_wakes_on_system_wakeup() {
    qhotplug_tests::serial_test(async {
        let (g, _socket, _dir) = boot().await;
        let agent = g.vm.agent().await.unwrap();
        agent.wait_running(SEEN).await.unwrap();
        g.vm.suspend(SEEN).await.unwrap();
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Suspended);
        g.vm.wakeup(SEEN).await.unwrap();
        assert_eq!(g.vm.run_state().await.unwrap(), RunState::Running);
        // The guest runs on where it was: its agent answers (resynchronised), then its shell
        // (once the agent runs, so has the guest's resume, the console's UART with it).
        agent.execute(&GuestPing).await.unwrap();
        assert_eq!(g.console.run("echo awake", SEEN).await, ["awake"]);
        // Waking a guest that is not suspended does nothing.
        g.vm.wakeup(SEEN).await.unwrap();
    });
}
