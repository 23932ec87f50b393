//! Secrets (a CHAP password, a Ceph key) and how they reach QEMU: as `secret` objects whose data
//! is encrypted (AES-256-CBC) with a per-VM master key, itself read by QEMU from a pipe (never a
//! file on disk, never a command-line argument or a QMP argument). The plaintext exists only in a
//! [`Secret`], whose `Debug` is redacted, which has no `Display`, and which is serialised as its
//! reference alone.

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;

use aes::cipher::{block_padding::Pkcs7, BlockEncryptMut, KeyIvInit};
use base64::Engine;

use crate::error::{Error, Result};
use crate::value::{p, QomObject};

/// A secret value: its bytes reach QEMU only encrypted with the VM's [`MasterKey`]. `Debug`
/// prints `Secret(<redacted>)` (with its reference, if it has one); there is no other way to
/// print it.
///
/// A spec written out ([`VmSpec::to_json`](crate::VmSpec::to_json)) keeps a secret's
/// [`reference`](Secret::reference), never its bytes: a name the caller chose to find the value
/// again (a vault path, a key file). Read back, the secret is unresolved until the caller gives
/// the value ([`VmSpec::resolve_secrets`](crate::VmSpec::resolve_secrets)); an unresolved secret
/// is refused wherever it would reach QEMU. A secret with no reference cannot be written.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: Option<Arc<[u8]>>,
    reference: Option<Arc<str>>,
}

impl Secret {
    /// A secret of these bytes.
    pub fn new(bytes: impl AsRef<[u8]>) -> Secret {
        Secret {
            value: Some(bytes.as_ref().into()),
            reference: None,
        }
    }

    /// The same secret, found again by `reference` (what a written spec keeps in its place).
    pub fn with_reference(mut self, reference: impl Into<String>) -> Secret {
        self.reference = Some(reference.into().into());
        self
    }

    /// A secret known only by its reference, its value not given yet.
    pub fn unresolved(reference: impl Into<String>) -> Secret {
        Secret {
            value: None,
            reference: Some(reference.into().into()),
        }
    }

    /// The name the caller finds the value by, if it gave one.
    pub fn reference(&self) -> Option<&str> {
        self.reference.as_deref()
    }

    /// Whether its value is known (not a secret read back from a written spec and not yet
    /// resolved).
    pub fn is_resolved(&self) -> bool {
        self.value.is_some()
    }

    /// The secret's bytes, for whoever must hand them on (the SDK's encryption); empty for an
    /// unresolved secret, which [`MasterKey::encrypt`] refuses.
    pub fn expose(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.reference, &self.value) {
            (Some(r), Some(_)) => write!(f, "Secret(<redacted>, reference {r:?})"),
            (Some(r), None) => write!(f, "Secret(<unresolved>, reference {r:?})"),
            (None, _) => f.write_str("Secret(<redacted>)"),
        }
    }
}

/// How a secret is written: `{"secret": "<reference>"}`, its value never.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeMap};
        let Some(reference) = &self.reference else {
            return Err(S::Error::custom(
                "a secret with no reference cannot be written (Secret::with_reference)",
            ));
        };
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry("secret", &**reference)?;
        map.end()
    }
}

/// A written secret, read back unresolved.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Written {
            secret: String,
        }
        let written = Written::deserialize(deserializer)?;
        Ok(Secret::unresolved(written.secret))
    }
}

/// A per-VM AES-256 key that QEMU holds as the `secret` object [`MasterKey::id`]; every other
/// secret goes to QEMU encrypted with it. A new one is made for each QEMU the SDK launches or
/// attaches to (an attached QEMU's earlier key is not ours to know).
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    key: Arc<[u8; 32]>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Random bytes from the kernel.
fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::Io)?;
    Ok(bytes)
}

impl MasterKey {
    /// A new random key, its object named `qhotplug-key-<random>`.
    pub fn generate() -> Result<MasterKey> {
        let tag: [u8; 6] = random()?;
        let id =
            crate::names::master_key(&tag.iter().map(|b| format!("{b:02x}")).collect::<String>());
        Ok(MasterKey {
            id,
            key: Arc::new(random()?),
        })
    }

    /// Keeps the key in `path`, readable by its owner only (`id`, then the key in base64), so a
    /// process that adopts the QEMU later can still encrypt secrets for it. Written to a
    /// temporary file and renamed, so a reader finds the whole key or none.
    pub(crate) fn keep(&self, path: &std::path::Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let b64 = base64::engine::general_purpose::STANDARD;
        let partial = path.with_extension("partial");
        let _ = std::fs::remove_file(&partial);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(Error::Io)?;
        writeln!(file, "{}\n{}", self.id, b64.encode(&self.key[..])).map_err(Error::Io)?;
        file.sync_all().map_err(Error::Io)?;
        std::fs::rename(&partial, path).map_err(Error::Io)
    }

    /// The key [`keep`](MasterKey::keep) wrote to `path`.
    pub(crate) fn kept(path: &std::path::Path) -> Result<MasterKey> {
        let text = std::fs::read_to_string(path).map_err(Error::Io)?;
        let bad = || Error::InvalidSpec(format!("{} holds no master key", path.display()));
        let (id, key) = text.trim().split_once('\n').ok_or_else(bad)?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|_| bad())?;
        let key: [u8; 32] = key.try_into().map_err(|_| bad())?;
        Ok(MasterKey {
            id: id.to_owned(),
            key: Arc::new(key),
        })
    }

    /// The id of its `secret` object in QEMU.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A pipe whose read end holds the key, written and closed: QEMU reads it to its end as the
    /// file `/proc/self/fd/<n>` once it has the read end as fd `n`.
    pub fn pipe(&self) -> Result<std::io::PipeReader> {
        let (reader, mut writer) = std::io::pipe().map_err(Error::Io)?;
        writer.write_all(&self.key[..]).map_err(Error::Io)?;
        drop(writer);
        Ok(reader)
    }

    /// The master key's own object, read from `/proc/self/fd/<fd>` in QEMU.
    pub fn object(&self, fd: i64) -> QomObject {
        QomObject {
            qom_type: "secret",
            props: vec![
                p("id", self.id.clone()),
                p("file", format!("/proc/self/fd/{fd}")),
                p("format", "raw"),
            ],
        }
    }

    /// The `secret` object `id` holding `secret`, encrypted with this key under a fresh IV.
    pub fn encrypt(&self, id: &str, secret: &Secret) -> Result<QomObject> {
        if !secret.is_resolved() {
            return Err(Error::InvalidSpec(format!(
                "{id}: secret {:?} was read back from a written spec and not resolved \
                 (VmSpec::resolve_secrets)",
                secret.reference().unwrap_or("")
            )));
        }
        let iv: [u8; 16] = random()?;
        let cipher = cbc::Encryptor::<aes::Aes256>::new(self.key[..].into(), (&iv).into());
        let data = cipher.encrypt_padded_vec_mut::<Pkcs7>(secret.expose());
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(QomObject {
            qom_type: "secret",
            props: vec![
                p("id", id),
                p("data", b64.encode(data)),
                p("keyid", self.id.clone()),
                p("iv", b64.encode(iv)),
                p("format", "base64"),
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::BlockDecryptMut;

    #[test]
    fn debug_never_shows_the_secret_or_the_key() {
        let secret = Secret::new("hunter2-chap");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        let key = MasterKey::generate().unwrap();
        let shown = format!("{key:?} {:#?}", Some(secret));
        assert!(!shown.contains("hunter2"));
        assert!(shown.contains(key.id()));
    }

    #[test]
    fn the_encrypted_object_decrypts_to_the_secret_and_carries_no_plaintext() {
        let key = MasterKey::generate().unwrap();
        let secret = Secret::new("hunter2-chap");
        let props = key.encrypt("d1-secret", &secret).unwrap();
        assert_eq!(props.qom_type, "secret");
        let get = |k: &str| {
            props
                .props
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.to_cli())
                .unwrap()
        };
        assert_eq!(get("keyid"), key.id());
        let b64 = base64::engine::general_purpose::STANDARD;
        let data = b64.decode(get("data")).unwrap();
        let iv = b64.decode(get("iv")).unwrap();
        let rendered = format!("{props:?}");
        assert!(!rendered.contains("hunter2"));
        let plain = cbc::Decryptor::<aes::Aes256>::new(key.key[..].into(), iv[..].into())
            .decrypt_padded_vec_mut::<Pkcs7>(&data)
            .unwrap();
        assert_eq!(plain, b"hunter2-chap");
        // A fresh IV each time: the same secret never encrypts the same way twice.
        assert_ne!(key.encrypt("d1-secret", &secret).unwrap(), props);
    }

    #[test]
    fn the_key_pipe_holds_the_key_and_ends() {
        let key = MasterKey::generate().unwrap();
        let mut read = Vec::new();
        key.pipe().unwrap().read_to_end(&mut read).unwrap();
        assert_eq!(read, key.key[..]);
    }
}
