//! The per-stream supervisor: builds the pipeline, watches its bus and its frame
//! arrivals, and rebuilds it after an error, an end of stream (live sources) or a
//! stall, with exponential backoff and jitter. It runs on its own thread, so a stream
//! that misbehaves never holds up another.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::ingest::handoff::Handoff;
use crate::ingest::pipeline::{self, PipelineSpec};
use crate::state::{Phase, StreamState};

/// Backoff between rebuilds: doubles from `initial` to `max`, with ±20% jitter, and
/// starts over once a pipeline has delivered frames for `healthy_after`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A backoff from `initial` up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next attempt (with jitter); doubles the base.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * fastrand::f64())
    }

    /// Starts over from `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Why a pipeline run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Shutdown was requested.
    Shutdown,
    /// A finite source reached its end.
    Finished,
    /// Rebuild: error message, "eos" or "stall".
    Restart(String),
}

/// Supervisor settings for one stream.
#[derive(Clone)]
pub struct Supervision {
    /// Pipeline description.
    pub spec: PipelineSpec,
    /// No frame for this long => rebuild.
    pub stall_timeout: Duration,
    /// Backoff bounds.
    pub backoff: Backoff,
    /// Where frames go.
    pub handoff: Handoff,
    /// Rebuild the pipeline when a source that is not live reaches its end.
    pub restart_on_eos: bool,
}

/// Runs one stream until shutdown (or until a finite source ends).
pub fn supervise(state: Arc<StreamState>, mut sup: Supervision, shutdown: CancellationToken) {
    let healthy_after = Duration::from_secs(30);
    loop {
        state.set_phase(Phase::Starting, None);
        let started = Instant::now();
        let end = run_once(&state, &sup, &shutdown);
        state.finish_segments();
        match end {
            RunEnd::Shutdown => {
                state.set_phase(Phase::Stopped, None);
                return;
            }
            RunEnd::Finished => {
                tracing::info!(stream = %state.id, "Source ended");
                state.set_phase(Phase::Finished, None);
                return;
            }
            RunEnd::Restart(reason) => {
                // Errors may quote the source, credentials and all.
                let reason = crate::redact::redact(&reason);
                if state.had_frame_since(started) && started.elapsed() >= healthy_after {
                    sup.backoff.reset();
                }
                let delay = sup.backoff.next_delay();
                tracing::warn!(stream = %state.id, %reason, delay_ms = delay.as_millis() as u64, "Restarting pipeline");
                state.set_phase(Phase::Backoff, Some(reason));
                state.count_restart();
                if sleep_unless_cancelled(delay, &shutdown) {
                    state.set_phase(Phase::Stopped, None);
                    return;
                }
            }
        }
    }
}

/// Sleeps for `d`; returns true if shutdown came first.
fn sleep_unless_cancelled(d: Duration, shutdown: &CancellationToken) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if shutdown.is_cancelled() {
            return true;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    shutdown.is_cancelled()
}

fn run_once(state: &Arc<StreamState>, sup: &Supervision, shutdown: &CancellationToken) -> RunEnd {
    let deliver = {
        let state = state.clone();
        let handoff = sup.handoff.clone();
        let realtime = sup.spec.realtime;
        move |mut frame: crate::frame::Frame| {
            frame.stream = state.index;
            state.on_arrival(&frame);
            if realtime {
                handoff.offer(frame)
            } else {
                handoff.send(frame)
            }
        }
    };
    let native = state.keeps_incidents().then(|| {
        let state = state.clone();
        Arc::new(move |f| state.on_native(f)) as crate::incidents::NativeSink
    });
    let pipeline = match pipeline::build_with_native(&state.id, &sup.spec, deliver, native) {
        Ok(p) => p,
        Err(e) => return RunEnd::Restart(e.to_string()),
    };
    let end = watch(state, &pipeline, sup, shutdown);
    let _ = pipeline.set_state(gst::State::Null);
    end
}

fn watch(
    state: &StreamState,
    pipeline: &gst::Pipeline,
    sup: &Supervision,
    shutdown: &CancellationToken,
) -> RunEnd {
    let live = match pipeline.set_state(gst::State::Paused) {
        Ok(gst::StateChangeSuccess::NoPreroll) => true,
        Ok(_) => false,
        Err(_) => return RunEnd::Restart(first_error(pipeline)),
    };
    if live && sup.spec.realtime {
        pipeline::configure_live(pipeline);
    }
    if pipeline.set_state(gst::State::Playing).is_err() {
        return RunEnd::Restart(first_error(pipeline));
    }
    // Live sources always restart at their end; others as `on_eos` says.
    let finite = !live && !sup.restart_on_eos;
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let started = Instant::now();
    let mut playing = false;
    loop {
        if shutdown.is_cancelled() {
            return RunEnd::Shutdown;
        }
        if let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
            match msg.view() {
                gst::MessageView::Error(e) => {
                    let src = e
                        .src()
                        .map(|s| s.path_string().to_string())
                        .unwrap_or_default();
                    return RunEnd::Restart(format!("{src}: {}", e.error()));
                }
                gst::MessageView::Eos(_) if finite => return RunEnd::Finished,
                gst::MessageView::Eos(_) => return RunEnd::Restart("end of stream".into()),
                _ => {}
            }
        }
        if !playing && state.had_frame_since(started) {
            playing = true;
            state.set_phase(Phase::Playing, None);
        }
        if state.idle_for(started) > sup.stall_timeout {
            return RunEnd::Restart(format!(
                "stall: no frame for {} ms",
                sup.stall_timeout.as_millis()
            ));
        }
    }
}

/// The first error message on the bus, for a pipeline that refused to start.
fn first_error(pipeline: &gst::Pipeline) -> String {
    let bus = pipeline.bus().expect("a pipeline has a bus");
    while let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(200)) {
        if let gst::MessageView::Error(e) = msg.view() {
            return e.error().to_string();
        }
    }
    "pipeline refused to start".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let d: Vec<u128> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        for (got, base) in d.iter().zip([100u128, 200, 400, 800, 1000, 1000]) {
            assert!(*got >= base * 8 / 10 && *got <= base * 12 / 10, "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
