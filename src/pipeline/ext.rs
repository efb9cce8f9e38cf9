//! Typed per-stage state: a stage keeps what it needs for one connection or one transaction in an
//! [`Extensions`] map keyed by its own type, so a new stage adds a type of its own instead of a field in
//! the shared contexts (the `http::Extensions` idea, as pingora's per-request `CTX` does per filter).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Per-transaction stage state: owned by the transaction, reached through `&mut TxnContext`.
#[derive(Default)]
pub struct Extensions {
    map: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl Extensions {
    /// Stores `value`, replacing one of the same type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.map.insert(TypeId::of::<T>(), Box::new(value));
    }

    /// The value of type `T`, if one was stored.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.map.get(&TypeId::of::<T>()).and_then(|b| b.downcast_ref())
    }

    /// The value of type `T`, mutably.
    pub fn get_mut<T: Any + Send + Sync>(&mut self) -> Option<&mut T> {
        self.map.get_mut(&TypeId::of::<T>()).and_then(|b| b.downcast_mut())
    }

    /// The value of type `T`, stored first from `init` when missing.
    pub fn get_or_insert_with<T: Any + Send + Sync>(&mut self, init: impl FnOnce() -> T) -> &mut T {
        let slot = self.map.entry(TypeId::of::<T>()).or_insert_with(|| Box::new(init()));
        // Invariant: every slot is keyed by the `TypeId` of the value it holds, so the downcast succeeds.
        slot.downcast_mut().expect("extension slot holds its own type")
    }

    /// Takes the value of type `T` out.
    pub fn remove<T: Any + Send + Sync>(&mut self) -> Option<T> {
        self.map.remove(&TypeId::of::<T>()).and_then(|b| b.downcast().ok()).map(|b| *b)
    }
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extensions").field("len", &self.map.len()).finish()
    }
}

/// Per-connection stage state, shared by the hooks of one connection through `&ConnInfo`. Values are
/// `Arc`s, so a hook clones one out and never holds the lock across an `.await`. Dropped with the
/// connection: a stage can keep a guard here (a concurrency lease) that is released when the client leaves.
#[derive(Clone, Default)]
pub struct SharedExtensions {
    map: Arc<Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
}

impl SharedExtensions {
    /// Stores `value`, replacing one of the same type.
    pub fn insert<T: Any + Send + Sync>(&self, value: T) {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was stored.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let v = self.map.lock().unwrap_or_else(PoisonError::into_inner).get(&TypeId::of::<T>())?.clone();
        v.downcast().ok()
    }

    /// Takes the value of type `T` out.
    pub fn remove<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        let v = self.map.lock().unwrap_or_else(PoisonError::into_inner).remove(&TypeId::of::<T>())?;
        v.downcast().ok()
    }
}

impl std::fmt::Debug for SharedExtensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.map.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("SharedExtensions").field("len", &len).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Count(u32);

    #[test]
    fn typed_slots() {
        let mut e = Extensions::default();
        assert!(e.get::<Count>().is_none());
        e.get_or_insert_with(|| Count(1)).0 += 1;
        assert_eq!(e.get::<Count>(), Some(&Count(2)));
        e.insert(7u8);
        assert_eq!(e.remove::<Count>(), Some(Count(2)));
        assert_eq!(e.get::<u8>(), Some(&7));
        let s = SharedExtensions::default();
        s.insert(Count(3));
        let c = s.clone();
        assert_eq!(c.get::<Count>().map(|c| c.0), Some(3));
        assert!(s.remove::<Count>().is_some() && c.get::<Count>().is_none());
    }
}
