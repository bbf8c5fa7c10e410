//! Configuration reload (SIGHUP, console `RELOAD`, `POST /reload`): the file
//! is read and validated again and applied without dropping a client. Pool
//! sizes and timeouts, users, routing mode and lag limits, client limits and
//! the admin token change live; a change to a key that is fixed for the
//! process's life refuses the whole reload, so that what runs is always one
//! file's settings and never half of two.

use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::frontend::{Shared, users};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("nothing to reload: tidepool was not started from a configuration file")]
    NoFile,
    #[error("{path}: {source}")]
    Invalid { path: String, source: ConfigError },
    #[error(
        "reload refused, nothing changed: {} cannot change while tidepool runs (restart it to change them)",
        .0.join(", ")
    )]
    Fixed(Vec<&'static str>),
}

/// Rereads the file the proxy was started from and applies it.
pub fn from_file(shared: &Shared) -> Result<Vec<&'static str>, ReloadError> {
    let path = shared.config_file.as_ref().ok_or(ReloadError::NoFile)?;
    let config = Config::load(path).map_err(|source| ReloadError::Invalid {
        path: path.display().to_string(),
        source,
    })?;
    apply(shared, config)
}

/// Applies `new` and names the sections that changed.
pub fn apply(shared: &Shared, new: Config) -> Result<Vec<&'static str>, ReloadError> {
    let old = shared.config.load_full();
    let fixed = old.fixed_keys_changed(&new);
    if !fixed.is_empty() {
        tracing::warn!(keys = ?fixed, "configuration reload refused");
        return Err(ReloadError::Fixed(fixed));
    }
    let mut changed = Vec::new();
    if old.users != new.users {
        let rebuilt = users::rebuild(&new.users, &shared.users.load());
        shared.users.store(Arc::new(rebuilt));
        changed.push("users");
    }
    if old.pool != new.pool {
        shared.pools.apply(new.pool.clone());
        changed.push("pool");
    }
    if old.listen.max_clients != new.listen.max_clients {
        shared.client_slots.resize(new.listen.max_clients);
    }
    if old.listen != new.listen {
        changed.push("listen");
    }
    if old.routing != new.routing {
        changed.push("routing");
    }
    if old.admin != new.admin {
        changed.push("admin");
    }
    shared.config.store(Arc::new(new));
    tracing::info!(changed = ?changed, "configuration reloaded");
    Ok(changed)
}
