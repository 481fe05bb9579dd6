//! The server's Prometheus metrics (`GET /metrics`, text format 0.0.4): requests by outcome,
//! prompt and generated tokens, queue depth, running sequences, time to first token and
//! inter-token latency histograms, prefix-cache hits. Observed on the engine's events, so a
//! streamed and a whole answer count alike.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use yoco::{EngineStats, Event, StopReason};

/// Upper bounds (seconds) of the latency buckets.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A latency histogram: counts per bucket (not cumulative), the sum and the count.
#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    over: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, seconds: f64) {
        match BUCKETS.iter().position(|&b| seconds <= b) {
            Some(i) => self.counts[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.over.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// What the server has counted since it started.
#[derive(Default)]
pub struct Metrics {
    /// Requests by outcome: finished, cancelled, failed, invalid (400), rejected (429/503).
    outcomes: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    ttft: Histogram,
    itl: Histogram,
}

/// One request's clock, kept by its event callback.
pub struct RequestClock {
    submitted: Instant,
    last_token: Option<Instant>,
}

impl RequestClock {
    /// A clock started now, at submission.
    pub fn start() -> Self {
        RequestClock {
            submitted: Instant::now(),
            last_token: None,
        }
    }
}

impl Metrics {
    /// Counts a request that ended with `outcome` without reaching the engine.
    pub fn count(&self, outcome: &'static str) {
        if let Ok(mut o) = self.outcomes.lock() {
            *o.entry(outcome).or_default() += 1;
        }
    }

    /// Observes one of a request's events.
    pub fn observe(&self, event: &Event, clock: &mut RequestClock) {
        match event {
            Event::Token(_) => {
                let now = Instant::now();
                match clock.last_token {
                    None => self.ttft.observe((now - clock.submitted).as_secs_f64()),
                    Some(last) => self.itl.observe((now - last).as_secs_f64()),
                }
                clock.last_token = Some(now);
            }
            Event::Finished { generation, .. } => {
                self.prompt_tokens
                    .fetch_add(generation.prompt_tokens as u64, Ordering::Relaxed);
                self.generated_tokens
                    .fetch_add(generation.tokens.len() as u64, Ordering::Relaxed);
                self.count(match generation.stop_reason {
                    StopReason::Cancelled | StopReason::Callback => "cancelled",
                    _ => "finished",
                });
            }
            Event::Failed(_) => self.count("failed"),
            Event::Prefill { .. } => {}
        }
    }

    /// The text format, with the engine's gauges from `stats`.
    pub fn render(&self, stats: &EngineStats) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP yoco_requests_total Requests by outcome.\n# TYPE yoco_requests_total counter"
        );
        if let Ok(o) = self.outcomes.lock() {
            for outcome in ["finished", "cancelled", "failed", "invalid", "rejected"] {
                let n = o.get(outcome).copied().unwrap_or(0);
                let _ = writeln!(out, "yoco_requests_total{{outcome=\"{outcome}\"}} {n}");
            }
        }
        let counters = [
            (
                "yoco_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "yoco_generation_tokens_total",
                "Tokens generated.",
                self.generated_tokens.load(Ordering::Relaxed),
            ),
            (
                "yoco_prefix_cache_hits_total",
                "Prompts started from a kept prefix.",
                stats.prefix_hits,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges = [
            (
                "yoco_queue_depth",
                "Requests waiting for a place.",
                stats.queued as u64,
            ),
            (
                "yoco_running_sequences",
                "Sequences prefilling or decoding.",
                stats.running() as u64,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        self.ttft.render(
            &mut out,
            "yoco_time_to_first_token_seconds",
            "From submission to the first token.",
        );
        self.itl.render(
            &mut out,
            "yoco_inter_token_latency_seconds",
            "Between two tokens of a sequence.",
        );
        out
    }
}
