//! The guest's front panel from the Nova seed, on real QEMU: a VNC display (a Unix socket with a
//! password set over QMP, or a TCP address), a USB tablet, and two serial consoles (a log file
//! appended to, and an interactive pty whose path the SDK reads back).

use qhotplug::{Serial, Vnc, VncListen};
use qhotplug_qmp::command::{QomList, QueryChardev, QueryVnc};
use qhotplug_tests::{pc_spec, TestVm};

#[test]
fn vnc_with_a_password_a_usb_tablet_a_log_console_and_a_pty() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, "kept from before\n").unwrap();
        let mut spec = pc_spec();
        spec.serials = vec![Serial::File(log.clone()), Serial::Pty];
        spec.vnc = Some(Vnc {
            listen: VncListen::Unix(dir.path().join("vnc.sock")),
            password: Some(qhotplug::Secret::new("s3cret-pw")),
        });
        spec.usb_tablet = true;
        let t = TestVm::launch(spec).await;
        let c = t.vm.client();

        let vnc = c.execute(&QueryVnc).await.unwrap();
        assert!(vnc.enabled, "{vnc:?}");
        assert_eq!(vnc.auth.as_deref(), Some("vnc"), "{vnc:?}");
        assert!(dir.path().join("vnc.sock").exists());
        // Set over QMP: never on the command line, where any local user could read it.
        let argv = std::fs::read(format!("/proc/{}/cmdline", t.vm.pid().unwrap())).unwrap();
        assert!(!String::from_utf8_lossy(&argv).contains("s3cret-pw"));
        assert!(
            !format!("{:?}", t.vm.spec()).contains("s3cret-pw"),
            "Debug redacts it"
        );

        let chardevs = c.execute(&QueryChardev).await.unwrap();
        let serial0 = chardevs.iter().find(|c| c.label == "serial0").unwrap();
        let serial1 = chardevs.iter().find(|c| c.label == "serial1").unwrap();
        assert!(serial1.filename.starts_with("pty:"), "{serial1:?}");
        let pty = t.vm.serial_pty(1).await.unwrap().expect("a pty");
        assert!(pty.starts_with("/dev/pts/") && pty.exists(), "{pty:?}");
        assert_eq!(t.vm.serial_pty(0).await.unwrap(), None, "{serial0:?}");
        // The log is appended to, not truncated.
        assert!(std::fs::read_to_string(&log)
            .unwrap()
            .starts_with("kept from before"));

        let peripherals = c
            .execute(&QomList {
                path: "/machine/peripheral".into(),
            })
            .await
            .unwrap();
        assert!(peripherals
            .iter()
            .any(|p| p.name == "tablet0" && p.child_type() == Some("usb-tablet")));
    });
}

#[test]
fn vnc_on_a_tcp_address_without_a_password() {
    qhotplug_tests::serial_test(async {
        // A free display: the first port from 5900 nothing listens on.
        let display = (0..100u16)
            .find(|d| std::net::TcpListener::bind(("127.0.0.1", 5900 + d)).is_ok())
            .expect("a free VNC port");
        let mut spec = pc_spec();
        spec.vnc = Some(Vnc {
            listen: VncListen::Tcp {
                host: "127.0.0.1".into(),
                display,
            },
            password: None,
        });
        let t = TestVm::launch(spec).await;
        let vnc = t.vm.client().execute(&QueryVnc).await.unwrap();
        assert!(vnc.enabled);
        assert_eq!(vnc.host.as_deref(), Some("127.0.0.1"));
        assert_eq!(vnc.service, Some((5900 + display).to_string()));
        assert_eq!(vnc.auth.as_deref(), Some("none"));
    });
}
