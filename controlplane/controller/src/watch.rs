//! Fan-out of state changes to Watch streams: snapshot, SNAPSHOT_END, then live events.
//!
//! A [`Hub`] keeps the authoritative in-memory state `S` and the watchers under ONE mutex, so a
//! new watcher's snapshot and its registration are atomic with respect to updates: no event is
//! missed or duplicated between the snapshot and the live stream. Each watcher has a bounded
//! queue; when it is full the watcher is disconnected with RESOURCE_EXHAUSTED (it reconnects
//! and gets a fresh snapshot) and the drop is counted by reason. Memory never grows with a slow
//! consumer.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio_stream::Stream;

/// Status message a slow watcher is disconnected with.
pub const SLOW_CONSUMER_MESSAGE: &str =
    "watch consumer too slow: its event queue is full; reconnect to get a fresh snapshot";

/// Shared state plus its watchers.
pub struct Hub<S, E> {
    name: &'static str,
    queue_events: usize,
    inner: Mutex<HubInner<S, E>>,
}

struct HubInner<S, E> {
    state: S,
    watchers: Vec<Watcher<E>>,
}

type Filter<E> = Box<dyn Fn(&E) -> bool + Send + Sync>;

struct Watcher<E> {
    filter: Filter<E>,
    tx: mpsc::Sender<E>,
    overflowed: Arc<AtomicBool>,
}

impl<S, E: Clone + Send + 'static> Hub<S, E> {
    /// A hub named `name` (a metric label) with per-watcher queues of `queue_events`.
    pub fn new(name: &'static str, state: S, queue_events: usize) -> Hub<S, E> {
        Hub {
            name,
            queue_events: queue_events.max(1),
            inner: Mutex::new(HubInner {
                state,
                watchers: Vec::new(),
            }),
        }
    }

    /// Reads the state.
    pub fn with_state<T>(&self, f: impl FnOnce(&S) -> T) -> T {
        f(&self.lock().state)
    }

    /// Applies `f` to the state and delivers the events it returns to every watcher whose
    /// filter accepts them.
    pub fn publish(&self, f: impl FnOnce(&mut S) -> Vec<E>) {
        let mut inner = self.lock();
        let events = f(&mut inner.state);
        if events.is_empty() {
            return;
        }
        let name = self.name;
        inner.watchers.retain(|w| {
            for ev in &events {
                if !(w.filter)(ev) {
                    continue;
                }
                match w.tx.try_send(ev.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        w.overflowed.store(true, Ordering::Release);
                        metrics::counter!("outrelay_controller_watch_disconnects_total", "watch" => name, "reason" => "slow_consumer").increment(1);
                        return false;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
            }
            true
        });
        metrics::gauge!("outrelay_controller_watchers", "watch" => name).set(f64::from(
            u32::try_from(inner.watchers.len()).unwrap_or(u32::MAX),
        ));
    }

    /// Registers a watcher: returns the snapshot events (taken from the state under the same
    /// lock as the registration) and the live receiver.
    pub fn subscribe(
        &self,
        snapshot: impl FnOnce(&S) -> Vec<E>,
        filter: impl Fn(&E) -> bool + Send + Sync + 'static,
    ) -> Subscription<E> {
        let (tx, rx) = mpsc::channel(self.queue_events);
        let overflowed = Arc::new(AtomicBool::new(false));
        let mut inner = self.lock();
        // Watchers whose stream is gone are otherwise dropped only at the next event.
        inner.watchers.retain(|w| !w.tx.is_closed());
        let snap = snapshot(&inner.state);
        inner.watchers.push(Watcher {
            filter: Box::new(filter),
            tx,
            overflowed: overflowed.clone(),
        });
        Subscription {
            snapshot: snap,
            rx,
            overflowed,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubInner<S, E>> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping every watch; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What ends a watch stream early (its caller revoked): yields the status it ends with.
pub type StreamEnd = Pin<Box<dyn Future<Output = tonic::Status> + Send>>;

/// A new watcher's snapshot and live queue.
pub struct Subscription<E> {
    /// Current state as events.
    pub snapshot: Vec<E>,
    rx: mpsc::Receiver<E>,
    overflowed: Arc<AtomicBool>,
}

impl<E: Send + 'static> Subscription<E> {
    /// The first event of this subscription: from the snapshot, else the first live one;
    /// `None` when the hub dropped this watcher.
    pub async fn first(mut self) -> Option<E> {
        if !self.snapshot.is_empty() {
            return Some(self.snapshot.swap_remove(0));
        }
        self.rx.recv().await
    }

    /// The gRPC stream: snapshot events, then `end` (SNAPSHOT_END), then live events mapped by
    /// `map`; ends with RESOURCE_EXHAUSTED if this watcher was too slow.
    pub fn into_stream<M, F>(self, end: M, map: F) -> WatchStream<E, M>
    where
        F: Fn(E) -> M + Send + Sync + 'static,
        M: Send + 'static,
    {
        let map: Arc<dyn Fn(E) -> M + Send + Sync> = Arc::new(map);
        let mut head: std::collections::VecDeque<M> =
            self.snapshot.into_iter().map(|e| map(e)).collect();
        head.push_back(end);
        WatchStream {
            head,
            rx: self.rx,
            overflowed: self.overflowed,
            map,
            end: None,
            done: false,
        }
    }
}

/// Stream of watch messages (see [`Subscription::into_stream`]).
pub struct WatchStream<E, M> {
    head: std::collections::VecDeque<M>,
    rx: mpsc::Receiver<E>,
    overflowed: Arc<AtomicBool>,
    map: Arc<dyn Fn(E) -> M + Send + Sync>,
    end: Option<StreamEnd>,
    done: bool,
}

impl<E, M> WatchStream<E, M> {
    /// Ends the stream with the status `end` yields, as soon as it does (before any further
    /// event): how a watch of a revoked caller ends (review M5).
    pub fn until(mut self, end: Option<StreamEnd>) -> WatchStream<E, M> {
        self.end = end;
        self
    }
}

impl<E, M: Unpin> Stream for WatchStream<E, M> {
    type Item = Result<M, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(end) = this.end.as_mut()
            && let Poll::Ready(status) = end.as_mut().poll(cx)
        {
            this.done = true;
            this.end = None;
            return Poll::Ready(Some(Err(status)));
        }
        if let Some(m) = this.head.pop_front() {
            return Poll::Ready(Some(Ok(m)));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(e)) => Poll::Ready(Some(Ok((this.map)(e)))),
            Poll::Ready(None) => {
                this.done = true;
                if this.overflowed.load(Ordering::Acquire) {
                    Poll::Ready(Some(Err(tonic::Status::resource_exhausted(
                        SLOW_CONSUMER_MESSAGE,
                    ))))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn snapshot_then_live_then_slow_consumer_is_cut() {
        let hub: Hub<Vec<u32>, u32> = Hub::new("test", vec![1, 2], 4);
        let sub = hub.subscribe(|s| s.clone(), |_| true);
        let mut stream = sub.into_stream(0u32, |e| e);
        hub.publish(|s| {
            s.push(3);
            vec![3]
        });
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(stream.next().await.expect("item").expect("ok"));
        }
        assert_eq!(got, vec![1, 2, 0, 3]);
        // Overflow the queue of 4: the fifth undelivered event disconnects the watcher.
        for i in 10..15 {
            hub.publish(|_| vec![i]);
        }
        let mut items = Vec::new();
        while let Some(item) = stream.next().await {
            items.push(item);
        }
        assert_eq!(items.len(), 5, "4 queued events then the error");
        let last = items.pop().expect("error item");
        assert_eq!(
            last.expect_err("slow consumer").code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(hub.lock().watchers.len(), 0);
    }
}
