//! The users clients may log in as, with their SCRAM secrets derived once at
//! start (4096 PBKDF2 rounds are too slow to pay per connection).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pgwire::api::auth::sasl::scram::{ScramSecret, ScramServerAuth, gen_salted_password};

use crate::config::{AdminConfig, ConsistencyMode, Secret, UserConfig};

const SCRAM_ITERATIONS: usize = 4096;

pub struct UserEntry {
    pub name: String,
    /// Also the password tidepool logs in to servers with.
    pub password: Secret,
    pub allow_md5: bool,
    /// Overrides `routing.consistency` for this user's sessions.
    pub consistency: Option<ConsistencyMode>,
    /// `max_connections`: this user's clients beyond it get 53300.
    pub max_connections: Option<usize>,
    /// Clients logged in as this user now; carried over by a reload so that
    /// a changed limit counts the clients already in.
    connections: Arc<AtomicUsize>,
    pub scram: ScramServerAuth,
    salt: Vec<u8>,
    salted_password: Vec<u8>,
}

/// One client's place in its user's `max_connections`; freed when dropped.
pub struct UserSlot(Arc<AtomicUsize>);

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UserEntry {
    /// A place among this user's connections, or `None` when the user is at
    /// its limit.
    pub fn take_slot(&self) -> Option<UserSlot> {
        let taken = self.connections.fetch_add(1, Ordering::Relaxed);
        let slot = UserSlot(self.connections.clone());
        match self.max_connections {
            Some(max) if taken >= max => None,
            _ => Some(slot),
        }
    }

    fn same_settings(&self, config: &UserConfig) -> bool {
        self.password == config.password
            && self.allow_md5 == config.allow_md5
            && self.consistency == config.consistency
            && self.max_connections == config.max_connections
    }

    /// The verifier a SCRAM exchange checks the client's proof against.
    pub fn scram_secret(&self) -> ScramSecret {
        ScramSecret::verifier_from_salted_password(
            self.salt.clone(),
            self.salted_password.clone(),
            SCRAM_ITERATIONS,
        )
    }
}

pub type Users = HashMap<String, Arc<UserEntry>>;

pub fn build(users: &[UserConfig]) -> Users {
    rebuild(users, &Users::new())
}

/// The users of a reloaded configuration: an unchanged user keeps its entry
/// (no new SCRAM derivation), a changed one keeps its connection count.
pub fn rebuild(users: &[UserConfig], previous: &Users) -> Users {
    users
        .iter()
        .map(|u| {
            let before = previous.get(&u.name);
            if let Some(entry) = before.filter(|e| e.same_settings(u)) {
                return (u.name.clone(), entry.clone());
            }
            let salt: [u8; 16] = rand::random();
            let salted = gen_salted_password(u.password.expose(), &salt, SCRAM_ITERATIONS);
            let mut scram = ScramServerAuth::new();
            scram.set_iterations(SCRAM_ITERATIONS);
            let entry = UserEntry {
                name: u.name.clone(),
                password: u.password.clone(),
                allow_md5: u.allow_md5,
                consistency: u.consistency,
                max_connections: u.max_connections,
                connections: before.map(|e| e.connections.clone()).unwrap_or_default(),
                scram,
                salt: salt.to_vec(),
                salted_password: salted,
            };
            (u.name.clone(), Arc::new(entry))
        })
        .collect()
}

/// The admin console's user, when `[admin]` names one with a password.
pub fn admin(config: &AdminConfig) -> Option<Arc<UserEntry>> {
    let (Some(name), Some(password)) = (&config.user, &config.password) else {
        return None;
    };
    let user = UserConfig {
        name: name.clone(),
        password: password.clone(),
        allow_md5: false,
        consistency: None,
        max_connections: None,
    };
    build(&[user]).into_values().next()
}
