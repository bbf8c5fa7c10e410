//! The users clients may log in as, with their SCRAM secrets derived once at
//! start (4096 PBKDF2 rounds are too slow to pay per connection).

use std::collections::HashMap;
use std::sync::Arc;

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
    pub scram: ScramServerAuth,
    salt: Vec<u8>,
    salted_password: Vec<u8>,
}

impl UserEntry {
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
    users
        .iter()
        .map(|u| {
            let salt: [u8; 16] = rand::random();
            let salted = gen_salted_password(u.password.expose(), &salt, SCRAM_ITERATIONS);
            let mut scram = ScramServerAuth::new();
            scram.set_iterations(SCRAM_ITERATIONS);
            let entry = UserEntry {
                name: u.name.clone(),
                password: u.password.clone(),
                allow_md5: u.allow_md5,
                consistency: u.consistency,
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
    };
    build(&[user]).into_values().next()
}
