//! The guest's accounts: `guest-set-user-password`, `guest-ssh-get-authorized-keys`,
//! `guest-ssh-add-authorized-keys`, `guest-ssh-remove-authorized-keys` (agent 5.2 and later),
//! `guest-get-users`. A password and a key are [`Redacted`]: their `Debug` shows neither.

use base64::Engine;
use serde::{Deserialize, Serialize};

use qhotplug_qmp::command;

use super::Empty;

command!(
    /// `guest-set-user-password`: sets a user's password (the guest's `chpasswd`). Build it with
    /// [`GuestSetUserPassword::new`].
    "guest-set-user-password", GuestSetUserPassword {
        /// The user.
        username: String,
        /// The password, in base64, as the agent takes it.
        password: Redacted,
        /// The password is already a `crypt(3)` hash.
        crypted: bool,
    } -> Empty,
    redact(command) { vec![command.password.expose()] }
);
command!(
    /// `guest-ssh-get-authorized-keys`: the keys in the user's `~/.ssh/authorized_keys`.
    "guest-ssh-get-authorized-keys", GuestSshGetAuthorizedKeys {
        /// The user.
        username: String,
    } -> AuthorizedKeys
);
command!(
    /// `guest-ssh-add-authorized-keys`: adds keys to the user's `~/.ssh/authorized_keys` (made,
    /// with `~/.ssh`, if missing); with `reset`, the file holds only these afterwards.
    "guest-ssh-add-authorized-keys", GuestSshAddAuthorizedKeys {
        /// The user.
        username: String,
        /// OpenSSH public keys, one line each.
        keys: Vec<Redacted>,
        /// Replace every key the file had.
        #[serde(skip_serializing_if = "Option::is_none")]
        reset: Option<bool>,
    } -> Empty,
    redact(command) { command.keys.iter().map(Redacted::expose).collect() }
);
command!(
    /// `guest-ssh-remove-authorized-keys`: removes these keys from the user's
    /// `~/.ssh/authorized_keys`; one it does not have is no error.
    "guest-ssh-remove-authorized-keys", GuestSshRemoveAuthorizedKeys {
        /// The user.
        username: String,
        /// The keys to remove.
        keys: Vec<Redacted>,
    } -> Empty,
    redact(command) { command.keys.iter().map(Redacted::expose).collect() }
);
command!(
    /// `guest-get-users`: the users logged in to the guest (its `utmp`).
    "guest-get-users", GuestGetUsers, Vec<GuestUser>
);

impl GuestSetUserPassword {
    /// Sets `username`'s password to `password` (plain text, or a `crypt(3)` hash when `crypted`).
    pub fn new(username: impl Into<String>, password: &[u8], crypted: bool) -> Self {
        GuestSetUserPassword {
            username: username.into(),
            password: Redacted(base64::engine::general_purpose::STANDARD.encode(password)),
            crypted,
        }
    }
}

/// Text the guest needs and no log may show (a password, an ssh key): `Debug` prints
/// `<redacted>`; it is sent and read as the text it is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Redacted(String);

impl Redacted {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Redacted(text.into())
    }

    /// The text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `guest-ssh-get-authorized-keys`' reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AuthorizedKeys {
    /// The keys, one line each.
    pub keys: Vec<Redacted>,
}

/// A user logged in to the guest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GuestUser {
    /// The user's name.
    pub user: String,
    /// When they logged in, seconds since the epoch.
    pub login_time: f64,
    /// Their domain (Windows).
    pub domain: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_and_a_key_are_sent_whole_and_never_shown() {
        let set = GuestSetUserPassword::new("root", b"pa:ss\xff", false);
        let sent = serde_json::to_string(&set).unwrap();
        assert!(sent.contains("\"password\":\"cGE6c3P/\""), "{sent}");
        let add = GuestSshAddAuthorizedKeys {
            username: "root".into(),
            keys: vec![Redacted::new("ssh-ed25519 AAAAkey me@host")],
            reset: None,
        };
        let sent = serde_json::to_string(&add).unwrap();
        assert!(
            sent.contains("\"keys\":[\"ssh-ed25519 AAAAkey me@host\"]"),
            "{sent}"
        );
        let shown = format!("{set:?} {add:?}");
        assert!(
            !shown.contains("cGE6") && !shown.contains("AAAAkey"),
            "{shown}"
        );
    }
}
