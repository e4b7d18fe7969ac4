//! The send side of a connection's data streams: one queue per stream, one memory bound
//! for all of them.
//!
//! `send_data` (called from an Erlang scheduler, never blocking) routes each packet to
//! its stream's queue ([`crate::routing`]); one writer task per stream moves its queue
//! into QUIC, which interleaves the streams (fairly between equal urgencies, the priority
//! stream first). So no sender waits behind another sender's bytes inside the carrier.
//!
//! Memory: the bytes queued on all streams together are bounded by `send_queue_limit`.
//! Past it `send_data` answers [`SendStatus::Busy`] and the controller stops draining
//! the VM's queue, which makes the VM suspend the connection's senders (busy dist) —
//! backpressure end to end. The writers report [`SendStatus`] recovery once the queues
//! fall to the low watermark.

use std::collections::VecDeque;
use std::num::NonZeroU8;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use crate::fence::{Fence, FenceOut};
use crate::frame::{self, OutgoingPacket};
use crate::routing::{Route, Routes, FIXED_STREAM};

/// Answer of [`crate::Connection::send_data`].
#[derive(Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Queued; send more.
    Ready,
    /// Queued, but the queues are full: stop until [`crate::Events::writable`].
    Busy,
}

/// Pieces below this size are copied together into the queue's tail rather than queued
/// one by one: a stream of small messages then reaches QUIC as a few large writes.
const COALESCE_BELOW: usize = 4096;

/// One data stream's queue.
#[derive(Default)]
struct StreamQueue {
    chunks: Mutex<Chunks>,
    bytes: AtomicUsize,
    wake: Notify,
}

/// Queued pieces, oldest first; small ones gather in `tail`.
#[derive(Default)]
struct Chunks {
    sealed: VecDeque<Bytes>,
    tail: BytesMut,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        if chunk.len() < COALESCE_BELOW {
            self.tail.extend_from_slice(&chunk);
        } else {
            self.seal();
            self.sealed.push_back(chunk);
        }
    }

    fn seal(&mut self) {
        if !self.tail.is_empty() {
            self.sealed.push_back(self.tail.split().freeze());
        }
    }

    fn take(&mut self) -> Vec<Bytes> {
        self.seal();
        self.sealed.drain(..).collect()
    }
}

pub(crate) struct DataOut {
    streams: Vec<StreamQueue>,
    routes: Mutex<Routes>,
    /// Which streams a packet without a sender must be fenced from (locked after `routes`).
    fences: Mutex<FenceOut>,
    /// Bytes queued on all streams and not yet handed to QUIC.
    bytes: AtomicUsize,
    limit: usize,
    low_watermark: usize,
    want_writable: AtomicBool,
}

impl DataOut {
    /// Queues for `normal` normal streams (plus the priority stream when `normal` > 1),
    /// bounded by `limit` bytes.
    pub(crate) fn new(normal: NonZeroU8, limit: usize) -> Self {
        let routes = Routes::new(normal);
        let streams = (0..routes.streams()).map(|_| StreamQueue::default()).collect();
        DataOut {
            streams,
            routes: Mutex::new(routes),
            fences: Mutex::new(FenceOut::default()),
            bytes: AtomicUsize::new(0),
            limit,
            // Resume soon after the queues fall below the limit: a small message that
            // waits in the VM's queue (one FIFO for every sender) behind the busy
            // connection waits for this much bulk to go out first.
            low_watermark: limit - limit / 32,
            want_writable: AtomicBool::new(false),
        }
    }

    /// How many data streams the writers serve.
    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// True when packets are read for their sender (several streams).
    pub(crate) fn by_sender(&self) -> bool {
        self.streams.len() > 1
    }

    /// The priority stream's index, if any.
    pub(crate) fn priority_stream(&self) -> Option<usize> {
        lock(&self.routes).priority_stream()
    }

    /// Queues packets on their streams, a packet without a sender behind a fence
    /// ([`crate::fence`]). Never blocks.
    pub(crate) fn push(&self, packets: Vec<OutgoingPacket>) -> SendStatus {
        let mut total = 0;
        let mut woken = 0u64;
        {
            let mut routes = lock(&self.routes);
            let mut fences = lock(&self.fences);
            for packet in packets {
                let route = if packet.fixed {
                    Route { stream: FIXED_STREAM, moved_from: None }
                } else {
                    let queued = |i: usize| self.streams[i].bytes.load(Ordering::Relaxed);
                    routes.stream_for(packet.sender(), packet.class, queued)
                };
                let index = route.stream;
                if let Some(was) = route.moved_from {
                    total += self.enqueue_fence(&fences.moved(was), index);
                }
                if packet.sender().is_some() && !packet.fixed {
                    fences.routed(index);
                } else if let Some(fence) = fences.unrouted() {
                    // Never in single-stream mode: no packet has a sender there.
                    total += self.enqueue_fence(&fence, FIXED_STREAM);
                }
                total += self.enqueue(index, packet.chunks, packet.bytes);
                woken |= 1 << index;
            }
        }
        let queued = self.bytes.fetch_add(total, Ordering::SeqCst) + total;
        for (i, stream) in self.streams.iter().enumerate() {
            if woken & (1 << i) != 0 {
                stream.wake.notify_one();
            }
        }
        if queued < self.limit {
            return SendStatus::Ready;
        }
        self.want_writable.store(true, Ordering::SeqCst);
        // A writer may have drained the queues before it could see the flag.
        if self.bytes.load(Ordering::SeqCst) <= self.low_watermark && self.want_writable.swap(false, Ordering::SeqCst) {
            return SendStatus::Ready;
        }
        SendStatus::Busy
    }

    /// Appends `bytes` framed bytes to stream `index`'s queue; returns `bytes`.
    fn enqueue(&self, index: usize, chunks: impl IntoIterator<Item = Bytes>, bytes: usize) -> usize {
        // Routes never name a stream beyond `streams()`, which sized `streams`.
        let stream = &self.streams[index];
        stream.bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut queue = lock(&stream.chunks);
        chunks.into_iter().for_each(|chunk| queue.push(chunk));
        bytes
    }

    /// Queues `fence` ahead of a packet that must follow what the streams it names
    /// carried so far: its marker on each of them, the wait for it on stream `wait_on`,
    /// the packet's. Returns the bytes queued.
    fn enqueue_fence(&self, fence: &Fence, wait_on: usize) -> usize {
        let mut total = 0;
        for i in fence.streams() {
            // Stream indexes are below wire::MAX_DATA_STREAMS, which fits a u8.
            let marker = Bytes::copy_from_slice(&frame::fence_marker(i as u8, fence.seq));
            total += self.enqueue(i, [marker], frame::FENCE_LEN);
            self.streams[i].wake.notify_one();
        }
        let wait = Bytes::copy_from_slice(&frame::wait_marker(fence.seq, fence.streams));
        total + self.enqueue(wait_on, [wait], frame::WAIT_LEN)
    }

    /// Everything queued on stream `index`, for its writer.
    pub(crate) fn take(&self, index: usize) -> Vec<Bytes> {
        lock(&self.streams[index].chunks).take()
    }

    /// Wakes every writer (a graceful close: each ends its stream once its queue is out).
    pub(crate) fn wake_all(&self) {
        self.streams.iter().for_each(|stream| stream.wake.notify_one());
    }

    /// Resolves when stream `index` may have something queued.
    pub(crate) async fn queued_on(&self, index: usize) {
        self.streams[index].wake.notified().await
    }

    /// The writer of stream `index` handed `len` bytes to QUIC. True when the Erlang
    /// side is waiting for the queues to drain and they now have.
    pub(crate) fn written(&self, index: usize, len: usize) -> bool {
        self.streams[index].bytes.fetch_sub(len, Ordering::Relaxed);
        let left = self.bytes.fetch_sub(len, Ordering::SeqCst) - len;
        left <= self.low_watermark && self.want_writable.swap(false, Ordering::SeqCst)
    }

    /// Bytes queued on all streams.
    pub(crate) fn queued(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Locks a mutex, ignoring poisoning: the queues stay consistent on panic.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DataEncoder;

    /// A SEND_SENDER packet from pid number `id`, `size` payload bytes.
    fn packet(encoder: &mut DataEncoder, id: u8, size: usize) -> OutgoingPacket {
        let mut bytes = vec![112, 131, 104, 3, 97, 22, 88, 119, 3, b'a', b'@', b'b'];
        bytes.extend_from_slice(&[0, 0, 0, id, 0, 0, 0, 0, 0, 0, 0, 1]);
        bytes.extend_from_slice(&[88, 119, 3, b'c', b'@', b'd', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]);
        bytes.resize(bytes.len() + size, 0);
        let mut p = encoder.packet(bytes.len()).unwrap();
        p.copy(&bytes);
        p.finish().unwrap()
    }

    fn flat(chunks: Vec<Bytes>) -> usize {
        chunks.iter().map(Bytes::len).sum()
    }

    #[test]
    fn senders_get_their_own_streams_and_keep_them() {
        let out = DataOut::new(NonZeroU8::new(4).unwrap(), 1 << 20);
        let mut enc = DataEncoder::new(out.by_sender());
        assert_eq!(out.push(vec![packet(&mut enc, 1, 5000)]), SendStatus::Ready);
        // Sender 1's bytes sit on one stream; sender 2 is placed elsewhere.
        let busy: Vec<usize> = (0..4).filter(|&i| out.streams[i].bytes.load(Ordering::Relaxed) > 0).collect();
        assert_eq!(busy.len(), 1);
        out.push(vec![packet(&mut enc, 2, 10)]);
        assert_eq!(out.streams[busy[0]].bytes.load(Ordering::Relaxed), 5000 + 46);
        let second: Vec<usize> =
            (0..4).filter(|&i| i != busy[0] && out.streams[i].bytes.load(Ordering::Relaxed) > 0).collect();
        assert_eq!(second.len(), 1);
        // More from sender 1 stays on its stream.
        out.push(vec![packet(&mut enc, 1, 10)]);
        assert_eq!(flat(out.take(busy[0])), 5000 + 46 + 56);
        assert_eq!(flat(out.take(second[0])), 56);
    }

    #[test]
    fn fixed_packets_and_single_stream_mode_use_stream_zero() {
        let out = DataOut::new(NonZeroU8::new(1).unwrap(), 1 << 20);
        assert_eq!(out.stream_count(), 1);
        let mut enc = DataEncoder::new(out.by_sender());
        out.push(vec![packet(&mut enc, 1, 10), packet(&mut enc, 2, 10)]);
        assert_eq!(flat(out.take(0)), 112);
        let multi = DataOut::new(NonZeroU8::new(3).unwrap(), 1 << 20);
        let mut enc = DataEncoder::new(true);
        let mut raw = packet(&mut enc, 9, 1);
        raw.pin_to_fixed_stream();
        multi.push(vec![raw]);
        assert_eq!(flat(multi.take(FIXED_STREAM)), 47);
    }

    fn bytes_of(chunks: Vec<Bytes>) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// A packet whose control message names no sender: MONITOR_P_EXIT by name.
    fn unrouted(encoder: &mut DataEncoder) -> OutgoingPacket {
        let bytes = [112, 131, 104, 3, 97, 21, 119, 1, b'n'];
        let mut p = encoder.packet(bytes.len()).unwrap();
        p.copy(&bytes);
        p.finish().unwrap()
    }

    #[test]
    fn a_sender_marked_later_moves_to_the_priority_stream_behind_a_fence() {
        let out = DataOut::new(NonZeroU8::new(4).unwrap(), 1 << 20);
        let mut enc = DataEncoder::new(true);
        out.push(vec![packet(&mut enc, 1, 100)]);
        let old = (0..4).find(|&i| out.streams[i].bytes.load(Ordering::Relaxed) > 0).unwrap();
        assert_eq!(flat(out.take(old)), 146);
        let mut marked = packet(&mut enc, 1, 10);
        marked.prioritise();
        let marked_bytes = bytes_of(marked.chunks().to_vec());
        out.push(vec![marked]);
        assert_eq!(bytes_of(out.take(old)), frame::fence_marker(old as u8, 1), "the old stream is fenced");
        let mut expected = frame::wait_marker(1, 1 << old).to_vec();
        expected.extend(&marked_bytes);
        assert_eq!(bytes_of(out.take(4)), expected, "the priority stream waits, then the packet");
        // Further marked packets stay there without more markers.
        let mut next = packet(&mut enc, 1, 10);
        next.prioritise();
        let next_bytes = bytes_of(next.chunks().to_vec());
        out.push(vec![next]);
        assert_eq!(bytes_of(out.take(4)), next_bytes);
    }

    #[test]
    fn a_packet_without_a_sender_is_fenced_from_the_streams_used_before_it() {
        let out = DataOut::new(NonZeroU8::new(4).unwrap(), 1 << 20);
        let mut enc = DataEncoder::new(true);
        // Three new senders: the first goes on the fixed stream, the others elsewhere.
        out.push(vec![packet(&mut enc, 1, 100), packet(&mut enc, 2, 100), packet(&mut enc, 3, 100)]);
        let used: Vec<usize> = (1..4).filter(|&i| out.streams[i].bytes.load(Ordering::Relaxed) > 0).collect();
        assert_eq!(used.len(), 2, "two senders on streams besides the fixed one");
        assert_eq!(flat(out.take(FIXED_STREAM)), 146);
        let before: Vec<Vec<u8>> = used.iter().map(|&i| bytes_of(out.take(i))).collect();
        let down = unrouted(&mut enc);
        let down_bytes = bytes_of(down.chunks().to_vec());
        out.push(vec![down]);
        // Each used stream got fence 1 naming itself, after what it had.
        for (&i, old) in used.iter().zip(&before) {
            assert_eq!(bytes_of(out.take(i)), frame::fence_marker(i as u8, 1), "stream {i} after {} bytes", old.len());
        }
        let mut expected = frame::wait_marker(1, used.iter().map(|&i| 1u64 << i).sum()).to_vec();
        expected.extend(&down_bytes);
        assert_eq!(bytes_of(out.take(FIXED_STREAM)), expected);
        // The bytes count against the queue limit like packets, and drain like them.
        assert_eq!(out.queued(), 2 * frame::FENCE_LEN + frame::WAIT_LEN + down_bytes.len() + 3 * 146);
        // Nothing sent elsewhere since: the next one needs no fence.
        let again = unrouted(&mut enc);
        out.push(vec![again]);
        assert_eq!(bytes_of(out.take(FIXED_STREAM)), down_bytes);
        // A raw packet pinned to the fixed stream is fenced too, whatever sender it names.
        out.push(vec![packet(&mut enc, 2, 10)]);
        let mut raw = packet(&mut enc, 2, 10);
        raw.pin_to_fixed_stream();
        out.push(vec![raw]);
        let two =
            (1..4).find(|&i| flat(out.take(i)) == 56 + frame::FENCE_LEN).expect("a fence after sender 2's packet");
        assert_eq!(bytes_of(out.take(FIXED_STREAM))[..frame::WAIT_LEN], frame::wait_marker(2, 1 << two));
        // Single-stream mode never fences.
        let single = DataOut::new(NonZeroU8::MIN, 1 << 20);
        let mut enc = DataEncoder::new(false);
        single.push(vec![packet(&mut enc, 1, 10), unrouted(&mut enc)]);
        assert_eq!(flat(single.take(0)), 56 + down_bytes.len());
    }

    #[test]
    fn small_packets_reach_the_writer_as_one_chunk_large_ones_as_they_are() {
        let out = DataOut::new(NonZeroU8::new(1).unwrap(), 1 << 30);
        let mut enc = DataEncoder::new(false);
        out.push((0..100).map(|i| packet(&mut enc, i, 10)).collect());
        let chunks = out.take(0);
        assert_eq!(chunks.len(), 1);
        assert_eq!(flat(chunks), 100 * 56);
        let big = Bytes::from(vec![9u8; 10_000]);
        let before = packet(&mut enc, 1, 10);
        let mut p = enc.packet(big.len()).unwrap();
        p.borrow(big.clone());
        let large = p.finish().unwrap();
        out.push(vec![before, large, packet(&mut enc, 2, 10)]);
        let chunks = out.take(0);
        // The small packet before, the big one's header, then the big piece itself
        // (shared, not copied), then the small packet after.
        assert!(chunks.iter().any(|c| c.as_ptr() == big.as_ptr()));
        assert_eq!(flat(chunks), 56 + 4 + 10_000 + 56);
    }

    #[test]
    fn busy_past_the_limit_and_writable_at_the_low_watermark() {
        let out = DataOut::new(NonZeroU8::new(2).unwrap(), 10_000);
        let mut enc = DataEncoder::new(true);
        assert_eq!(out.push(vec![packet(&mut enc, 1, 6000)]), SendStatus::Ready);
        assert_eq!(out.push(vec![packet(&mut enc, 1, 6000)]), SendStatus::Busy);
        let stream = (0..2).find(|&i| out.streams[i].bytes.load(Ordering::Relaxed) > 0).unwrap();
        let taken = flat(out.take(stream));
        assert!(!out.written(stream, 2000), "still above the low watermark");
        assert!(out.written(stream, taken - 2000), "drained: the controller is told once");
        assert_eq!(out.queued(), 0);
        assert!(!out.written(stream, 0));
    }
}
