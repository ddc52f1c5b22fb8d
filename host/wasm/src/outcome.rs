//! How an invocation that did not end normally is reported: the failure kind for a wasmtime
//! error (fuel, memory, deadline, pool capacity, transfer limit, trap), with bounded messages
//! and the invocation's details.

use std::time::Duration;

use wasmtime::{PoolConcurrencyLimitError, Trap};

use super::limits;
use super::log::LogLine;
use eventbroker::event::{Failure, FailureKind};

/// Log lines kept in a failure record.
const FAILURE_LOG_TAIL: usize = 10;

/// The limits an invocation ran under, to explain which one ended it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Classifier {
    /// Fuel per invocation.
    pub(crate) fuel: u64,
    /// Memory limit in bytes.
    pub(crate) memory: u64,
    /// Deadline.
    pub(crate) timeout: Duration,
    /// Bytes the guest could hand the host in one call.
    pub(crate) transfer: usize,
}

impl Classifier {
    /// The failure for `error`, raised by instantiating or calling the guest.
    /// `memory_exceeded` says whether the guest tried to grow past its memory limit.
    pub(crate) fn classify(&self, memory_exceeded: bool, error: &wasmtime::Error) -> Failure {
        if error.is::<PoolConcurrencyLimitError>() {
            return Failure::new(
                FailureKind::Busy,
                limits::truncate_message(format!(
                    "the instance pool is exhausted ({error}; raise handlers.pool.instances); \
                     deferred without counting an attempt (the host's capacity, not the \
                     handler's fault)"
                )),
            );
        }
        if memory_exceeded {
            return Failure::new(
                FailureKind::MemoryLimit,
                limits::truncate_message(format!(
                    "memory limit of {} reached: {error:#}",
                    bytesize::ByteSize::b(self.memory)
                )),
            );
        }
        if limits::is_transfer_exceeded(error) {
            return Failure::new(
                FailureKind::Trap,
                format!(
                    "the guest handed the host more than {} bytes in one call or result (a log \
                     line, a derived event, an error message); that is the most one call may \
                     carry: the largest derived event (event_broker.max_payload plus metadata) \
                     or the handler's max_log_bytes, whichever is larger",
                    self.transfer
                ),
            );
        }
        match error.downcast_ref::<Trap>().copied() {
            Some(Trap::OutOfFuel) => Failure::new(
                FailureKind::OutOfFuel,
                format!(
                    "ran out of fuel ({} units; bytes handed to the host cost one unit each)",
                    self.fuel
                ),
            ),
            Some(Trap::Interrupt) => Failure::new(
                FailureKind::Timeout,
                format!(
                    "did not finish within {}",
                    humantime::format_duration(self.timeout)
                ),
            ),
            Some(_) => Failure::new(
                FailureKind::Trap,
                limits::truncate_message(format!("{error:?}")),
            ),
            None => {
                let text = limits::truncate_message(format!("{error:?}"));
                if text.contains("memory") && text.contains("limit") {
                    Failure::new(FailureKind::MemoryLimit, text)
                } else {
                    Failure::new(FailureKind::Trap, text)
                }
            }
        }
    }
}

/// `failure` with the fuel used and the last [`FAILURE_LOG_TAIL`] log lines.
pub(crate) fn with_details(mut failure: Failure, fuel_used: u64, logs: &[LogLine]) -> Failure {
    failure.fuel_used = Some(fuel_used);
    let skip = logs.len().saturating_sub(FAILURE_LOG_TAIL);
    failure.log_tail = logs[skip..]
        .iter()
        .map(|line| format!("{}: {}", line.level, line.message))
        .collect();
    failure
}
