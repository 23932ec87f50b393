//! vCPUs: the topology QEMU is started with (`-smp`), and the hot-pluggable vCPUs that sit in its
//! free slots, as devices with ids (`-device qemu64-x86_64-cpu,id=…,socket-id=…` at boot,
//! `device_add` later), so a VM relaunched from its spec has the same vCPUs with the same ids.

use crate::error::{Error, Result};
use crate::model::DeviceModel;
use crate::value::{p, validate_id, Props};

/// The vCPU topology: how many vCPUs the VM may ever have, and how they are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CpuTopology {
    /// The most vCPUs it may have (`maxcpus`); `sockets × cores × threads` when those are given.
    pub max: u32,
    /// Sockets (0: QEMU's choice).
    pub sockets: u32,
    /// Cores per socket (0: QEMU's choice).
    pub cores: u32,
    /// Threads per core (0: QEMU's choice).
    pub threads: u32,
}

impl CpuTopology {
    /// Up to `max` vCPUs, arranged as QEMU chooses (one socket of `max` cores on QEMU 6.2+).
    pub fn max(max: u32) -> Self {
        CpuTopology {
            max,
            ..Default::default()
        }
    }

    /// `-smp`'s value for `boot` vCPUs at start.
    pub fn smp(&self, boot: u32) -> String {
        let mut out = format!("{boot},maxcpus={}", self.max);
        for (key, n) in [
            ("sockets", self.sockets),
            ("cores", self.cores),
            ("threads", self.threads),
        ] {
            if n > 0 {
                out.push_str(&format!(",{key}={n}"));
            }
        }
        out
    }

    /// Checks it against the `boot` count.
    pub fn check(&self, boot: u32) -> Result<()> {
        let given = [self.sockets, self.cores, self.threads];
        if given.iter().all(|&n| n > 0) && given.iter().product::<u32>() != self.max {
            return Err(Error::InvalidSpec(format!(
                "sockets × cores × threads is {}, not maxcpus {}",
                given.iter().product::<u32>(),
                self.max
            )));
        }
        if boot == 0 || boot > self.max {
            return Err(Error::InvalidSpec(format!(
                "{boot} vCPUs at boot is not within 1 to maxcpus {}",
                self.max
            )));
        }
        Ok(())
    }
}

/// A hot-pluggable vCPU in one of QEMU's CPU slots (`query-hotpluggable-cpus`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Vcpu {
    /// The device id.
    pub id: String,
    /// The CPU model's device type, as QEMU names it (`qemu64-x86_64-cpu`).
    pub driver: String,
    /// The slot: `socket-id`, `core-id`, `thread-id` (and `node-id`, `die-id`… as QEMU lists them).
    pub slot: Vec<(String, i64)>,
}

impl Vcpu {
    /// Launch arguments.
    pub fn args(&self) -> Vec<String> {
        vec!["-device".into(), self.device_arg()]
    }
}

impl DeviceModel for Vcpu {
    fn id(&self) -> &str {
        &self.id
    }

    fn driver(&self) -> &str {
        &self.driver
    }

    /// Checks the id.
    fn check(&self) -> Result<()> {
        validate_id(&self.id)
    }

    /// Every device property: the id, then the slot.
    fn device_props(&self) -> Props {
        let mut props = vec![p("id", self.id.clone())];
        props.extend(self.slot.iter().map(|(k, v)| p(k, *v)));
        props
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smp_says_what_is_given() {
        assert_eq!(CpuTopology::max(4).smp(1), "1,maxcpus=4");
        let t = CpuTopology {
            max: 8,
            sockets: 2,
            cores: 2,
            threads: 2,
        };
        assert_eq!(t.smp(2), "2,maxcpus=8,sockets=2,cores=2,threads=2");
        assert!(t.check(2).is_ok());
        assert!(t.check(9).is_err());
        assert!(CpuTopology { max: 6, ..t }.check(1).is_err());
    }

    #[test]
    fn a_vcpu_renders_the_same_both_ways() {
        let cpu = Vcpu {
            id: "vcpu1".into(),
            driver: "qemu64-x86_64-cpu".into(),
            slot: vec![
                ("socket-id".into(), 0),
                ("core-id".into(), 1),
                ("thread-id".into(), 0),
            ],
        };
        assert_eq!(
            cpu.args()[1],
            "qemu64-x86_64-cpu,id=vcpu1,socket-id=0,core-id=1,thread-id=0"
        );
        assert_eq!(
            serde_json::to_value(cpu.device_add()).unwrap(),
            serde_json::json!({"driver": "qemu64-x86_64-cpu", "id": "vcpu1",
                               "socket-id": 0, "core-id": 1, "thread-id": 0})
        );
    }
}
