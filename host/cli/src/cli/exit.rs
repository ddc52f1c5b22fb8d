//! Exit codes, the same for every subcommand (README, "Exit codes").
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done: the request succeeded, the handler returned `ok`, the component is compatible |
//! | 1 | refused or failed: the server answered with an error, an event or invocation failed, a component is not compatible |
//! | 2 | usage: bad arguments, an unreadable or invalid input file (clap uses 2 as well) |
//! | 3 | the server cannot be reached (refused connection, unknown host, timeout) |
//! | 4 | the server wants a (different) token: 401 or 403 |

use std::process::ExitCode;

/// A failure that knows its exit code; any other error exits with [`Exit::Failed`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The exit code.
    pub exit: Exit,
    /// What to tell the user (one or more lines, the first says what went wrong).
    pub message: String,
}

/// The exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 1: refused or failed.
    Failed = 1,
    /// 2: bad usage or input.
    Usage = 2,
    /// 3: the server cannot be reached.
    Unreachable = 3,
    /// 4: authentication or authorization refused.
    Denied = 4,
}

impl Exit {
    /// This code as a process exit code.
    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }
}

/// An error with exit code `exit`.
pub fn fail(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    Failure {
        exit,
        message: message.into(),
    }
    .into()
}

/// Marks `error` (typically a file that cannot be read or parsed) as a usage error (exit 2).
pub fn usage(error: anyhow::Error) -> anyhow::Error {
    fail(Exit::Usage, format!("{error:#}"))
}

/// The exit code for an error returned by a command.
pub fn code_of(error: &anyhow::Error) -> ExitCode {
    match error.downcast_ref::<Failure>() {
        Some(failure) => failure.exit.code(),
        None => Exit::Failed.code(),
    }
}
