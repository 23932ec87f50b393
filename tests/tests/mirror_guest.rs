//! Drive mirror with a booted guest under TCG: the guest writes all through a copy and its pivot,
//! and the copy then holds every block it wrote, and takes its writes from then on; a relaunch
//! from `vm.spec()` runs on the copy; an abandoned copy equals the disk at the abandon; a
//! throttled job pauses, resumes, speeds up and is cancelled; a second job on the disk and its
//! hot-remove are `Busy`; a dropped handle leaves nothing behind. Host checks with `qemu-img` and
//! `md5sum`, reading the images QEMU holds with `-U` after a guest `sync` (reference §7).

use std::path::Path;
use std::time::Duration;

use qhotplug::{DiskConfig, Error, Format, MirrorConfig, VmSpec};
use qhotplug_qmp::command::QueryJobs;
use qhotplug_tests::storage::block_nodes;
use qhotplug_tests::storage::{self, md5, same_contents};
use qhotplug_tests::{pc_spec, Guest};

const SEEN: Duration = Duration::from_secs(90);

fn data_image(dir: &Path, name: &str) -> std::path::PathBuf {
    storage::data_image(dir, name, 64, 1)
}

/// Boots a guest, hot-adds `src` as virtio-blk disk `d1`, returns the guest's name for it.
async fn with_disk(spec: VmSpec, src: &Path) -> (Guest, String) {
    let g = Guest::boot(spec, |l| l).await;
    let mark = g.console.mark();
    g.vm.add_disk(DiskConfig::virtio_blk("d1", src))
        .await
        .unwrap();
    let dev = g.console.added(mark, "block").await;
    (g, dev)
}

/// Starts a guest loop writing random 4 KiB blocks over the first 16 MiB of `/dev/<dev>` until
/// `/tmp/stop` exists.
async fn start_writer(g: &Guest, dev: &str) {
    let writer = format!(
        "rm -f /tmp/stop; (i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); \
         dd if=/dev/urandom of=/dev/{dev} bs=4k count=1 seek=$((i % 4096)) conv=notrunc; done) \
         >/dev/null 2>&1 & echo $! >/tmp/writer.pid; echo started"
    );
    assert_eq!(g.console.run(&writer, SEEN).await, ["started"]);
}

/// Stops the writer, flushes, and returns the guest's `md5sum` of the whole disk.
async fn stop_writer_and_sum(g: &Guest, dev: &str) -> String {
    let stop = "touch /tmp/stop; while kill -0 $(cat /tmp/writer.pid) 2>/dev/null; do sleep 0.1; done; sync; echo stopped";
    assert_eq!(g.console.run(stop, SEEN).await, ["stopped"]);
    guest_sum(g, dev).await
}

async fn guest_sum(g: &Guest, dev: &str) -> String {
    let out = g.console.run(&format!("md5sum /dev/{dev}"), SEEN).await;
    out[0].split_whitespace().next().unwrap().to_owned()
}

#[test]
fn a_disk_written_all_through_its_mirror_runs_on_the_copy_after_the_pivot_and_after_a_relaunch() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let src = data_image(dir.path(), "src.raw");
        let (g, dev) = with_disk(pc_spec(), &src).await;
        start_writer(&g, &dev).await;

        let target = dir.path().join("copy.raw");
        let mut job =
            g.vm.mirror_disk("d1", MirrorConfig::new(&target))
                .await
                .unwrap();
        assert_eq!(job.job_id(), "mirror-d1");
        // One job per disk: a second, and a hot-remove, are busy before anything is sent.
        let other = dir.path().join("other.raw");
        assert!(matches!(
            g.vm.mirror_disk("d1", MirrorConfig::new(&other)).await,
            Err(Error::Busy(id)) if id == "d1"
        ));
        assert!(!other.exists());
        assert!(matches!(g.vm.remove_disk("d1").await, Err(Error::Busy(_))));

        let ready = job.wait_ready(SEEN).await.unwrap();
        assert_eq!(ready.status, "ready");
        assert!(ready.total_progress >= 64 << 20, "{ready:?}");
        let disk = job.pivot().await.unwrap();
        assert_eq!(
            (disk.path.as_path(), disk.generation),
            (target.as_path(), 1)
        );
        assert_eq!(g.vm.disks()[0].path, target);
        // The device runs on the copy's nodes; the source's are gone; no job is left.
        let now = block_nodes(&g.vm).await;
        assert!(now.contains(&"d1-fmt.1".to_owned()), "{now:?}");
        assert!(
            !now.iter().any(|n| n == "d1-fmt" || n == "d1-file"),
            "{now:?}"
        );
        assert!(g.vm.client().execute(&QueryJobs).await.unwrap().is_empty());

        // The guest goes on writing, now to the copy; then everything it wrote is in the copy.
        let marker = format!(
            "echo written-after-the-pivot | dd of=/dev/{dev} bs=512 seek=40000 conv=notrunc 2>/dev/null; echo ok"
        );
        assert_eq!(g.console.run(&marker, SEEN).await, ["ok"]);
        let sum = stop_writer_and_sum(&g, &dev).await;
        assert_eq!(md5(&target), sum, "the copy holds what the guest wrote");
        assert_ne!(md5(&src), sum, "the source took no write after the pivot");

        // A relaunch from vm.spec() runs on the copy.
        let spec = g.vm.spec();
        g.vm.quit().await.unwrap();
        drop(g);
        let again = Guest::boot(spec, |l| l).await;
        assert_eq!(guest_sum(&again, "vda").await, sum);
    });
}

#[test]
fn an_abandoned_qcow2_copy_equals_the_disk_at_the_abandon_and_the_disk_stays() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let src = data_image(dir.path(), "src.raw");
        let (g, dev) = with_disk(pc_spec(), &src).await;
        start_writer(&g, &dev).await;
        let copy = dir.path().join("copy.qcow2");
        let mut job =
            g.vm.mirror_disk("d1", MirrorConfig::new(&copy).format(Format::Qcow2))
                .await
                .unwrap();
        job.wait_ready(SEEN).await.unwrap();
        // The guest stops writing and flushes: the disk now is what the copy must hold.
        stop_writer_and_sum(&g, &dev).await;
        let kept = job.abandon().await.unwrap();
        assert_eq!(kept, copy);
        assert!(
            same_contents(&src, &copy),
            "the copy is the disk at the abandon"
        );
        // The disk stayed where it was; the copy's nodes are gone.
        let disk = &g.vm.disks()[0];
        assert_eq!((disk.path.as_path(), disk.generation), (src.as_path(), 0));
        let now = block_nodes(&g.vm).await;
        assert!(!now.iter().any(|n| n.ends_with(".1")), "{now:?}");
        // Later writes reach the disk, not the copy.
        let write = format!(
            "echo after | dd of=/dev/{dev} bs=512 seek=1 conv=notrunc 2>/dev/null; sync; echo ok"
        );
        assert_eq!(g.console.run(&write, SEEN).await, ["ok"]);
        assert!(!same_contents(&src, &copy));
    });
}

#[test]
fn a_throttled_mirror_pauses_resumes_speeds_up_and_is_cancelled_and_a_dropped_one_leaves_nothing() {
    qhotplug_tests::serial_test(async {
        let dir = tempfile::tempdir().unwrap();
        let src = data_image(dir.path(), "src.raw");
        let (g, _dev) = with_disk(pc_spec(), &src).await;
        let before = block_nodes(&g.vm).await;
        let target = dir.path().join("copy.raw");
        // 1 MiB/s: 64 s for the disk, so it is still running whatever the test does. Its
        // progress is reported every 100 ms while a wait runs.
        let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let mut job =
            g.vm.mirror_disk("d1", MirrorConfig::new(&target).speed(1 << 20))
                .await
                .unwrap()
                .on_progress(Duration::from_millis(100), move |p| {
                    seen.lock().unwrap().push(p.clone())
                });
        let status = |want: &'static str| {
            let job = &job;
            async move {
                let deadline = tokio::time::Instant::now() + SEEN;
                loop {
                    let info = job.info().await.unwrap();
                    if info.status == want {
                        return info;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "never {want}: {info:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        status("running").await;
        job.pause().await.unwrap();
        let paused = status("paused").await;
        job.resume().await.unwrap();
        status("running").await;
        assert!(paused.current_progress < paused.total_progress);
        // A wait that runs out while the copy crawls: a typed timeout, the job still there, and
        // its progress reported meanwhile (QEMU copies in bursts under a rate limit, so the
        // bytes need not move in 1.5 s).
        match job.wait_ready(Duration::from_millis(1500)).await {
            Err(Error::JobTimeout { status, .. }) => assert_eq!(status, "running"),
            other => panic!("a 1.5 s wait for a 64 s copy: {other:?}"),
        }
        let crawled = reports.lock().unwrap().clone();
        assert!(crawled.len() >= 2, "{crawled:?}");
        assert!(crawled
            .iter()
            .all(|p| p.id == "mirror-d1" && p.status == "running"));
        assert!(crawled[0].current_progress < crawled[0].total_progress);
        // Unthrottled, it catches up; the reports grow to the ready job's, the last one.
        job.set_speed(0).await.unwrap();
        let ready = job.wait_ready(SEEN).await.unwrap();
        let all = reports.lock().unwrap().clone();
        assert!(all.len() > crawled.len());
        assert!(all
            .windows(2)
            .all(|w| w[0].current_progress <= w[1].current_progress));
        assert_eq!(all.last(), Some(&ready));
        assert_eq!(ready.current_progress, ready.total_progress);
        job.cancel().await.unwrap();
        // Cancelled: no job, the disk as it was, the target's nodes and file gone.
        assert!(g.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        assert_eq!(block_nodes(&g.vm).await, before);
        assert!(!target.exists());
        assert_eq!(g.vm.disks()[0].path, src);

        // A handle dropped mid-copy: cancelled in the background; reconcile waits for it.
        let job =
            g.vm.mirror_disk("d1", MirrorConfig::new(&target).speed(1 << 20))
                .await
                .unwrap();
        drop(job);
        g.vm.reconcile().await.unwrap();
        assert!(g.vm.client().execute(&QueryJobs).await.unwrap().is_empty());
        assert_eq!(block_nodes(&g.vm).await, before);
        assert!(!target.exists());
        // And the disk takes a new job.
        let job =
            g.vm.mirror_disk("d1", MirrorConfig::new(&target))
                .await
                .unwrap();
        job.cancel().await.unwrap();
    });
}
