//! One error type for the library. Every variant says what went wrong, where, and what to do.

use std::path::PathBuf;

use miette::{Diagnostic, NamedSource, SourceSpan};
use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error, Diagnostic)]
pub enum Error {
    /// A TOML file (spec, role, checks) that does not parse or does not fit its schema.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Toml(Box<TomlError>),

    /// A value that parses but makes no sense (unknown role, bad size, ...).
    #[error("{what}")]
    #[diagnostic(code(ncimage::invalid), help("{help}"))]
    Invalid { what: String, help: String },

    /// A host program is missing.
    #[error("the host tool `{tool}` is missing")]
    #[diagnostic(
        code(ncimage::missing_tool),
        help(
            "install the Debian package `{package}` (scripts/setup-host installs every host tool)"
        )
    )]
    MissingTool { tool: String, package: String },

    /// A host program ran and failed.
    #[error("`{command}` failed ({status})\n{output}")]
    #[diagnostic(code(ncimage::command))]
    Command {
        command: String,
        status: String,
        output: String,
    },

    #[error("{action} {path}: {source}")]
    #[diagnostic(code(ncimage::io))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("template {name}: {message}")]
    #[diagnostic(
        code(ncimage::template),
        help("fix the template or the value it names")
    )]
    Template { name: String, message: String },

    #[error("interrupted")]
    #[diagnostic(
        code(ncimage::interrupted),
        help("nothing was left behind; run the command again")
    )]
    Interrupted,

    #[error("{0}")]
    #[diagnostic(code(ncimage::vm))]
    Vm(String),

    /// An upload or a cloud call failed (what, where, and what to do).
    #[error("{what}")]
    #[diagnostic(code(ncimage::upload), help("{help}"))]
    Upload { what: String, help: String },

    /// A declared check failed in the booted guest.
    #[error("{failed} of {total} checks failed in the guest")]
    #[diagnostic(code(ncimage::checks), help("the serial log of the guest is at {log}"))]
    Checks {
        failed: usize,
        total: usize,
        log: String,
    },
}

impl Error {
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }

    pub fn invalid(what: impl Into<String>, help: impl Into<String>) -> Error {
        Error::Invalid {
            what: what.into(),
            help: help.into(),
        }
    }

    pub fn upload(what: impl Into<String>, help: impl Into<String>) -> Error {
        Error::Upload {
            what: what.into(),
            help: help.into(),
        }
    }

    /// Turns a `toml` deserialisation error into a diagnostic naming file:line:column.
    pub fn toml(path: &str, text: &str, err: &toml::de::Error, help: &str) -> Error {
        let span = err.span();
        let position = span
            .as_ref()
            .map(|s| {
                let (line, col) = line_col(text, s.start);
                format!(":{line}:{col}")
            })
            .unwrap_or_default();
        Error::Toml(Box::new(TomlError {
            path: format!("{path}{position}"),
            message: err.message().trim().to_string(),
            help: help.to_string(),
            src: NamedSource::new(path, text.to_string()),
            span: span
                .map(|s| SourceSpan::from(s.start..s.end.max(s.start + 1).min(text.len().max(1)))),
        }))
    }
}

/// A TOML error located at file:line:column, with the source shown under it.
#[derive(Debug, Error, Diagnostic)]
#[error("{path}: {message}")]
#[diagnostic(code(ncimage::toml), help("{help}"))]
pub struct TomlError {
    pub path: String,
    pub message: String,
    pub help: String,
    #[source_code]
    pub src: NamedSource<String>,
    #[label("here")]
    pub span: Option<SourceSpan>,
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc\nd", 0), (1, 1));
        assert_eq!(line_col("a\nbc\nd", 3), (2, 2));
        assert_eq!(line_col("a\nbc\nd", 5), (3, 1));
    }
}
