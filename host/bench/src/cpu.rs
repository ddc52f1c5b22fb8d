//! Where the CPU time of a run goes: this process (the host side: broker, provider client,
//! handler) and the backend server's processes (`redis-server`, `postgres`, `nats-server`),
//! read from `/proc` before and after the run. Divided by the events of the run, it shows how
//! much work each side does per event, so a ratio below the goal can be traced to the side
//! that pays for it (a busy server bounds the throughput however little the host does).

use std::time::Duration;

/// CPU time spent by each side during a measured stretch.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSpent {
    /// This process (all threads).
    pub host: Duration,
    /// The server's processes (with their reaped children), when a server was named.
    pub server: Duration,
}

impl CpuSpent {
    /// Microseconds per event of each side: (host, server).
    pub fn per_event(&self, events: u64) -> (f64, f64) {
        let events = events.max(1) as f64;
        (
            self.host.as_secs_f64() * 1e6 / events,
            self.server.as_secs_f64() * 1e6 / events,
        )
    }
}

/// A running measurement: readings taken at its start.
pub struct CpuMeter {
    server: Option<&'static str>,
    host: Duration,
    server_start: Duration,
}

impl CpuMeter {
    /// Starts measuring this process and every process whose command name is `server`.
    pub fn start(server: Option<&'static str>) -> Self {
        CpuMeter {
            server,
            host: own_time(),
            server_start: server.map(processes_time).unwrap_or_default(),
        }
    }

    /// The CPU time spent since the start.
    pub fn stop(&self) -> CpuSpent {
        CpuSpent {
            host: own_time().saturating_sub(self.host),
            server: self
                .server
                .map(processes_time)
                .unwrap_or_default()
                .saturating_sub(self.server_start),
        }
    }
}

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;

/// User + system time of a `/proc/PID/stat` line, with the times of reaped children when
/// `children` is set; `None` when the line does not parse.
fn stat_time(stat: &str, children: bool) -> Option<Duration> {
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // After the name: state is field 3 (index 0), utime 14 (11), stime 15 (12),
    // cutime 16 (13), cstime 17 (14).
    let take = |index: usize| fields.get(index).and_then(|v| v.parse::<u64>().ok());
    let mut ticks = take(11)? + take(12)?;
    if children {
        ticks += take(13)? + take(14)?;
    }
    Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

fn own_time() -> Duration {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| stat_time(&stat, false))
        .unwrap_or_default()
}

/// The summed times of the processes named `name` (children reaped by them included: a
/// PostgreSQL backend that exits is added to the postmaster's).
fn processes_time(name: &str) -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        if !file_name
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let command = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map(|(command, _)| command);
        if command == Some(name) {
            total += stat_time(&stat, true).unwrap_or_default();
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_in_the_name_parses() {
        let line = "42 (redis server) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 4 0";
        assert_eq!(stat_time(line, false), Some(Duration::from_millis(3000)));
        assert_eq!(stat_time(line, true), Some(Duration::from_millis(3100)));
        assert_eq!(stat_time("garbage", false), None);
    }
}
