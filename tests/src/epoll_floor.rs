//! The fleet benchmark's second floor: one thread, one `epoll` loop (mio), many raw monitors at
//! once, each taken through the same disk operations with the same bytes as
//! [`RawMonitor`], and nothing else: an event loop with no SDK in it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use qhotplug_cmdline::Disk;
use serde_json::Value;

use crate::raw::{self, RawMonitor, RawOp, Removal};

/// What the command in flight waits for, and what comes after it.
enum InFlight {
    /// Its reply; then the next command queued.
    Reply,
    /// `add-fd`'s reply; then the rest of the disk's sequence, on the fd set it names.
    AddFd(Disk),
    /// `device_del`'s reply and `DEVICE_DELETED`; then the `blockdev-del`s.
    Removal(Removal, Disk),
    /// `query-fdsets`' reply; then the `remove-fd` of the removed disk's sets.
    Fdsets(Disk),
}

/// One monitor's batch in progress.
struct Flow<'a> {
    socket: &'a UnixStream,
    /// Bytes read and not yet a whole line.
    partial: Vec<u8>,
    ops: VecDeque<RawOp>,
    /// The current operation's commands not yet sent.
    queue: VecDeque<Vec<u8>>,
    /// A removed disk whose fd sets are looked for once `queue` is sent.
    then_fdsets: Option<Disk>,
    /// `None` only before the first operation and after the last.
    in_flight: Option<InFlight>,
    /// When the batch began, then the instant each operation ended.
    marks: Vec<Instant>,
}

impl Flow<'_> {
    /// Sends the next command of the current operation, or, when it has none left, marks its end
    /// and begins the next operation.
    fn advance(&mut self) {
        match self.queue.pop_front() {
            Some(bytes) => {
                raw::write_request(self.socket, &bytes, None);
                self.in_flight = Some(InFlight::Reply);
            }
            None => match self.then_fdsets.take() {
                Some(disk) => {
                    raw::write_request(self.socket, &raw::query_fdsets(), None);
                    self.in_flight = Some(InFlight::Fdsets(disk));
                }
                None => {
                    self.marks.push(Instant::now());
                    self.begin();
                }
            },
        }
    }

    /// Sends the first command of the next operation, if there is one.
    fn begin(&mut self) {
        self.in_flight = match self.ops.pop_front() {
            Some(RawOp::AddDisk(disk)) => {
                let (bytes, file) = raw::disk_add_fd(&disk);
                raw::write_request(self.socket, &bytes, Some(&file));
                Some(InFlight::AddFd(disk))
            }
            Some(RawOp::RemoveDisk(disk)) => {
                raw::write_request(self.socket, &raw::device_del(&disk), None);
                Some(InFlight::Removal(Removal::new(&disk), disk))
            }
            None => None,
        };
    }

    /// Takes in one message from the monitor.
    fn saw(&mut self, message: Value) {
        match self.in_flight.take() {
            Some(InFlight::Removal(mut removal, disk)) => {
                removal.saw(&message);
                if !removal.done() {
                    self.in_flight = Some(InFlight::Removal(removal, disk));
                    return;
                }
                let after = raw::disk_after_deleted(&disk);
                self.queue.extend(after.into_iter().map(|(_, bytes)| bytes));
                self.then_fdsets = Some(disk);
            }
            in_flight if message.get("event").is_some() => {
                self.in_flight = in_flight;
                return;
            }
            Some(in_flight) => {
                let reply = message
                    .get("return")
                    .unwrap_or_else(|| panic!("the floor's command failed: {message}"));
                match in_flight {
                    InFlight::AddFd(disk) => {
                        let after = raw::disk_after_add_fd(&disk, reply);
                        self.queue.extend(after.into_iter().map(|(_, bytes)| bytes));
                    }
                    InFlight::Fdsets(disk) => {
                        self.queue.extend(raw::remove_disk_fdsets(&disk, reply));
                    }
                    InFlight::Reply | InFlight::Removal(..) => {}
                }
            }
            None => panic!("a reply with no command in flight: {message}"),
        }
        self.advance();
    }

    /// Reads what the socket has (it is edge-triggered: until it would block) and takes in every
    /// whole line.
    fn read(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            match (&mut &*self.socket).read(&mut chunk) {
                Ok(0) => panic!("a floor monitor closed"),
                Ok(n) => self.partial.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("reading a floor monitor: {e}"),
            }
        }
        self.take_lines();
    }

    /// Takes in every whole line read so far.
    fn take_lines(&mut self) {
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.saw(serde_json::from_slice(&line).expect("QMP sends JSON lines"));
        }
    }

    fn done(&self) -> bool {
        self.in_flight.is_none() && self.ops.is_empty()
    }
}

/// Runs `batches[i]` on `monitors[i]`, every monitor at once, from this thread. Returns, per
/// monitor, the instant its batch began and the instant each of its operations ended. Panics on
/// any error reply (it is a benchmark's floor, not an SDK).
pub fn run(monitors: &mut [RawMonitor], batches: Vec<Vec<RawOp>>) -> Vec<Vec<Instant>> {
    let mut poll = Poll::new().expect("epoll");
    let mut flows: Vec<Flow<'_>> = monitors
        .iter_mut()
        .zip(batches)
        .map(|(monitor, ops)| {
            let (socket, buffered) = monitor.parts();
            socket.set_nonblocking(true).unwrap();
            let mut flow = Flow {
                socket,
                partial: buffered,
                ops: ops.into(),
                queue: VecDeque::new(),
                then_fdsets: None,
                in_flight: None,
                marks: Vec::new(),
            };
            // Left over from before: events, skipped; a reply, with nothing in flight, panics.
            flow.take_lines();
            flow
        })
        .collect();
    for (i, flow) in flows.iter().enumerate() {
        let fd = flow.socket.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), Token(i), Interest::READABLE)
            .expect("register a monitor");
    }
    for flow in &mut flows {
        flow.marks.push(Instant::now());
        flow.begin();
    }
    let mut events = Events::with_capacity(flows.len().max(1));
    let mut running = flows.iter().filter(|f| !f.done()).count();
    while running > 0 {
        poll.poll(&mut events, None).expect("epoll_wait");
        for event in &events {
            let flow = &mut flows[event.token().0];
            if flow.done() {
                continue;
            }
            flow.read();
            if flow.done() {
                running -= 1;
            }
        }
    }
    flows
        .into_iter()
        .map(|flow| {
            let fd = flow.socket.as_raw_fd();
            poll.registry().deregister(&mut SourceFd(&fd)).unwrap();
            flow.socket.set_nonblocking(false).unwrap();
            flow.marks
        })
        .collect()
}
