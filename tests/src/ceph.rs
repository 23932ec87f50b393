//! A real single-node Ceph cluster for the RBD tests, from Debian's `ceph-mon` and `ceph-osd`:
//! one monitor on a free loopback port and one OSD on `memstore` (Ceph's in-memory object store,
//! so no disk is formatted), with `cephx` on and a pool `rbd` of one replica. It starts in a few
//! seconds; both daemons run in the foreground as children, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::servers::{free_port, wait_until};

/// One monitor and one OSD, and the pool `rbd`.
pub struct CephCluster {
    dir: PathBuf,
    port: u16,
    daemons: Vec<Child>,
}

impl CephCluster {
    /// The pool the cluster has.
    pub const POOL: &'static str = "rbd";

    /// Makes and starts a cluster in `dir` (created), and waits until its OSD is up and the pool
    /// `rbd` is ready for images.
    pub fn start(dir: &Path) -> CephCluster {
        std::fs::create_dir_all(dir.join("mon")).unwrap();
        std::fs::create_dir_all(dir.join("osd")).unwrap();
        let port = free_port();
        let d = dir.display();
        let fsid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        // Messenger v1 only, on loopback; a monitor that does not stop when the host's disk is
        // fuller than Ceph likes (`mon data avail crit`); everything under `dir`.
        std::fs::write(
            dir.join("ceph.conf"),
            format!(
                "[global]\nfsid = {fsid}\nmon host = v1:127.0.0.1:{port}\n\
                 mon initial members = a\nms bind msgr2 = false\n\
                 public addr = 127.0.0.1\ncluster addr = 127.0.0.1\n\
                 auth cluster required = cephx\nauth service required = cephx\n\
                 auth client required = cephx\n\
                 osd pool default size = 1\nosd pool default min size = 1\n\
                 mon allow pool size one = true\nmon warn on pool no redundancy = false\n\
                 mon data avail crit = 0\nmon data avail warn = 0\n\
                 osd objectstore = memstore\nmemstore device bytes = 536870912\n\
                 osd crush chooseleaf type = 0\n\
                 run dir = {d}\nlog file = {d}/$name.log\nadmin socket = {d}/$name.asok\n\
                 keyring = {d}/$name.keyring\nmon data = {d}/mon\nosd data = {d}/osd\n"
            ),
        )
        .unwrap();
        let mut cluster = CephCluster {
            dir: dir.to_owned(),
            port,
            daemons: Vec::new(),
        };
        let mon_keyring = dir.join("mon.a.keyring");
        let admin_keyring = dir.join("client.admin.keyring");
        cluster.tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                path(&mon_keyring),
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        );
        cluster.tool(
            "ceph-authtool",
            &[
                "--create-keyring",
                path(&admin_keyring),
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ],
        );
        cluster.tool(
            "ceph-authtool",
            &[path(&mon_keyring), "--import-keyring", path(&admin_keyring)],
        );
        let monmap = dir.join("monmap");
        let addr = format!("[v1:127.0.0.1:{port}]");
        cluster.tool(
            "monmaptool",
            &[
                "--create",
                "--addv",
                "a",
                &addr,
                "--fsid",
                fsid.trim(),
                path(&monmap),
            ],
        );
        cluster.tool(
            "ceph-mon",
            &[
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                path(&monmap),
                "--keyring",
                path(&mon_keyring),
            ],
        );
        cluster.daemon("ceph-mon", &["-i", "a"]);
        wait_until("the Ceph monitor", || cluster.ceph_ok(&["mon", "stat"]));

        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap();
        let id = cluster.ceph(&["osd", "new", uuid.trim()]);
        assert_eq!(id.trim(), "0", "the cluster's first OSD");
        let osd_keyring = dir.join("osd.0.keyring");
        cluster.ceph(&[
            "auth",
            "get-or-create",
            "osd.0",
            "mon",
            "allow profile osd",
            "osd",
            "allow *",
            "mgr",
            "allow profile osd",
            "-o",
            path(&osd_keyring),
        ]);
        cluster.tool(
            "ceph-osd",
            &["-i", "0", "--mkfs", "--osd-uuid", uuid.trim()],
        );
        cluster.daemon("ceph-osd", &["-i", "0"]);
        wait_until("the Ceph OSD", || {
            cluster.ceph(&["osd", "stat"]).contains("1 up")
        });
        cluster.ceph(&["osd", "pool", "create", Self::POOL, "8"]);
        cluster.ceph(&[
            "osd",
            "pool",
            "set",
            Self::POOL,
            "size",
            "1",
            "--yes-i-really-mean-it",
        ]);
        cluster.rbd(&["pool", "init", Self::POOL]);
        cluster
    }

    /// Creates image `name` of `mib` MiB in the pool.
    pub fn create_image(&self, name: &str, mib: u64) {
        self.rbd(&["create", "--size", &format!("{mib}M"), &self.spec(name)]);
    }

    /// Creates image `name` holding `file`'s bytes (`rbd import`).
    pub fn import_image(&self, name: &str, file: &Path) {
        self.rbd(&["import", path(file), &self.spec(name)]);
    }

    /// Image `name`'s bytes, read by `rbd export` (librbd, not QEMU).
    pub fn read_image(&self, name: &str) -> Vec<u8> {
        let out = self.dir.join(format!("{name}.export"));
        let _ = std::fs::remove_file(&out);
        self.rbd(&["export", &self.spec(name), path(&out)]);
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    /// The monitor's address.
    pub fn monitor(&self) -> qhotplug_cmdline::CephMonitor {
        qhotplug_cmdline::CephMonitor {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// `client.admin`'s key.
    pub fn admin_key(&self) -> String {
        self.ceph(&["auth", "get-key", "client.admin"])
            .trim()
            .to_owned()
    }

    /// A new key, valid as a Ceph key, that this cluster does not know.
    pub fn new_key(&self) -> String {
        self.run("ceph-authtool", &["--gen-print-key"], true)
            .1
            .trim()
            .to_owned()
    }

    /// The disk source for image `name`: the monitor's address, user `admin` and its key, no
    /// `ceph.conf` (QEMU reads nothing of the cluster's but what the SDK hands it).
    pub fn source(&self, name: &str) -> qhotplug_cmdline::Rbd {
        qhotplug_cmdline::Rbd {
            pool: Self::POOL.into(),
            image: name.into(),
            namespace: None,
            snapshot: None,
            monitors: vec![self.monitor()],
            user: Some("admin".into()),
            conf: None,
            key: Some(qhotplug_cmdline::Secret::new(self.admin_key())),
        }
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{image}", Self::POOL)
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// Runs `ceph` with this cluster's configuration; its output (asserted to succeed).
    fn ceph(&self, args: &[&str]) -> String {
        self.run("ceph", args, true).1
    }

    /// Whether `ceph args` succeeds (within 5 s).
    fn ceph_ok(&self, args: &[&str]) -> bool {
        let mut with_timeout = vec!["--connect-timeout", "5"];
        with_timeout.extend_from_slice(args);
        self.run("ceph", &with_timeout, false).0
    }

    fn rbd(&self, args: &[&str]) -> String {
        self.run("rbd", args, true).1
    }

    fn tool(&self, tool: &str, args: &[&str]) {
        self.run(tool, args, true);
    }

    fn run(&self, tool: &str, args: &[&str], must: bool) -> (bool, String) {
        let out = Command::new(tool)
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success() || !must,
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn daemon(&mut self, name: &str, args: &[&str]) {
        let child = Command::new(name)
            .arg("-f")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        self.daemons.push(child);
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        for daemon in self.daemons.iter_mut().rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}
