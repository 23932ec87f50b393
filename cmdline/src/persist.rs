//! A spec written down and read back: what an orchestrator keeps so that a new process can drive a
//! VM an earlier one launched. JSON, with a version, field names as the Rust ones (stable: a
//! rename is a new version), and never a secret's value: a [`Secret`] is written as its reference
//! and read back unresolved, until the caller gives each value again
//! ([`VmSpec::resolve_secrets`]).

use crate::cdrom::Medium;
use crate::device::DiskBackend;
use crate::error::{Error, Result};
use crate::network_disk::NetworkSource;
use crate::secret::Secret;
use crate::spec::VmSpec;

/// The version of the written form this release writes and reads.
pub const SPEC_VERSION: u32 = 1;

#[derive(serde::Serialize)]
struct Writing<'a> {
    version: u32,
    spec: &'a VmSpec,
}

#[derive(serde::Deserialize)]
struct Reading {
    version: u32,
    spec: serde_json::Value,
}

impl VmSpec {
    /// The spec as JSON text (`{"version": 1, "spec": {…}}`), its secrets as their references.
    /// A secret with no reference cannot be written ([`Secret::with_reference`]).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(&Writing {
            version: SPEC_VERSION,
            spec: self,
        })
        .map_err(|e| Error::InvalidSpec(format!("the spec cannot be written: {e}")))
    }

    /// A spec [`to_json`](VmSpec::to_json) wrote, checked ([`VmSpec::validate`]); its secrets
    /// are unresolved until [`resolve_secrets`](VmSpec::resolve_secrets). A version this release
    /// does not know is refused, not guessed at.
    pub fn from_json(text: &str) -> Result<VmSpec> {
        let read: Reading = serde_json::from_str(text)
            .map_err(|e| Error::InvalidSpec(format!("not a written spec: {e}")))?;
        if read.version != SPEC_VERSION {
            return Err(Error::InvalidSpec(format!(
                "a spec of version {} (this release reads version {SPEC_VERSION})",
                read.version
            )));
        }
        let spec: VmSpec = serde_json::from_value(read.spec)
            .map_err(|e| Error::InvalidSpec(format!("the written spec: {e}")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Gives every unresolved secret of the spec its value: `resolve` is asked for each by its
    /// reference. A secret `resolve` does not know is an error naming every such reference, and
    /// the spec is left as it was.
    pub fn resolve_secrets(
        &mut self,
        mut resolve: impl FnMut(&str) -> Option<Secret>,
    ) -> Result<()> {
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for secret in self.secrets_mut() {
            if secret.is_resolved() {
                continue;
            }
            let reference = secret.reference().unwrap_or("").to_owned();
            match resolve(&reference) {
                Some(value) => found.push(value.with_reference(reference)),
                None => missing.push(reference),
            }
        }
        if !missing.is_empty() {
            return Err(Error::InvalidSpec(format!(
                "no value for the secrets {missing:?}"
            )));
        }
        let unresolved = self.secrets_mut().into_iter().filter(|s| !s.is_resolved());
        for (secret, value) in unresolved.zip(found) {
            *secret = value;
        }
        Ok(())
    }

    /// Every secret the spec holds: network disks' and media's credentials, the VNC password.
    fn secrets_mut(&mut self) -> Vec<&mut Secret> {
        let mut out = Vec::new();
        let disks = self.disks.iter_mut().filter_map(|d| match &mut d.backend {
            DiskBackend::Network(source) => Some(&mut **source),
            _ => None,
        });
        let media = self.cdroms.iter_mut().filter_map(|c| match &mut c.medium {
            Some(Medium::Network(source)) => Some(&mut **source),
            _ => None,
        });
        out.extend(disks.chain(media).filter_map(NetworkSource::secret_mut));
        if let Some(password) = self.vnc.as_mut().and_then(|v| v.password.as_mut()) {
            out.push(password);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    /// A spec holding every kind the SDK plugs, a disk with a chain and checkpoints, network
    /// disks with secrets, a network medium, and a VNC password.
    fn every_kind() -> VmSpec {
        let mut spec = VmSpec::new("all", Machine::Q35);
        spec.cpu_topology = Some(CpuTopology::max(4));
        spec.vcpus.push(Vcpu {
            id: "cpu1".into(),
            driver: "qemu64-x86_64-cpu".into(),
            slot: vec![("core-id".into(), 1)],
        });
        spec.memory_slots = 2;
        spec.max_memory_mib = Some(2048);
        spec.memory_backend = Some(MemoryBackend::shared_memfd("ram", 256 * MIB));
        spec.memory_devices
            .push(MemoryDevice::dimm("dimm0", 128 * MIB));
        let pci = |slot| Pci::new("pcie.0", slot);
        let scsi = |scsi_id| ScsiAddr {
            bus: "scsi0.0".into(),
            channel: 0,
            scsi_id,
            lun: 0,
        };
        spec.memory_devices.push(MemoryDevice::virtio_mem(
            "vmem0",
            512 * MIB,
            128 * MIB,
            pci(9),
        ));
        spec.balloon = Some(Balloon {
            id: "balloon0".into(),
            pci: pci(10),
        });
        spec.root_ports.push(RootPort {
            id: "rp0".into(),
            chassis: 1,
            pci: pci(2),
        });
        spec.scsi_controllers.push(ScsiController {
            id: "scsi0".into(),
            pci: pci(3),
        });
        let mut disk = Disk::virtio_blk("d1", "/images/d1.2.qcow2", pci(4));
        disk.format = Format::Qcow2;
        disk.generation = 2;
        disk.checkpoints = vec!["c3".into()];
        disk.backing = vec![DiskLayer {
            path: "/images/d1.1.qcow2".into(),
            format: Format::Qcow2,
            generation: 1,
            checkpoints: vec!["c1".into(), "c2".into()],
        }];
        spec.disks.push(disk);
        let iscsi = NetworkSource::Iscsi(Iscsi {
            portal: "192.0.2.1".into(),
            target: "iqn.2026-12.example:t".into(),
            lun: 1,
            initiator: None,
            chap: Some(Chap {
                user: "u".into(),
                password: Secret::new("chap-pw-never-written").with_reference("vault:chap"),
            }),
        });
        spec.disks.push(Disk {
            backend: DiskBackend::Network(Box::new(iscsi)),
            ..Disk::scsi_hd("d2", "", scsi(1))
        });
        let rbd = NetworkSource::Rbd(Rbd {
            pool: "rbd".into(),
            image: "img".into(),
            namespace: None,
            snapshot: None,
            monitors: vec![CephMonitor {
                host: "192.0.2.2".into(),
                port: 6789,
            }],
            user: Some("admin".into()),
            conf: None,
            key: Some(Secret::new("QVFCcmJka2V5").with_reference("file:/etc/ceph/key")),
        });
        spec.cdroms
            .push(Cdrom::scsi("cd0", scsi(2)).with_medium(rbd));
        spec.nics.push(Nic {
            id: "n0".into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
            queues: 2,
            pci: pci(5),
            vhost: false,
            link_up: false,
        });
        spec.vhost_user_blks.push(VhostUserBlk {
            id: "vub0".into(),
            socket: "/run/vub0.sock".into(),
            pci: pci(6),
            num_queues: Some(2),
        });
        spec.virtio_fs.push(VirtioFs {
            id: "fs0".into(),
            socket: "/run/fs0.sock".into(),
            tag: "share".into(),
            pci: pci(7),
            queue_size: None,
        });
        spec.virtio_serials.push(VirtioSerial {
            id: "vser0".into(),
            pci: pci(8),
        });
        spec.serial_ports.push(SerialPort {
            id: "port0".into(),
            bus: "vser0.0".into(),
            name: SerialPort::GUEST_AGENT.into(),
            socket: "/run/qga.sock".into(),
        });
        spec.rngs.push(Rng {
            id: "rng0".into(),
            pci: pci(11),
            source: "/dev/urandom".into(),
        });
        spec.serials = vec![Serial::Pty];
        spec.vnc = Some(Vnc {
            listen: VncListen::Unix("/run/vnc.sock".into()),
            password: Some(Secret::new("vnc-pw-never-written").with_reference("vault:vnc")),
        });
        spec
    }

    #[test]
    fn a_spec_of_every_kind_round_trips_with_its_secrets_as_references() {
        let spec = every_kind();
        spec.validate().unwrap();
        let text = spec.to_json().unwrap();
        for value in [
            "chap-pw-never-written",
            "QVFCcmJka2V5",
            "vnc-pw-never-written",
        ] {
            assert!(!text.contains(value), "a secret was written: {text}");
        }
        assert!(text.contains("\"version\": 1"));
        assert!(text.contains("vault:chap") && text.contains("file:/etc/ceph/key"));
        let mut back = VmSpec::from_json(&text).unwrap();
        assert_ne!(back, spec, "the secrets are unresolved until given");
        // Unresolved, a secret cannot reach QEMU.
        let key = MasterKey::generate().unwrap();
        let chap = |s: &VmSpec| match &s.disks[1].backend {
            DiskBackend::Network(n) => n.secret_value().unwrap().unwrap(),
            _ => unreachable!(),
        };
        assert!(key.encrypt("d2-secret", &chap(&back)).is_err());
        let values = [
            ("vault:chap", "chap-pw-never-written"),
            ("file:/etc/ceph/key", "QVFCcmJka2V5"),
            ("vault:vnc", "vnc-pw-never-written"),
        ];
        back.resolve_secrets(|r| {
            values
                .iter()
                .find(|(k, _)| *k == r)
                .map(|(_, v)| Secret::new(v))
        })
        .unwrap();
        assert_eq!(back, spec);
        assert!(key.encrypt("d2-secret", &chap(&back)).is_ok());
    }

    #[test]
    fn what_cannot_be_kept_or_read_is_refused() {
        let mut spec = every_kind();
        spec.vnc.as_mut().unwrap().password = Some(Secret::new("unreferenced-value"));
        let refused = spec.to_json().unwrap_err().to_string();
        assert!(refused.contains("no reference"), "{refused}");
        assert!(!refused.contains("unreferenced-value"), "{refused}");
        let newer = every_kind()
            .to_json()
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        assert!(VmSpec::from_json(&newer).is_err());
        let mut back = VmSpec::from_json(&every_kind().to_json().unwrap()).unwrap();
        let before = back.clone();
        let missing = back.resolve_secrets(|_| None).unwrap_err().to_string();
        assert!(missing.contains("vault:chap"), "{missing}");
        assert_eq!(back, before);
    }
}
