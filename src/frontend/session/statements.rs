//! A client's named prepared statements and their proxy-global names. Server
//! connections hold statements under global names derived from the statement
//! itself, so any client's statement can run on any server connection and
//! clients preparing the same text share the server-side copy.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::protocol::Frame;
use crate::protocol::frontend::Parse;
use crate::route::classify::Intent;

#[derive(Debug)]
pub struct Statement {
    /// The server-side name: `_tp_` and 128 bits of hash of text and parameter
    /// types, then `_` and the generation when it is not the first.
    pub global: Vec<u8>,
    /// Which copy of the text this is (see `StaleStatements`).
    generation: u32,
    /// The client's Parse under the global name, ready to send to any server.
    pub parse: Frame,
    /// Decided once at Parse; it routes every later Bind/Execute.
    pub intent: Intent,
    /// A COPY: nothing may be pipelined behind its Execute.
    pub copies: bool,
}

impl Statement {
    pub fn new(parse: &Parse<'_>, intent: Intent, stale: &StaleStatements) -> Arc<Statement> {
        let mut global = global_name(parse.query, parse.param_types);
        let generation = stale.generation(&global);
        if generation > 0 {
            global.extend_from_slice(format!("_{generation}").as_bytes());
        }
        let copies = std::str::from_utf8(parse.query).map_or(true, super::state::starts_copy);
        Arc::new(Statement {
            parse: parse.renamed(&global),
            global,
            generation,
            intent,
            copies,
        })
    }

    /// The global name without the generation: what every copy shares.
    fn base(&self) -> &[u8] {
        &self.global[..BASE_NAME_LEN]
    }
}

/// `_tp_` and 32 hex digits.
const BASE_NAME_LEN: usize = 36;

/// Texts whose server-side copies PostgreSQL refused to run: a DDL changed
/// the result type under a prepared statement ("cached plan must not change
/// result type", 0A000 at Bind or Describe), and no copy made before it
/// recovers. Clients share copies by text, so without this a client's
/// re-prepare (what drivers do on that error) would land on the same dead
/// copies until the pools closed them. Preparing the text again gives it
/// the next generation, a global name no server holds, so a fresh copy is
/// made wherever it runs, as on a direct connection. A client's statement of
/// an older generation is refused as PostgreSQL refuses it, on every server
/// connection: one that never held it would plan it afresh, and the client
/// would decode the new result type with the old one's description.
pub struct StaleStatements {
    /// Spares Parse the lock while nothing went stale, the usual case.
    any: AtomicBool,
    generations: Mutex<lru::LruCache<Vec<u8>, u32>>,
}

impl Default for StaleStatements {
    fn default() -> Self {
        // Forgetting a generation costs one more error for that text.
        let cap = NonZeroUsize::new(4096).expect("non-zero");
        StaleStatements {
            any: AtomicBool::new(false),
            generations: Mutex::new(lru::LruCache::new(cap)),
        }
    }
}

impl StaleStatements {
    fn generation(&self, base: &[u8]) -> u32 {
        if !self.any.load(Ordering::Relaxed) {
            return 0;
        }
        let mut generations = self.generations.lock().expect("not poisoned");
        generations.get(base).copied().unwrap_or(0)
    }

    /// Whether `statement` was prepared before its text went stale.
    pub fn outdated(&self, statement: &Statement) -> bool {
        self.generation(statement.base()) > statement.generation
    }

    /// The server refused to run `statement`'s copy: the text's next Parse
    /// makes a new one.
    pub fn retire(&self, statement: &Statement) {
        let next = statement.generation + 1;
        let mut generations = self.generations.lock().expect("not poisoned");
        let known = generations.get_or_insert_mut(statement.base().to_vec(), || next);
        *known = (*known).max(next);
        self.any.store(true, Ordering::Relaxed);
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
        assert_eq!(a.len(), BASE_NAME_LEN);
    }

    #[test]
    fn a_retired_text_is_prepared_under_a_new_name() {
        let stale = StaleStatements::default();
        let frame = crate::protocol::frontend::parse(b"s1", "select * from t");
        let parse = Parse::decode(&frame).unwrap();
        let first = Statement::new(&parse, Intent::Write, &stale);
        assert_eq!(first.global.len(), BASE_NAME_LEN);
        assert_eq!(
            Statement::new(&parse, Intent::Write, &stale).global,
            first.global
        );

        assert!(!stale.outdated(&first));
        stale.retire(&first);
        assert!(stale.outdated(&first));
        let second = Statement::new(&parse, Intent::Write, &stale);
        assert!(!stale.outdated(&second));
        assert_ne!(second.global, first.global);
        assert!(second.global.starts_with(first.base()) && second.global.len() < 64);
        // The old copy failing again elsewhere does not undo the new one.
        stale.retire(&first);
        assert_eq!(
            Statement::new(&parse, Intent::Write, &stale).global,
            second.global
        );
        stale.retire(&second);
        let third = Statement::new(&parse, Intent::Write, &stale);
        assert!(third.global != second.global && third.global != first.global);
    }
}
