//! Forwarded questions in flight, shared: a question asked while the same question is
//! already on its way to the upstreams waits for that answer instead of asking them once
//! more. One upstream query per distinct question at a time, as dnsmasq does (it keeps every
//! asker of a question in flight on the one forwarding record): under a burst of one name
//! the upstreams see one question per round trip instead of one per asker, and a spoofer
//! gets one answer to guess per round trip instead of one per copy (the "birthday attack"
//! on many identical questions in flight).
//!
//! What counts as the same question is the caller's key. A flight ends when its answer (or
//! its failure) is in, or when no asker waits for it any longer; the next asker starts a new
//! one. Each network's resolver has flights of its own, so no answer crosses networks.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};

type Flight<T> = Shared<BoxFuture<'static, T>>;

/// The questions in flight, by key; `T` is what a flight ends with.
pub struct Flights<K, T> {
    flights: Mutex<Table<K, T>>,
}

struct Table<K, T> {
    by_key: HashMap<K, Entry<T>>,
    /// Tells a flight from an earlier one under the same key.
    next_id: u64,
}

struct Entry<T> {
    id: u64,
    /// Weak: the askers keep a flight alive, not the table.
    flight: WeakShared<BoxFuture<'static, T>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Flights {
            flights: Mutex::new(Table {
                by_key: HashMap::new(),
                next_id: 0,
            }),
        }
    }
}

impl<K, T> Flights<K, T> {
    fn table(&self) -> MutexGuard<'_, Table<K, T>> {
        // Every change to the table is one insert or one remove, so a lock poisoned by a
        // panic elsewhere still guards a consistent table.
        self.flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Takes a flight off the table when it ends or is dropped, unless a later flight under
/// the same key took its place.
struct Landing<K: Hash + Eq, T> {
    flights: Weak<Flights<K, T>>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, T> Drop for Landing<K, T> {
    fn drop(&mut self) {
        let Some(flights) = self.flights.upgrade() else {
            return;
        };
        let mut table = flights.table();
        if table.by_key.get(&self.key).is_some_and(|e| e.id == self.id) {
            table.by_key.remove(&self.key);
        }
    }
}

impl<K, T> Flights<K, T>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// What the flight of `key` ends with: the one in flight, or a new one that `start`
    /// makes. Dropping the returned future leaves the flight to the other askers.
    pub fn join<F>(self: &Arc<Self>, key: K, start: impl FnOnce() -> F) -> Flight<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut table = self.table();
        if let Some(flight) = table.by_key.get(&key).and_then(|e| e.flight.upgrade()) {
            return flight;
        }
        let id = table.next_id;
        table.next_id = table.next_id.wrapping_add(1);
        let landing = Landing {
            flights: Arc::downgrade(self),
            key: key.clone(),
            id,
        };
        let answer = start();
        let flight = async move {
            let answer = answer.await;
            drop(landing);
            answer
        }
        .boxed()
        .shared();
        // A flight not polled yet always has a weak handle; were there none, this asker
        // would simply fly alone.
        if let Some(weak) = flight.downgrade() {
            table.by_key.insert(key, Entry { id, flight: weak });
        }
        flight
    }

    /// How many flights are in the air.
    pub fn in_flight(&self) -> usize {
        self.table().by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    type Table = Arc<Flights<&'static str, u32>>;

    /// Joins `key`'s flight; a new flight counts itself in `starts` and ends with what
    /// `land` sends.
    fn ask(
        flights: &Table,
        key: &'static str,
        starts: &Arc<AtomicUsize>,
        land: oneshot::Receiver<u32>,
    ) -> Flight<u32> {
        let starts = starts.clone();
        flights.join(key, move || {
            starts.fetch_add(1, Ordering::SeqCst);
            async move { land.await.unwrap_or(0) }
        })
    }

    #[tokio::test]
    async fn the_same_question_in_flight_is_asked_once() {
        let (flights, starts) = (Table::default(), Arc::new(AtomicUsize::new(0)));
        let (land, landing) = oneshot::channel();
        let first = ask(&flights, "www", &starts, landing);
        let (_unused, never) = oneshot::channel();
        let second = ask(&flights, "www", &starts, never);
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        land.send(7).unwrap();
        assert_eq!((first.await, second.await), (7, 7));
        assert_eq!(flights.in_flight(), 0, "landed");
    }

    #[tokio::test]
    async fn after_landing_or_for_another_key_a_new_flight_starts() {
        let (flights, starts) = (Table::default(), Arc::new(AtomicUsize::new(0)));
        let (land, landing) = oneshot::channel();
        let first = ask(&flights, "www", &starts, landing);
        let (land_other, other_landing) = oneshot::channel();
        let other = ask(&flights, "mail", &starts, other_landing);
        assert_eq!((starts.load(Ordering::SeqCst), flights.in_flight()), (2, 2));
        land.send(1).unwrap();
        land_other.send(2).unwrap();
        assert_eq!((first.await, other.await), (1, 2));
        let (land, landing) = oneshot::channel();
        let again = ask(&flights, "www", &starts, landing);
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        land.send(3).unwrap();
        assert_eq!(again.await, 3);
    }

    #[tokio::test]
    async fn a_flight_nobody_waits_for_is_taken_off() {
        let (flights, starts) = (Table::default(), Arc::new(AtomicUsize::new(0)));
        let (_land, landing) = oneshot::channel();
        let first = ask(&flights, "www", &starts, landing);
        assert_eq!(flights.in_flight(), 1);
        drop(first);
        assert_eq!(flights.in_flight(), 0);
        let (land, landing) = oneshot::channel();
        let again = ask(&flights, "www", &starts, landing);
        assert_eq!(starts.load(Ordering::SeqCst), 2, "a new flight");
        land.send(4).unwrap();
        assert_eq!(again.await, 4);
    }
}
