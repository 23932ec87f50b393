//! Real tap devices (the test machines run as root). Every test here takes one lock across
//! processes (nextest runs each test in its own), and "nothing left behind" compares the links
//! named `qht…`, the prefix only these tests use: other test binaries create taps of their own
//! meanwhile.

use qhotplug_netdev::*;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

fn serial() -> std::fs::File {
    qhotplug_tests::process_lock("netdev-taps")
}

fn links() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    assert!(out.status.success());
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_owned())
        .filter(|n| n.starts_with("qht"))
        .collect();
    names.sort();
    names
}

fn sys(name: &str, attr: &str) -> String {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join(attr))
        .unwrap_or_else(|e| panic!("{name}/{attr}: {e}"))
        .trim()
        .to_owned()
}

fn tun_flags(name: &str) -> i32 {
    i32::from_str_radix(sys(name, "tun_flags").trim_start_matches("0x"), 16).unwrap()
}

fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {args:?}");
}

/// Removes what an earlier, interrupted run may have left.
fn remove_link(name: &str) {
    let _ = Command::new("ip")
        .args(["link", "del", name])
        .stderr(std::process::Stdio::null())
        .status();
}

const TAP: i32 = 0x0002;
const NO_PI: i32 = 0x1000;
const VNET_HDR: i32 = 0x4000;
const MULTI_QUEUE: i32 = 0x0100;

#[test]
fn single_queue_flags_follow_the_vnet_hdr_policy() {
    let _s = serial();
    let auto = TapBuilder::new("qht-auto%d").create().unwrap();
    assert!(
        auto.name().starts_with("qht-auto"),
        "the kernel's name: {}",
        auto.name()
    );
    assert_eq!(auto.queues().len(), 1);
    assert!(auto.vnet_hdr(), "this kernel offers IFF_VNET_HDR");
    assert_eq!(tun_flags(auto.name()), TAP | NO_PI | VNET_HDR);

    let refused = TapBuilder::new("qht-novnet")
        .vnet_hdr(VnetHdr::Refuse)
        .create()
        .unwrap();
    assert_eq!(refused.name(), "qht-novnet");
    assert!(!refused.vnet_hdr());
    assert_eq!(tun_flags("qht-novnet"), TAP | NO_PI);

    let required = TapBuilder::new("qht-req%d")
        .vnet_hdr(VnetHdr::Require)
        .create()
        .unwrap();
    assert_eq!(tun_flags(required.name()), TAP | NO_PI | VNET_HDR);
}

#[test]
fn n_queues_give_n_fds_on_one_multiqueue_device() {
    let _s = serial();
    let tap = TapBuilder::new("qht-mq%d").queues(4).create().unwrap();
    assert_eq!(tap.queues().len(), 4);
    assert_eq!(tun_flags(tap.name()), TAP | NO_PI | VNET_HDR | MULTI_QUEUE);
    // Every queue fd is close-on-exec (O_CLOEXEC is 02000000 in fdinfo's octal flags).
    for fd in tap.queues() {
        let info =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_ne!(
            flags & 0o2000000,
            0,
            "fd {} lacks O_CLOEXEC",
            fd.as_raw_fd()
        );
    }
    // The same name again attaches more queues to the device while it exists.
    let more = TapBuilder::new(tap.name()).queues(2).create().unwrap();
    assert_eq!(more.name(), tap.name());
}

#[test]
fn a_tap_goes_away_with_its_fds_unless_persistent() {
    let _s = serial();
    let tap = TapBuilder::new("qht-gone").queues(2).create().unwrap();
    assert!(exists("qht-gone"));
    drop(tap);
    assert!(
        !exists("qht-gone"),
        "a non-persistent tap disappears when its fds close"
    );

    let tap = TapBuilder::new("qht-keep")
        .persistent(true)
        .owner(4242)
        .create()
        .unwrap();
    assert!(tap.is_persistent());
    assert_eq!(sys("qht-keep", "owner"), "4242");
    drop(tap);
    assert!(exists("qht-keep"), "a persistent tap stays");
    assert_ne!(tun_flags("qht-keep") & 0x0800, 0, "IFF_PERSIST");
    delete_persistent("qht-keep").unwrap();
    assert!(!exists("qht-keep"));
}

#[test]
fn link_mac_mtu_and_bridge() {
    let _s = serial();
    remove_link("qht-br0");
    ip(&["link", "add", "qht-br0", "type", "bridge"]);
    let guest = MacAddr::random_qemu();
    let tap = TapBuilder::new("qht-port%d")
        .mac(guest.host_side())
        .mtu(1400)
        .bridge("qht-br0")
        .up(true)
        .create()
        .unwrap();
    let name = tap.name().to_owned();
    assert_eq!(sys(&name, "address"), guest.host_side().to_string());
    assert_eq!(sys(&name, "mtu"), "1400");
    let flags = u32::from_str_radix(sys(&name, "flags").trim_start_matches("0x"), 16).unwrap();
    assert_ne!(flags & 1, 0, "IFF_UP");
    let master =
        std::fs::read_link(Path::new("/sys/class/net").join(&name).join("master")).unwrap();
    assert_eq!(master.file_name().unwrap(), "qht-br0");

    tap.detach_from_bridge("qht-br0").unwrap();
    assert!(!Path::new("/sys/class/net")
        .join(&name)
        .join("master")
        .exists());
    drop(tap);
    ip(&["link", "del", "qht-br0"]);
}

#[test]
fn bad_input_is_a_typed_error_and_leaves_nothing_behind() {
    let _s = serial();
    remove_link("qht-notap");
    ip(&["link", "add", "qht-notap", "type", "bridge"]);
    let before = links();
    let cases: Vec<(&str, TapBuilder)> = vec![
        ("16 bytes", TapBuilder::new("qht-0123456789ab")),
        ("slash", TapBuilder::new("qht/x")),
        ("space", TapBuilder::new("qht x")),
        ("bad %", TapBuilder::new("qht%s")),
        ("two %d", TapBuilder::new("qht%d%d")),
        ("zero queues", TapBuilder::new("qht-z%d").queues(0)),
        ("257 queues", TapBuilder::new("qht-z%d").queues(257)),
        ("not a tap", TapBuilder::new("qht-notap")),
        (
            "no such bridge",
            TapBuilder::new("qht-nb%d").bridge("qht-nobridge"),
        ),
        (
            "multicast MAC",
            TapBuilder::new("qht-mc%d").mac("01:00:5e:00:00:01".parse().unwrap()),
        ),
        ("MTU too large", TapBuilder::new("qht-mtu%d").mtu(1 << 20)),
    ];
    for (what, builder) in cases {
        let err = builder.create().expect_err(what);
        match (what, &err) {
            ("not a tap", Error::NotATap(n)) => assert_eq!(n, "qht-notap"),
            ("zero queues" | "257 queues", Error::InvalidQueues(_)) => {}
            ("multicast MAC", Error::InvalidMac(_)) => {}
            (
                "MTU too large",
                Error::Sys {
                    op: "SIOCSIFMTU", ..
                },
            ) => {}
            ("no such bridge", Error::Sys { .. }) => {}
            (_, Error::InvalidName { .. }) => {}
            _ => panic!("{what}: unexpected error {err:?}"),
        }
        assert_eq!(links(), before, "{what} left something behind");
    }
    assert!(matches!(
        delete_persistent("qht-notap"),
        Err(Error::NotATap(_))
    ));
    ip(&["link", "del", "qht-notap"]);
}

#[test]
fn vhost_net_is_used_when_present_and_its_absence_is_reported() {
    let _s = serial();
    let present = Path::new("/dev/vhost-net").exists();
    match open_vhost(2, VhostPolicy::Prefer).unwrap() {
        Vhost::Enabled(fds) => {
            assert!(present);
            assert_eq!(fds.len(), 2);
        }
        Vhost::Unavailable { reason } => {
            assert!(
                !present,
                "vhost-net exists but could not be opened: {reason}"
            );
            let err = open_vhost(2, VhostPolicy::Require).unwrap_err();
            assert!(matches!(err, Error::Sys { op: "open", .. }), "{err}");
        }
    }
    assert!(matches!(
        open_vhost(0, VhostPolicy::Prefer),
        Err(Error::InvalidQueues(0))
    ));
}
