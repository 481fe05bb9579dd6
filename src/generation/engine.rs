//! Serving many sequences: a queue of requests and one thread that decodes every active
//! sequence as one batch, admitting and retiring sequences between steps (continuous batching).
//!
//! Each turn of the engine's loop does at most two things: one chunk of one waiting prompt's
//! prefill (first come, first served), then one decode step of every sequence that has its
//! prompt in. So a long prompt delays the others by one chunk per token, never by its whole
//! prefill, and a sequence whose prompt is in joins the batch at the next step. A sequence that
//! ends (or is cancelled) leaves the batch at once and its state is freed.
//!
//! A sequence runs exactly the rows and the batch step of [`Model::generate_batch`], so its
//! tokens are the ones [`Model::generate`] gives for the same prompt and settings (same seed),
//! whatever else runs beside it.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::batch::DecodeBatch;
use super::prefix::PrefixCache;
use super::row::{Prefill, Row};
use super::tokenizer::Tokenizer;
use super::{Generation, GenerationConfig, StopReason, Token};
use crate::model::Model;
use crate::{Error, Result};

/// Limits of an [`Engine`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Sequences running at once (prefilling or decoding); the decode batch is at most this
    /// large. Default 16.
    pub max_sequences: usize,
    /// Requests waiting for a place; beyond it [`Engine::submit`] fails with [`Error::Busy`].
    /// Default 64.
    pub max_queue: usize,
    /// Memory for kept prefix states ([`Request::keep_prefix`] and every finished prompt):
    /// least recently used ones are evicted beyond it; 0 turns prefix reuse off.
    /// Default 256 MiB.
    pub prefix_cache_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_sequences: 16,
            max_queue: 64,
            prefix_cache_bytes: 256 << 20,
        }
    }
}

/// One sequence to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The prompt's token ids (at least one).
    pub prompt: Vec<u32>,
    /// Its settings: sampling, seed, stops, logprobs, prefill chunk.
    pub config: GenerationConfig,
    /// Keep the state after the first `n` prompt tokens (a system prompt shared by many
    /// requests): later prompts that start with them start from it. The state after a whole
    /// prompt is kept anyway (a later turn of the conversation starts with it).
    pub keep_prefix: Option<usize>,
}

impl Request {
    /// A request for `prompt` with `config`.
    pub fn new(prompt: Vec<u32>, config: GenerationConfig) -> Self {
        Request {
            prompt,
            config,
            keep_prefix: None,
        }
    }
}

/// What happens to a sequence, in order: [`Event::Prefill`] after each chunk of its prompt,
/// [`Event::Token`] per token, and last either [`Event::Finished`] or [`Event::Failed`].
#[derive(Debug)]
pub enum Event {
    /// `done` of the prompt's `total` tokens are in (a reused prefix counts as done).
    Prefill {
        /// Prompt tokens in the cache.
        done: usize,
        /// Prompt tokens.
        total: usize,
    },
    /// A new token (and the text it releases).
    Token(Token),
    /// The sequence has ended.
    Finished {
        /// Text held back until the end (released now): it follows the tokens' text.
        tail: String,
        /// The whole result.
        generation: Generation,
    },
    /// The sequence could not go on.
    Failed(Error),
}

/// A snapshot of an engine's load and counters, as of the end of its last turn (a sequence's
/// last event can arrive a moment before the counts that include it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests waiting for a place.
    pub queued: usize,
    /// Sequences whose prompt is being prefilled.
    pub prefilling: usize,
    /// Sequences in the decode batch.
    pub decoding: usize,
    /// Decode steps run (one per batch step, whatever its size).
    pub steps: u64,
    /// Prefill chunks run.
    pub prefill_chunks: u64,
    /// Sequences that started from a kept prefix.
    pub prefix_hits: u64,
    /// Prefix states kept, and their bytes.
    pub prefix_entries: usize,
    /// Bytes of the kept prefix states.
    pub prefix_bytes: usize,
    /// Bytes allocated for the decode batch's state.
    pub batch_bytes: usize,
    /// Sequences ended (finished, cancelled or failed).
    pub ended: u64,
}

impl EngineStats {
    /// Sequences holding state: prefilling or decoding.
    pub fn running(&self) -> usize {
        self.prefilling + self.decoding
    }
}

type Callback = Box<dyn FnMut(Event) -> ControlFlow<()> + Send>;

/// Where a sequence's events go.
enum Sink {
    Channel(mpsc::Sender<Event>),
    Callback(Callback),
}

impl Sink {
    /// Delivers an event; `Break` when nobody listens any more.
    fn send(&mut self, event: Event) -> ControlFlow<()> {
        match self {
            Sink::Channel(tx) => match tx.send(event) {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            },
            Sink::Callback(f) => f(event),
        }
    }
}

struct Queued {
    id: u64,
    request: Request,
    sink: Sink,
    cancel: Arc<AtomicBool>,
}

struct QueueState {
    waiting: VecDeque<Queued>,
    next_id: u64,
    shutdown: bool,
    /// Some sequence was cancelled since the worker last looked.
    cancelled: bool,
}

struct Shared {
    queue: Mutex<QueueState>,
    wake: Condvar,
    stats: Mutex<EngineStats>,
}

/// A lock that a panic elsewhere cannot make unusable (the data are plain counters and
/// queues, valid after any partial update).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Continuous batching on a thread of its own.
///
/// ```
/// use std::sync::Arc;
/// use candle_core::{DType, Device};
/// use yoco::{Engine, EngineConfig, Event, GenerationConfig, Model, Request, Tokenizer};
///
/// # fn main() -> yoco::Result<()> {
/// let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare");
/// let model = Arc::new(Model::load(dir, &Device::Cpu, DType::F32)?);
/// let tokenizer = Arc::new(Tokenizer::from_model_dir(dir)?);
/// let engine = Engine::new(model, Some(tokenizer.clone()), EngineConfig::default())?;
///
/// let cfg = GenerationConfig {
///     max_new_tokens: 24,
///     stop_strings: vec!["\n\n".into()],
///     ..GenerationConfig::default()
/// }
/// .for_tokenizer(&tokenizer);
/// // Several sequences at once; each handle is an iterator over its own events.
/// let handles = ["ROMEO.\n", "JULIET.\n"]
///     .iter()
///     .map(|p| engine.submit(Request::new(tokenizer.encode(p, true)?, cfg.clone())))
///     .collect::<yoco::Result<Vec<_>>>()?;
/// for handle in handles {
///     for event in handle {
///         match event {
///             Event::Token(t) => print!("{}", t.text),
///             Event::Finished { tail, generation } => {
///                 println!("{tail}\n[{} tokens, {:?}]", generation.tokens.len(), generation.stop_reason);
///             }
///             Event::Failed(e) => return Err(e),
///             Event::Prefill { .. } => {}
///         }
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Engine {
    shared: Arc<Shared>,
    model: Arc<Model>,
    tokenizer: Option<Arc<Tokenizer>>,
    config: EngineConfig,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Cancels one sequence; cheap to clone and to send to another thread.
#[derive(Clone)]
pub struct Canceller {
    flag: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("cancelled", &self.flag.load(Ordering::Relaxed))
            .finish()
    }
}

impl Canceller {
    /// Ends the sequence as soon as the engine sees it (before its next chunk or step): it
    /// leaves the queue or the batch, its state is freed, and it finishes with
    /// [`StopReason::Cancelled`]. Nothing happens to a sequence that has already ended.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let mut q = lock(&self.shared.queue);
        q.cancelled = true;
        self.shared.wake.notify_all();
    }
}

/// The receiving end of one sequence: an iterator over its [`Event`]s (blocking), ending after
/// the last. Dropping it before the end cancels the sequence.
#[derive(Debug)]
pub struct SequenceHandle {
    events: mpsc::Receiver<Event>,
    canceller: Canceller,
    ended: bool,
}

impl SequenceHandle {
    /// The next event, waiting for it; `None` after the last one.
    pub fn recv(&mut self) -> Option<Event> {
        if self.ended {
            return None;
        }
        let event = self.events.recv().ok();
        self.note(&event);
        event
    }

    /// The next event if one comes within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Event> {
        if self.ended {
            return None;
        }
        let event = self.events.recv_timeout(timeout).ok();
        self.note(&event);
        event
    }

    fn note(&mut self, event: &Option<Event>) {
        if matches!(
            event,
            None | Some(Event::Finished { .. }) | Some(Event::Failed(_))
        ) {
            self.ended = true;
        }
    }

    /// Cancels the sequence (see [`Canceller::cancel`]); its events still arrive, the last one
    /// [`Event::Finished`] with [`StopReason::Cancelled`].
    pub fn cancel(&self) {
        self.canceller.cancel();
    }

    /// A handle that cancels this sequence from elsewhere.
    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    /// Waits for the end and returns the result (the events in between are dropped).
    pub fn wait(mut self) -> Result<Generation> {
        while let Some(event) = self.recv() {
            match event {
                Event::Finished { generation, .. } => return Ok(generation),
                Event::Failed(e) => return Err(e),
                Event::Prefill { .. } | Event::Token(_) => {}
            }
        }
        Err(Error::Engine(
            "the engine stopped before the sequence ended".into(),
        ))
    }
}

impl Iterator for SequenceHandle {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.recv()
    }
}

impl Drop for SequenceHandle {
    fn drop(&mut self) {
        if !self.ended {
            self.canceller.cancel();
        }
    }
}

impl Engine {
    /// Starts an engine on its own thread. `tokenizer` gives every sequence its text (and is
    /// needed for stop strings).
    pub fn new(
        model: Arc<Model>,
        tokenizer: Option<Arc<Tokenizer>>,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.max_sequences == 0 || config.max_queue == 0 {
            return Err(Error::Generation(
                "an engine needs max_sequences and max_queue of at least 1".into(),
            ));
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(QueueState {
                waiting: VecDeque::new(),
                next_id: 0,
                shutdown: false,
                cancelled: false,
            }),
            wake: Condvar::new(),
            stats: Mutex::new(EngineStats::default()),
        });
        let worker = Worker {
            model: model.clone(),
            tokenizer: tokenizer.clone(),
            max_sequences: config.max_sequences,
            prefilling: VecDeque::new(),
            ready: Vec::new(),
            batch: DecodeBatch::new(false),
            prefix: PrefixCache::new(config.prefix_cache_bytes),
            sinks: HashMap::new(),
            counters: EngineStats::default(),
        };
        let thread = std::thread::Builder::new()
            .name("yoco-engine".into())
            .spawn({
                let shared = shared.clone();
                move || worker.run(&shared)
            })
            .map_err(|e| Error::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            shared,
            model,
            tokenizer,
            config,
            thread: Some(thread),
        })
    }

    /// The model it runs.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Its tokenizer, if it has one.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// Its limits.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request; its events arrive on the returned handle. Fails at once, with nothing
    /// queued, on a bad request ([`Error::Input`], [`Error::Generation`]), a full queue
    /// ([`Error::Busy`]) or a stopped engine ([`Error::Engine`]).
    pub fn submit(&self, request: Request) -> Result<SequenceHandle> {
        let (tx, rx) = mpsc::channel();
        let canceller = self.enqueue(request, Sink::Channel(tx))?;
        Ok(SequenceHandle {
            events: rx,
            canceller,
            ended: false,
        })
    }

    /// Queues a request whose events go to `on_event`, called on the engine's thread (it must
    /// not block: the whole batch waits for it). `Break` ends the sequence.
    pub fn submit_with(
        &self,
        request: Request,
        on_event: impl FnMut(Event) -> ControlFlow<()> + Send + 'static,
    ) -> Result<Canceller> {
        self.enqueue(request, Sink::Callback(Box::new(on_event)))
    }

    /// Submits and waits for the result.
    pub fn generate(&self, request: Request) -> Result<Generation> {
        self.submit(request)?.wait()
    }

    /// The queue, the batch and the counters now.
    pub fn stats(&self) -> EngineStats {
        let queued = lock(&self.shared.queue).waiting.len();
        EngineStats {
            queued,
            ..lock(&self.shared.stats).clone()
        }
    }

    /// Everything a request is checked for before it is queued.
    fn check(&self, r: &Request) -> Result<()> {
        r.config.validate_for(self.tokenizer.as_deref())?;
        if r.prompt.is_empty() {
            return Err(Error::Input("empty prompt: give at least one token".into()));
        }
        let cfg = self.model.config();
        if let Some(&bad) = r.prompt.iter().find(|&&t| t as usize >= cfg.vocab_size()) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                cfg.vocab_size()
            )));
        }
        let end = r.prompt.len().saturating_add(r.config.max_new_tokens);
        if end > cfg.max_positions() {
            return Err(Error::Input(format!(
                "prompt ({} tokens) plus max_new_tokens ({}) exceeds the position limit {}",
                r.prompt.len(),
                r.config.max_new_tokens,
                cfg.max_positions()
            )));
        }
        if let Some(n) = r.keep_prefix {
            if n == 0 || n > r.prompt.len() {
                return Err(Error::Input(format!(
                    "keep_prefix {n} must be in 1..={} (the prompt's length)",
                    r.prompt.len()
                )));
            }
        }
        Ok(())
    }

    fn enqueue(&self, request: Request, sink: Sink) -> Result<Canceller> {
        self.check(&request)?;
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            return Err(Error::Engine("the engine has stopped".into()));
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let mut q = lock(&self.shared.queue);
        if q.shutdown {
            return Err(Error::Engine("the engine has stopped".into()));
        }
        if q.waiting.len() >= self.config.max_queue {
            return Err(Error::Busy(format!(
                "{} requests are already waiting (max_queue)",
                q.waiting.len()
            )));
        }
        let id = q.next_id;
        q.next_id += 1;
        q.waiting.push_back(Queued {
            id,
            request,
            sink,
            cancel: cancel.clone(),
        });
        self.shared.wake.notify_all();
        Ok(Canceller {
            flag: cancel,
            shared: self.shared.clone(),
        })
    }
}

impl Drop for Engine {
    /// Stops the thread; sequences still queued or running end with
    /// [`StopReason::Cancelled`].
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A sequence waiting for its prompt to be prefilled, first come first served.
struct Prefilling {
    id: u64,
    row: Row,
    stage: Stage,
}

/// Where a waiting prompt stands.
enum Stage {
    /// Not begun: its kept prefix is looked up only when its turn comes, so that it can start
    /// from the prefixes of the prompts prefilled before it (a system prompt that arrived with
    /// it in another request).
    Waiting {
        prompt: Vec<u32>,
        chunk: usize,
        keep_prefix: Option<usize>,
        /// Positions to reserve: the prompt and every token it may generate.
        reserve: usize,
    },
    Running(Prefill),
}

/// Where a running sequence's events go, and its cancel flag.
struct Listener {
    sink: Sink,
    cancel: Arc<AtomicBool>,
}

/// The engine's thread: everything it owns.
struct Worker {
    model: Arc<Model>,
    tokenizer: Option<Arc<Tokenizer>>,
    max_sequences: usize,
    prefilling: VecDeque<Prefilling>,
    /// Prompts that are in, joining the batch at the next step.
    ready: Vec<(u64, Row, crate::Cache)>,
    batch: DecodeBatch,
    prefix: PrefixCache,
    sinks: HashMap<u64, Listener>,
    counters: EngineStats,
}

impl Worker {
    fn running(&self) -> usize {
        self.prefilling.len() + self.ready.len() + self.batch.len()
    }

    fn run(mut self, shared: &Shared) {
        loop {
            let mut incoming = Vec::new();
            let mut cancelled = false;
            {
                let mut q = lock(&shared.queue);
                loop {
                    if q.shutdown {
                        let waiting: Vec<Queued> = q.waiting.drain(..).collect();
                        drop(q);
                        self.shutdown(waiting);
                        self.publish(shared);
                        return;
                    }
                    if q.cancelled {
                        q.cancelled = false;
                        cancelled = true;
                        // Cancelled requests still waiting leave the queue now.
                        let (gone, keep): (Vec<Queued>, Vec<Queued>) = q
                            .waiting
                            .drain(..)
                            .partition(|r| r.cancel.load(Ordering::SeqCst));
                        q.waiting = keep.into();
                        incoming.extend(gone);
                    }
                    let room = self.max_sequences.saturating_sub(self.running());
                    let n = room.min(q.waiting.len());
                    incoming.extend(q.waiting.drain(..n));
                    if !incoming.is_empty() {
                        // Taken out of the queue, not yet published as running: count them as
                        // running now, under the queue's lock, so that no snapshot ever misses
                        // a request that is in the worker's hands.
                        lock(&shared.stats).prefilling += incoming.len();
                    }
                    if !incoming.is_empty() || cancelled || self.running() > 0 {
                        break;
                    }
                    q = shared
                        .wake
                        .wait(q)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            }
            for request in incoming {
                self.start(request);
            }
            self.tick();
            self.publish(shared);
        }
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// Takes a request in: from a kept prefix when there is one, else from an empty cache.
    fn start(&mut self, q: Queued) {
        let Queued {
            id,
            request,
            mut sink,
            cancel,
        } = q;
        let Request {
            prompt,
            config,
            keep_prefix,
        } = request;
        let mut row = match Row::new(&config, &prompt, self.tokenizer.is_some()) {
            Ok(row) => row,
            Err(e) => {
                self.counters.ended += 1;
                let _ = sink.send(Event::Failed(e));
                return;
            }
        };
        if cancel.load(Ordering::SeqCst) {
            self.counters.ended += 1;
            row.out.stop_reason = StopReason::Cancelled;
            let _ = sink.send(Event::Finished {
                tail: String::new(),
                generation: row.out,
            });
            return;
        }
        self.sinks.insert(id, Listener { sink, cancel });
        let reserve = prompt.len() + config.max_new_tokens;
        self.prefilling.push_back(Prefilling {
            id,
            row,
            stage: Stage::Waiting {
                prompt,
                chunk: config.prefill_chunk,
                keep_prefix,
                reserve,
            },
        });
    }

    /// A prompt's turn has come: its state from the longest kept prefix (or empty), with room
    /// reserved. Gives the entry back, now running, or `None` when the whole prompt was kept
    /// (the sequence has moved to `ready`).
    fn begin(&mut self, p: Prefilling) -> Result<Option<Prefilling>> {
        let Prefilling { id, mut row, stage } = p;
        let Stage::Waiting {
            prompt,
            chunk,
            keep_prefix,
            reserve,
        } = stage
        else {
            return Ok(Some(Prefilling { id, row, stage }));
        };
        let total = prompt.len();
        let (done, mut cache, logits) = match self.prefix.lookup(&prompt) {
            Some(h) => (h.len, h.cache, h.logits),
            None => (0, self.model.new_cache(1)?, None),
        };
        cache.reserve(reserve)?;
        row.out.cached_tokens = done;
        if done > 0 {
            self.counters.prefix_hits += 1;
            if let Some(l) = self.sinks.get_mut(&id) {
                if l.sink.send(Event::Prefill { done, total }).is_break() {
                    l.cancel.store(true, Ordering::SeqCst);
                }
            }
        }
        Ok(match logits {
            Some(logits) => {
                row.start(logits, Duration::ZERO);
                self.ready.push((id, row, cache));
                None
            }
            None => Some(Prefilling {
                id,
                row,
                stage: Stage::Running(Prefill::new(prompt, done, cache, chunk, keep_prefix)),
            }),
        })
    }

    /// One turn: cancellations, one prefill chunk, admissions, one decode step.
    fn tick(&mut self) {
        self.drop_cancelled();
        self.prefill_one_chunk();
        let joining = std::mem::take(&mut self.ready);
        let ids: Vec<u64> = joining.iter().map(|(id, _, _)| *id).collect();
        if let Err(e) = self.batch.admit(joining) {
            for id in ids {
                self.fail(id, Error::Generation(format!("cannot join the batch: {e}")));
            }
        }
        if !self.batch.is_empty() {
            let Worker {
                batch,
                model,
                tokenizer,
                sinks,
                ..
            } = self;
            let result = batch.step(model, tokenizer.as_deref(), |id, token| {
                match sinks.get_mut(&id) {
                    Some(l) => l.sink.send(Event::Token(token.clone())),
                    None => ControlFlow::Break(()),
                }
            });
            self.counters.steps += 1;
            if let Err(e) = result {
                self.batch.fail_all(&e);
            }
        }
        self.deliver_finished();
    }

    /// Sequences whose cancel flag is set leave the prefill queue or the batch now.
    fn drop_cancelled(&mut self) {
        let flagged: Vec<u64> = self
            .sinks
            .iter()
            .filter(|(_, l)| l.cancel.load(Ordering::SeqCst))
            .map(|(id, _)| *id)
            .collect();
        if flagged.is_empty() {
            return;
        }
        let (gone, keep): (Vec<Prefilling>, Vec<Prefilling>) = self
            .prefilling
            .drain(..)
            .partition(|p| flagged.contains(&p.id));
        self.prefilling = keep.into();
        let ready = std::mem::take(&mut self.ready);
        let (ready_gone, ready_keep): (Vec<_>, Vec<_>) = ready
            .into_iter()
            .partition(|(id, _, _)| flagged.contains(id));
        self.ready = ready_keep;
        let rows = gone
            .into_iter()
            .map(|p| (p.id, p.row))
            .chain(ready_gone.into_iter().map(|(id, row, _)| (id, row)));
        for (id, mut row) in rows.collect::<Vec<_>>() {
            row.out.stop_reason = StopReason::Cancelled;
            let tail = row.finish(self.tokenizer()).unwrap_or_default();
            self.end(
                id,
                Event::Finished {
                    tail,
                    generation: row.out,
                },
            );
        }
        let in_batch: Vec<u64> = self.batch.ids().filter(|id| flagged.contains(id)).collect();
        if !in_batch.is_empty() {
            let tokenizer = self.tokenizer.clone();
            if let Err(e) =
                self.batch
                    .remove(&in_batch, StopReason::Cancelled, tokenizer.as_deref())
            {
                self.batch.fail_all(&e);
            }
        }
        self.deliver_finished();
    }

    /// The next chunk of the first prompt waiting (after looking up its prefix, if it has just
    /// come to the front); a prompt that is in moves to `ready`.
    fn prefill_one_chunk(&mut self) {
        let Some(p) = self.prefilling.pop_front() else {
            return;
        };
        let id = p.id;
        let mut p = match self.begin(p) {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => return self.fail(id, e),
        };
        let Stage::Running(prefill) = &mut p.stage else {
            return self.fail(p.id, Error::Engine("a prompt that never began".into()));
        };
        let result = prefill.advance(&self.model);
        self.counters.prefill_chunks += 1;
        let logits = match result {
            Ok(logits) => logits,
            Err(e) => return self.fail(p.id, e),
        };
        let (done, total) = prefill.progress();
        if prefill.at_boundary() {
            let prefix = prefill.ids().get(..done).unwrap_or_default();
            // A prefix that cannot be kept is only a missed speed-up.
            let _ = self.prefix.insert(prefix, &prefill.cache, None);
        }
        if let Some(l) = self.sinks.get_mut(&p.id) {
            if l.sink.send(Event::Prefill { done, total }).is_break() {
                l.cancel.store(true, Ordering::SeqCst);
            }
        }
        let Some(logits) = logits else {
            self.prefilling.push_front(p);
            return;
        };
        let Prefilling { id, mut row, stage } = p;
        if let Stage::Running(prefill) = stage {
            let _ = self
                .prefix
                .insert(prefill.ids(), &prefill.cache, Some(&logits));
            row.start(logits, prefill.elapsed());
            self.ready.push((id, row, prefill.cache));
        }
    }

    /// Sends the batch's finished rows their last event.
    fn deliver_finished(&mut self) {
        for done in self.batch.take_finished() {
            let event = match done.error {
                Some(e) => Event::Failed(e),
                None => Event::Finished {
                    tail: done.tail,
                    generation: done.row.out,
                },
            };
            self.end(done.id, event);
        }
    }

    fn fail(&mut self, id: u64, error: Error) {
        self.end(id, Event::Failed(error));
    }

    /// Sends a sequence's last event and forgets it.
    fn end(&mut self, id: u64, event: Event) {
        self.counters.ended += 1;
        if let Some(mut l) = self.sinks.remove(&id) {
            let _ = l.sink.send(event);
        }
    }

    /// Every sequence ends, cancelled.
    fn shutdown(&mut self, waiting: Vec<Queued>) {
        for q in waiting {
            q.cancel.store(true, Ordering::SeqCst);
            self.start(q);
        }
        for l in self.sinks.values() {
            l.cancel.store(true, Ordering::SeqCst);
        }
        self.drop_cancelled();
    }

    fn publish(&self, shared: &Shared) {
        let mut s = lock(&shared.stats);
        *s = EngineStats {
            queued: 0,
            prefilling: self.prefilling.len() + self.ready.len(),
            decoding: self.batch.len(),
            prefix_entries: self.prefix.len(),
            prefix_bytes: self.prefix.bytes(),
            batch_bytes: self.batch.cache_bytes(),
            ..self.counters.clone()
        };
    }
}
