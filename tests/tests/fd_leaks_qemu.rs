//! Checks on our own fd table. Every test here takes one lock, so no other test of this binary opens
//! or closes fds while one counts them (nextest runs each test in its own process anyway).

use tokio::sync::Mutex;

use qhotplug_qmp::command::{AddFd, Closefd, Cont, RemoveFd};
use qhotplug_tests::{open_fd_count, open_fds, pipe_fd, Qemu};

static SERIAL: Mutex<()> = Mutex::const_new(());

#[test]
fn a_thousand_getfd_closefd_rounds_leave_our_fd_table_as_it_was() {
    qhotplug_tests::serial_test(async {
        let _serial = SERIAL.lock().await;
        let (_qemu, client) = Qemu::paused().await;
        let before = open_fds();
        for i in 0..1000 {
            let name = format!("fd{i}");
            client.getfd(&name, pipe_fd()).await.unwrap();
            client.execute(&Closefd { fdname: name }).await.unwrap();
        }
        assert_eq!(
            open_fds(),
            before,
            "our fd table after 1000 getfd/closefd rounds"
        );
    });
}

#[test]
fn a_refused_fd_command_still_closes_our_copy() {
    qhotplug_tests::serial_test(async {
        let _serial = SERIAL.lock().await;
        let (_qemu, client) = Qemu::paused().await;
        let before = open_fd_count();
        let err = client
            .getfd("1starts-with-a-digit", pipe_fd())
            .await
            .unwrap_err();
        assert_eq!(err.qmp_class(), Some("GenericError"));
        client.execute(&Cont).await.unwrap();
        let info = client
            .add_fd(
                &AddFd {
                    fdset_id: None,
                    opaque: None,
                },
                pipe_fd(),
            )
            .await
            .unwrap();
        client
            .execute(&RemoveFd {
                fdset_id: info.fdset_id,
                fd: None,
            })
            .await
            .unwrap();
        assert_eq!(open_fd_count(), before);
    });
}
