//! The error contract on real QEMU: each cause is printed once (a layer's `Display` says what it
//! adds; its cause is `source()`), so a reporter that walks the chain repeats nothing; and the
//! predicates a caller branches on say what happened.

use std::error::Error as _;

use qhotplug::{DiskConfig, Error, Pci};
use qhotplug_qmp::Chain;
use qhotplug_tests::{pc_spec, TestVm};

/// Each error in `e`'s chain, as its own `Display` says it.
fn layers(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push(c.to_string());
        cause = c.source();
    }
    out
}

/// Asserts no layer of `e` repeats what a layer under it says.
fn says_each_cause_once(e: &(dyn std::error::Error + 'static)) {
    let layers = layers(e);
    for (i, upper) in layers.iter().enumerate() {
        for lower in &layers[i + 1..] {
            assert!(
                !upper.contains(lower.as_str()),
                "{upper:?} repeats its cause {lower:?}; the chain: {}",
                Chain(e)
            );
        }
    }
}

#[test]
fn a_failed_step_reads_once_through_a_reporter() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let path = t.image("e.raw", 1);
        let err =
            t.vm.add_disk(DiskConfig::virtio_blk("e1", &path).at_pci(Pci::new("nobus.0", 1)))
                .await
                .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Step {
                    step: "device_add",
                    ..
                }
            ),
            "{err:?}"
        );
        says_each_cause_once(&err);
        // What a reporter prints: the SDK's words, then QEMU's, each once.
        let report = Chain(&err).to_string();
        assert!(
            report.starts_with(
                "hot-add of \"e1\" failed at device_add: QMP command `device_add` failed:"
            ),
            "{report}"
        );
        assert_eq!(report.matches("nobus.0").count(), 1, "{report}");
        assert!(err.source().is_some());
        // Commands were sent (and undone): not "nothing sent".
        assert!(!err.nothing_sent() && !err.is_guest_refusal() && !err.is_out_of_room());
        assert!(!err.is_disconnected());
    });
}

#[test]
fn the_predicates_say_what_happened() {
    qhotplug_tests::serial_test(async {
        let t = TestVm::launch(pc_spec()).await;
        let path = t.image("p.raw", 1);
        t.vm.add_disk(DiskConfig::virtio_blk("p1", &path))
            .await
            .unwrap();
        let before = t.snapshot().await;
        // Refused before anything was sent.
        let duplicate =
            t.vm.add_disk(DiskConfig::virtio_blk("p1", &path))
                .await
                .unwrap_err();
        assert!(duplicate.nothing_sent(), "{duplicate:?}");
        let missing = t.vm.remove_disk("nope").await.unwrap_err();
        assert!(missing.nothing_sent(), "{missing:?}");
        let unopenable =
            t.vm.add_disk(DiskConfig::virtio_blk("p2", t.dir().join("absent.raw")))
                .await
                .unwrap_err();
        assert!(unopenable.nothing_sent(), "{unopenable:?}");
        says_each_cause_once(&unopenable);
        assert!(Chain(&unopenable).to_string().contains("No such file"));
        // Out of room: a taken slot is not "out of room", a full bus is.
        let taken =
            t.vm.add_disk(DiskConfig::virtio_blk("p3", &path).at_pci(Pci::new("pci.0", 3)))
                .await
                .unwrap_err();
        assert!(taken.nothing_sent() && !taken.is_out_of_room(), "{taken:?}");
        assert_eq!(t.snapshot().await, before);
        // A guest that does not answer (no guest here): the unplug is pending.
        let brief = t.vm.with_unplug_policy(qhotplug::UnplugPolicy::new(
            std::time::Duration::from_millis(200),
        ));
        let pending = brief.remove_disk("p1").await.unwrap_err();
        assert!(pending.is_guest_refusal(), "{pending:?}");
        assert!(!pending.nothing_sent());
    });
}
