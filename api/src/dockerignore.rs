//! `.dockerignore`: which files of a build context the builder never sees, with docker's
//! semantics (Go `filepath.Match` patterns, `**` for any number of directories, `!` exceptions
//! where the last matching pattern wins, `#` comments, leading `/` and `./` ignored, a pattern
//! that matches a directory excludes everything under it unless an exception brings a path
//! back).

/// A parsed `.dockerignore`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

/// One line of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Cleaned pattern: no leading `/` or `./`, no trailing `/`, `..` and `.` resolved.
    text: String,
    /// `!pattern`.
    exception: bool,
}

impl DockerIgnore {
    /// Parses the file's text. Errors name the 1-based line of a malformed pattern (an
    /// unclosed `[`).
    pub fn parse(text: &str) -> Result<DockerIgnore, String> {
        let _ = text;
        todo!("dockerignore parser")
    }

    /// Whether the context path `path` (relative, `/`-separated, no leading `./`) is excluded.
    /// A path is excluded when the last pattern matching it or one of its parent directories
    /// is not an exception.
    pub fn excluded(&self, path: &str) -> bool {
        let _ = path;
        todo!("dockerignore matcher")
    }

    /// Whether a walker must look inside the excluded directory `dir`: true when some
    /// exception could bring back a path under it.
    pub fn may_include_under(&self, dir: &str) -> bool {
        let _ = dir;
        todo!("dockerignore descent")
    }

    /// Whether it has no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}
