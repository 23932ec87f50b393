//! `qmp-shell` in a real terminal (tmux): commands, errors, events between commands, history, and
//! leaving with Ctrl-D.

use std::time::Duration;

use qhotplug_qmp::command::Cont;
use qhotplug_qmp::Config;
use qhotplug_tests::Qemu;

struct Tmux {
    session: String,
}

impl Tmux {
    fn start(command: &str, home: &std::path::Path) -> Tmux {
        let session = format!("qmp-shell-test-{}", std::process::id());
        let ok = std::process::Command::new("tmux")
            .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "50"])
            .arg(format!("HOME={} {command}", home.display()))
            .status()
            .expect("tmux (scripts/install-deps installs it)")
            .success();
        assert!(ok, "tmux new-session");
        Tmux { session }
    }

    fn keys(&self, keys: &[&str]) {
        let ok = std::process::Command::new("tmux")
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .unwrap()
            .success();
        assert!(ok, "tmux send-keys {keys:?}");
    }

    fn screen(&self) -> Option<String> {
        let out = std::process::Command::new("tmux")
            .args([
                "capture-pane",
                "-p",
                "-J",
                "-S",
                "-200",
                "-t",
                &self.session,
            ])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the screen shows `needle` `count` times (the terminal is polled: it has no
    /// event to wait on), or panics with the screen at the deadline.
    async fn wait_for(&self, needle: &str, count: usize) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.screen().unwrap_or_default();
            if screen.matches(needle).count() >= count {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{needle:?} x{count} never showed:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn alive(&self) -> bool {
        std::process::Command::new("tmux")
            .args(["has-session", "-t", &self.session])
            .status()
            .unwrap()
            .success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

#[tokio::test]
async fn a_session_in_a_real_terminal() {
    let (_qemu, client, mon2) = Qemu::with_second_monitor(Config::new()).await;
    let home = tempfile::tempdir().unwrap();
    let shell = format!("{} {}", env!("CARGO_BIN_EXE_qmp-shell"), mon2.display());
    let tmux = Tmux::start(&shell, home.path());
    tmux.wait_for("(QEMU) ", 1).await;

    // A command with a pretty-printed reply.
    tmux.keys(&["query-status", "Enter"]);
    tmux.wait_for("\"status\": \"prelaunch\"", 1).await;

    // key=value arguments, and an error with its class.
    tmux.keys(&["qom-list path=/nowhere", "Enter"]);
    tmux.wait_for("error: DeviceNotFound", 1).await;
    tmux.keys(&["no-such-command", "Enter"]);
    tmux.wait_for("error: CommandNotFound", 1).await;
    tmux.keys(&["device_add id=1bad", "Enter"]);
    tmux.wait_for("error: ", 3).await;
    tmux.keys(&["cmd novalue", "Enter"]);
    tmux.wait_for("expected key=value", 1).await;

    // Raw JSON.
    tmux.keys(&[r#"{"execute": "query-name"}"#, "Enter"]);
    tmux.wait_for("\"name\": \"qhotplug-test\"", 1).await;

    // An event made on the other monitor shows up while the shell waits at its prompt.
    client.execute(&Cont).await.unwrap();
    tmux.wait_for("event {\"event\":\"RESUME\"", 1).await;

    // Tab completes a command name; Up recalls history.
    tmux.keys(&["query-statu", "Tab", "Enter"]);
    tmux.wait_for("\"status\": \"running\"", 1).await;
    tmux.keys(&["Up", "Enter"]);
    tmux.wait_for("\"status\": \"running\"", 2).await;

    // Ctrl-D leaves, and the history is saved.
    tmux.keys(&["C-d"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tmux.alive() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the shell did not exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let history = std::fs::read_to_string(home.path().join(".qhotplug_qmp_history")).unwrap();
    assert!(history.contains("query-status"), "{history}");
}
