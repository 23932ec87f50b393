//! Hot-unplug against real guests: the busy path of PCIe native hotplug, ACPI hotplug on pc, and
//! a guest that does not answer. Each test counts the `device_del`s the SDK pressed, from its own
//! trace, and checks them against what the unplug policy intends: press until QEMU accepts (or
//! says an unplug is under way), never again after that.

use std::time::Duration;

use qhotplug::{DiskConfig, Error, UnplugPolicy};
use qhotplug_qmp::command::{Cont, Stop};
use qhotplug_tests::timing::Presses;
use qhotplug_tests::{image, pc_spec, q35_spec, Guest};
use tracing_subscriber::layer::SubscriberExt;

/// How long the guest may take to report a device (TCG).
const SEEN: Duration = Duration::from_secs(60);

/// Checks that one call's presses were some "busy" refusals, then one that ended the pressing
/// (accepted, under way, or the device already gone), and nothing after it. Returns how many were
/// refused as busy.
fn pressed_as_intended(verdicts: &[String]) -> usize {
    let (last, before) = verdicts.split_last().expect("at least one device_del");
    assert!(
        last == "accepted" || last == "under way" || last == "absent",
        "the last press: {verdicts:?}"
    );
    assert!(
        before.iter().all(|v| v == "busy"),
        "pressed again after QEMU accepted: {verdicts:?}"
    );
    before.len()
}

/// Hot-adds a virtio-blk disk and waits until the guest reports it.
async fn plug_and_see(g: &Guest, id: &str, path: &std::path::Path) {
    let mark = g.console.mark();
    g.vm.add_disk(DiskConfig::virtio_blk(id, path))
        .await
        .unwrap();
    let disk = g.console.added(mark, "block").await;
    assert!(disk.starts_with("vd"), "{disk}");
}

/// Plugs a disk, unplugs it at once, and checks it is gone, in QEMU and in the guest.
async fn plug_then_unplug_at_once(g: &Guest) -> Vec<String> {
    let presses = Presses::default();
    let _trace =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(presses.clone()));
    let path = image(g.dir(), "u.raw", 1);
    let mark = g.console.mark();
    g.vm.add_disk(DiskConfig::virtio_blk("u1", &path))
        .await
        .unwrap();
    g.vm.remove_disk("u1").await.unwrap();
    assert!(!g.vm.has_device("u1").await.unwrap());
    assert!(g.vm.disks().is_empty());
    assert!(!g.vm.unplug_pending("u1"));
    // The guest does not have it: either it saw the disk come and go, or the unplug completed
    // before it had enumerated the disk at all. Either way no block device is left.
    let listed = g.console.run("ls /sys/block", SEEN).await;
    assert!(
        !listed.iter().any(|l| l.contains("vd")),
        "the guest still lists a virtio disk: {listed:?}"
    );
    let saw_add = g.console.lines()[mark..]
        .iter()
        .any(|l| l.contains("qhg: add block vd"));
    println!("the guest saw the disk arrive before it went: {saw_add}");
    presses.verdicts()
}

#[test]
fn q35_native_pcie_plug_then_immediate_unplug_presses_again_only_while_busy() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(native_pcie(q35_spec(2)), |l| l).await;
        let verdicts = plug_then_unplug_at_once(&g).await;
        let busy = pressed_as_intended(&verdicts);
        println!(
            "QEMU {}: presses {verdicts:?} ({busy} refused as busy)",
            g.vm.client().greeting().version.qemu
        );
    });
}

#[test]
fn pc_acpi_plug_then_immediate_unplug_presses_once() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let verdicts = plug_then_unplug_at_once(&g).await;
        assert_eq!(pressed_as_intended(&verdicts), 0, "{verdicts:?}");
    });
}

#[test]
fn a_guest_that_does_not_answer_ends_pending_and_a_later_call_completes_it() {
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(pc_spec(), |l| l).await;
        let path = image(g.dir(), "p.raw", 1);
        plug_and_see(&g, "p1", &path).await;
        // A guest that is not running cannot answer.
        g.vm.client().execute(&Stop).await.unwrap();
        let presses = Presses::default();
        let _trace =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(presses.clone()));
        let hasty =
            g.vm.with_unplug_policy(UnplugPolicy::new(Duration::from_secs(1)));
        match hasty.remove_disk("p1").await {
            Err(Error::UnplugPending { id, after }) => {
                assert_eq!((id.as_str(), after), ("p1", Duration::from_secs(1)))
            }
            other => panic!("{other:?}"),
        }
        assert!(g.vm.unplug_pending("p1"));
        assert_eq!(g.vm.disks().len(), 1, "kept while pending");
        assert!(g.vm.has_device("p1").await.unwrap());
        // The guest runs again; a later call completes the removal without pressing while QEMU
        // says the first press is under way.
        let mark = g.console.mark();
        g.vm.client().execute(&Cont).await.unwrap();
        g.vm.remove_disk("p1").await.unwrap();
        assert!(!g.vm.has_device("p1").await.unwrap());
        assert!(g.vm.disks().is_empty() && !g.vm.unplug_pending("p1"));
        g.console
            .wait_for(mark, "qhg: remove block vd", SEEN)
            .await
            .expect("the guest saw the disk go");
        // One press per call. On pc, QEMU 7.2 accepts the second (ACPI sends the eject request
        // again; nothing toggles); a QEMU that says the unplug is under way gets no second press.
        let verdicts = presses.verdicts();
        assert_eq!(verdicts.len(), 2, "{verdicts:?}");
        assert_eq!(verdicts[0], "accepted", "{verdicts:?}");
        pressed_as_intended(&verdicts[1..]);
        println!(
            "QEMU {}: presses {verdicts:?}",
            g.vm.client().greeting().version.qemu
        );
    });
}

/// The two refusals of a press that PCIe native hotplug gives, produced on the QEMU under test
/// and classified by `qhotplug::qemu_errors`: a second press while the first is under way, and
/// (timing permitting) a press while the slot's power indicator still blinks after a hot-add.
#[test]
fn pcie_refusals_of_a_press_are_classified_on_this_qemu() {
    use qhotplug::qemu_errors::{is_absent, is_guest_busy, is_unplug_under_way};
    use qhotplug_qmp::command::DeviceDel;
    qhotplug_tests::serial_test(async {
        let g = Guest::boot(native_pcie(q35_spec(2)), |l| l).await;
        let c = g.vm.client();
        let path = image(g.dir(), "r.raw", 1);
        // Pressed at once after the hot-add: accepted, or refused as busy.
        g.vm.add_disk(DiskConfig::virtio_blk("r0", &path))
            .await
            .unwrap();
        let mut events = c.events();
        let first = c.execute(&DeviceDel { id: "r0".into() }).await;
        if let Err(e) = &first {
            assert!(
                is_guest_busy(e) && !is_absent(e) && !is_unplug_under_way(e),
                "{e}"
            );
        }
        println!(
            "QEMU {}: a press right after the hot-add: {first:?}",
            c.greeting().version.qemu
        );
        if first.is_ok() {
            qhotplug_tests::guest::deleted(&mut events, "r0").await;
        } else {
            g.vm.remove_disk("r0").await.unwrap();
        }
        // Plugged and seen by the guest, then pressed twice: the second is refused as under way.
        plug_and_see(&g, "r1", &path).await;
        let mut events = c.events();
        c.execute(&DeviceDel { id: "r1".into() }).await.unwrap();
        let second = c.execute(&DeviceDel { id: "r1".into() }).await.unwrap_err();
        assert!(is_unplug_under_way(&second), "{second}");
        assert!(!is_guest_busy(&second) && !is_absent(&second), "{second}");
        qhotplug_tests::guest::deleted(&mut events, "r1").await;
    });
}

/// `spec` with PCIe native hotplug instead of q35's default ACPI hotplug (QEMU 6.1+).
fn native_pcie(mut spec: qhotplug::VmSpec) -> qhotplug::VmSpec {
    spec.extra_args = vec![
        "-global".into(),
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".into(),
    ];
    spec
}
