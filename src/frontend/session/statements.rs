//! A client's named prepared statements and their proxy-global names. Server
//! connections hold statements under global names derived from the statement
//! itself, so any client's statement can run on any server connection and
//! clients preparing the same text share the server-side copy.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::protocol::Frame;
use crate::protocol::frontend::Parse;
use crate::route::classify::Intent;

pub struct Statement {
    /// The server-side name: `_tp_` and 128 bits of hash of text and parameter types.
    pub global: Vec<u8>,
    /// The client's Parse under the global name, ready to send to any server.
    pub parse: Frame,
    /// Decided once at Parse; it routes every later Bind/Execute.
    pub intent: Intent,
    /// A COPY: nothing may be pipelined behind its Execute.
    pub copies: bool,
}

impl Statement {
    pub fn new(parse: &Parse<'_>, intent: Intent) -> Arc<Statement> {
        let global = global_name(parse.query, parse.param_types);
        let copies = std::str::from_utf8(parse.query).map_or(true, super::state::starts_copy);
        Arc::new(Statement {
            parse: parse.renamed(&global),
            global,
            intent,
            copies,
        })
    }
}

/// Two independent 64-bit SipHashes: a collision would run the wrong
/// statement, so 64 bits (a birthday bound near 4 billion) is not enough.
fn global_name(query: &[u8], param_types: &[u8]) -> Vec<u8> {
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        query.hash(&mut h);
        param_types.hash(&mut h);
        h.finish()
    };
    format!("_tp_{:016x}{:016x}", half(1), half(2)).into_bytes()
}

#[derive(Default)]
pub struct Statements {
    by_name: HashMap<Vec<u8>, Arc<Statement>>,
}

impl Statements {
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.by_name.get(name)
    }

    pub fn insert(&mut self, name: &[u8], statement: Arc<Statement>) {
        self.by_name.insert(name.to_vec(), statement);
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.by_name.remove(name);
    }

    /// Forgets `name` only if it still stands for `global` (a failed Parse
    /// must not remove a statement the client prepared again since).
    pub fn remove_if(&mut self, name: &[u8], global: &[u8]) {
        if self.by_name.get(name).is_some_and(|s| s.global == global) {
            self.by_name.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_names_depend_on_text_and_types_only() {
        let a = global_name(b"select $1", b"\0\x01\0\0\0\x17");
        assert_eq!(a, global_name(b"select $1", b"\0\x01\0\0\0\x17"));
        assert_ne!(a, global_name(b"select $1", b"\0\x01\0\0\0\x19"));
        assert_ne!(a, global_name(b"select $2", b"\0\x01\0\0\0\x17"));
        assert!(a.len() < 64, "fits NAMEDATALEN");
    }
}
