//! Host-side checks of the images a storage test made: images full of data, `md5sum`, and
//! `qemu-img` (`compare`, `convert`) reading images QEMU holds (`-U`), after a guest `sync`.

use std::path::{Path, PathBuf};

use qhotplug::Vm;
use qhotplug_qmp::command::QueryNamedBlockNodes;

/// A raw image of `mib` MiB in `dir` full of non-zero data (so a copy or a commit has work to
/// do); `seed` makes images differ.
pub fn data_image(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let bytes: Vec<u8> = (0..mib << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&path, bytes).expect("write the image");
    path
}

/// A new, empty qcow2 image at `path` (`qemu-img create`): of `mib` MiB, or, on `backing` (an
/// image and its format), of the backing image's size when `mib` is `None`.
pub fn new_qcow2(
    path: impl Into<PathBuf>,
    mib: Option<u64>,
    backing: Option<(&Path, &str)>,
) -> PathBuf {
    let path = path.into();
    let mut command = std::process::Command::new("qemu-img");
    command.args(["create", "-q", "-f", "qcow2"]);
    if let Some((image, format)) = backing {
        command.args(["-F", format, "-b"]).arg(image);
    }
    command.arg(&path);
    if let Some(mib) = mib {
        command.arg(format!("{mib}M"));
    }
    let status = command.status().expect("run qemu-img");
    assert!(status.success(), "qemu-img create {}", path.display());
    path
}

/// A qcow2 image of `mib` MiB of data (seeded as [`data_image`]), made by `qemu-img convert`.
pub fn qcow2_data_image(dir: &Path, name: &str, mib: usize, seed: u64) -> PathBuf {
    let raw = data_image(dir, &format!("{name}.raw"), mib, seed);
    let path = dir.join(format!("{name}.qcow2"));
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&path)
        .status()
        .expect("run qemu-img");
    assert!(status.success(), "qemu-img convert {}", raw.display());
    std::fs::remove_file(raw).expect("remove the raw image");
    path
}

/// `qemu-img convert -U -O raw from to`: what a guest reads from `from` (its backing chain
/// included), into a raw file, read while QEMU may hold it.
fn convert_to_raw(from: &Path, to: &Path) {
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(from)
        .arg(to)
        .status()
        .expect("run qemu-img");
    assert!(status.success(), "qemu-img convert {}", from.display());
}

/// How long `qemu-img convert -U -O raw from to` takes: the host's copy rate, a storage
/// benchmark's floor of scale. `to` is removed after.
pub fn convert_time(from: &Path, to: &Path) -> std::time::Duration {
    let start = std::time::Instant::now();
    convert_to_raw(from, to);
    let took = start.elapsed();
    std::fs::remove_file(to).unwrap();
    took
}

/// `md5sum` of a file on the host.
pub fn md5(path: &Path) -> String {
    let out = std::process::Command::new("md5sum")
        .arg(path)
        .output()
        .expect("run md5sum");
    assert!(out.status.success(), "md5sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a sum")
        .to_owned()
}

/// `qemu-img compare -U a b`: true when what a guest would read from them is the same.
pub fn same_contents(a: &Path, b: &Path) -> bool {
    let status = std::process::Command::new("qemu-img")
        .args(["compare", "-U", "-q"])
        .arg(a)
        .arg(b)
        .status()
        .expect("run qemu-img");
    match status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("qemu-img compare failed: {other:?}"),
    }
}

/// The `md5sum` of what a guest reads from `image` (its backing chain included): converted to
/// raw with `qemu-img convert -U` into `scratch`.
pub fn guest_view_md5(image: &Path, scratch: &Path) -> String {
    convert_to_raw(image, scratch);
    let sum = md5(scratch);
    let _ = std::fs::remove_file(scratch);
    sum
}

/// The backing file `qemu-img info` reads from `image`'s header, if any.
pub fn backing_file(image: &Path) -> Option<String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img info {}", image.display());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    info.get("backing-filename")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

/// The names of the block nodes QEMU has (`query-named-block-nodes`), sorted.
pub async fn block_nodes(vm: &Vm) -> Vec<String> {
    let mut names: Vec<String> = vm
        .client()
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .expect("query-named-block-nodes")
        .into_iter()
        .filter_map(|n| n.node_name)
        .collect();
    names.sort();
    names
}

/// A raw image of `mib` MiB in `dir` holding an empty ext4 filesystem (`mkfs.ext4` on the host).
pub fn ext4_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = crate::image(dir, name, mib);
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&path)
        .status()
        .expect("run mkfs.ext4");
    assert!(made.success(), "mkfs.ext4 {}", path.display());
    path
}

/// A tmpfs of `mib` MiB mounted at `dir/<name>`, unmounted on drop.
pub struct SmallFs(pub std::path::PathBuf);

impl SmallFs {
    /// Mounts it.
    pub fn mount(dir: &std::path::Path, name: &str, mib: u32) -> SmallFs {
        let at = dir.join(name);
        std::fs::create_dir(&at).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs (the tests run as root)");
        SmallFs(at)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Drive `id` as `query-block` shows it.
pub async fn drive(vm: &qhotplug::Vm, id: &str) -> qhotplug_qmp::command::BlockInfo {
    vm.client()
        .execute(&qhotplug_qmp::command::QueryBlock)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.qdev.as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no drive {id}"))
}

/// The node in drive `id`, and whether its tray is closed.
pub async fn medium(vm: &qhotplug::Vm, id: &str) -> Option<String> {
    let d = drive(vm, id).await;
    assert_eq!(d.tray_open, Some(false), "{d:?}");
    assert!(d.removable);
    d.inserted.map(|i| {
        assert!(i.ro, "a medium is read-only: {i:?}");
        i.node_name.unwrap()
    })
}

/// `qemu-img map --output=json` of what `args` name (an image file, or `--image-opts …`): its
/// extents.
pub fn qemu_img_map<I, S>(args: I) -> Vec<serde_json::Value>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new("qemu-img")
        .args(["map", "--output=json"])
        .args(args)
        .output()
        .expect("run qemu-img map");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img map's JSON")
}

/// The extents (start, length) `image` holds data of its own (not its backing chain's), read
/// while QEMU may hold it (`-U`).
pub fn own_data(image: &Path) -> Vec<(u64, u64)> {
    let image = image.as_os_str();
    qemu_img_map([std::ffi::OsStr::new("-U"), image])
        .iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// Writes 64 KiB of 0x5a at `offset` into virtio-blk disk `id` through its device, as the guest
/// would (HMP `qemu-io`): with no guest OS, a write the disk's dirty bitmaps record.
pub async fn write_64k(vm: &qhotplug::Vm, id: &str, offset: u64) {
    let write = qhotplug_qmp::command::HumanMonitorCommand {
        command_line: format!(
            "qemu-io -d /machine/peripheral/{id}/virtio-backend \"write -P 0x5a {offset} 64k\""
        ),
        cpu_index: None,
    };
    let said = vm.client().execute(&write).await.unwrap();
    assert!(!said.contains("rror"), "qemu-io: {said}");
}

/// A qcow2 image's virtual size, from its header (bytes 24–32, big-endian); `None` when `image`
/// cannot be read or is not qcow2.
pub fn virtual_size(image: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(image).ok()?;
    let mut header = [0u8; 32];
    file.read_exact_at(&mut header, 0).ok()?;
    (header[..4] == *b"QFI\xfb").then(|| u64::from_be_bytes(header[24..32].try_into().unwrap()))
}
