//! Dockerfiles: the parser (instructions, line continuations, comments, parser directives,
//! heredocs) and the variable expansion the builder applies at each step.
//!
//! [`parse`] turns the text into stages of [`Instruction`]s whose words are still *raw*: quotes
//! and `$VAR`s are left as written, because what a variable means is only known while building
//! (the base image's `ENV`, earlier `ARG`s and `--build-arg`s). The builder calls [`expand`] on
//! each raw word of the instructions docker expands (ADD, COPY, ENV, EXPOSE, FROM, LABEL,
//! STOPSIGNAL, USER, VOLUME, WORKDIR, ARG defaults, and the `--from`/`--chown`/`--chmod` flags).
//! RUN, CMD and ENTRYPOINT are never expanded by the builder: their shell does it.

use std::fmt;

/// A parse or expansion error, naming where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The Dockerfile's name as the user gave it (`Dockerfile`, `build/Dockerfile.dev`).
    pub file: String,
    /// 1-based line of the instruction's first line (0 when the file as a whole is wrong).
    pub line: usize,
    /// The instruction's keyword, upper case (`COPY`), or empty.
    pub instruction: String,
    /// What is wrong, lower case, no trailing period.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.instruction.is_empty()) {
            (0, _) => write!(f, "{}: {}", self.file, self.message),
            (l, true) => write!(f, "{}:{l}: {}", self.file, self.message),
            (l, false) => write!(f, "{}:{l}: {}: {}", self.file, self.instruction, self.message),
        }
    }
}

impl std::error::Error for ParseError {}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The escape character (`\` unless `# escape=` set it to `` ` ``).
    pub escape: char,
    /// Notes for the user about what the parser ignored (`# syntax=` directives).
    pub notes: Vec<String>,
    /// `ARG`s before the first `FROM` (usable in `FROM` lines, and in a stage after a bare
    /// `ARG name` there).
    pub meta_args: Vec<ArgDecl>,
    /// The stages, in file order. Never empty.
    pub stages: Vec<Stage>,
}

/// One `FROM` and the instructions after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// 1-based line of the `FROM`.
    pub line: usize,
    /// The base as written (raw: may hold `$VAR`): an image reference, `scratch`, or an earlier
    /// stage's name.
    pub base: String,
    /// `AS name`, lower-cased as docker does.
    pub name: Option<String>,
    /// `--platform=` as written (raw).
    pub platform: Option<String>,
    /// The stage's instructions after the `FROM`.
    pub instructions: Vec<Instruction>,
}

/// One instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// 1-based line of its first line.
    pub line: usize,
    /// The instruction as written, continuations joined into one line with the escape and
    /// newline removed (heredoc bodies not included): `RUN apk add  curl`. For history entries
    /// and cache keys.
    pub original: String,
    /// What it says.
    pub kind: Kind,
}

impl Instruction {
    /// The keyword, upper case: `RUN`.
    pub fn keyword(&self) -> &'static str {
        match &self.kind {
            Kind::Run { .. } => "RUN",
            Kind::Cmd(_) => "CMD",
            Kind::Entrypoint(_) => "ENTRYPOINT",
            Kind::Env(_) => "ENV",
            Kind::Arg(_) => "ARG",
            Kind::Label(_) => "LABEL",
            Kind::Maintainer(_) => "MAINTAINER",
            Kind::Expose(_) => "EXPOSE",
            Kind::Workdir(_) => "WORKDIR",
            Kind::User(_) => "USER",
            Kind::Volume(_) => "VOLUME",
            Kind::Copy(_) => "COPY",
            Kind::Add(_) => "ADD",
            Kind::Onbuild(_) => "ONBUILD",
            Kind::StopSignal(_) => "STOPSIGNAL",
            Kind::Healthcheck(_) => "HEALTHCHECK",
            Kind::Shell(_) => "SHELL",
        }
    }
}

/// A command in shell form (run by the stage's `SHELL`) or exec form (a JSON array).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `RUN echo hi`: the text after the keyword (continuations joined, leading whitespace
    /// trimmed).
    Shell(String),
    /// `RUN ["echo", "hi"]`: the array's strings.
    Exec(Vec<String>),
}

/// A heredoc (`<<EOF` … `EOF`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word, unquoted (`EOF`).
    pub name: String,
    /// The body: the lines between the marker's line and the delimiter line, each ending with
    /// `\n`; with `<<-`, leading tabs already stripped from each line.
    pub content: String,
    /// Whether `$VAR`s in the body are expanded (the delimiter was not quoted).
    pub expand: bool,
    /// Whether it was `<<-` (strip leading tabs).
    pub strip_tabs: bool,
}

/// `ARG name[=default]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgDecl {
    /// The name.
    pub name: String,
    /// The default as written (raw), if any.
    pub default: Option<String>,
}

/// The arguments of COPY and ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyArgs {
    /// Source words as written (raw; globs allowed). Empty when the sources are heredocs.
    pub sources: Vec<String>,
    /// Heredoc sources (`COPY <<EOF /etc/x`), in order.
    pub heredocs: Vec<Heredoc>,
    /// The destination as written (raw).
    pub dest: String,
    /// `--from=` (raw): a stage name or index, or an image.
    pub from: Option<String>,
    /// `--chown=` (raw): `user[:group]`, names or numbers.
    pub chown: Option<String>,
    /// `--chmod=` (raw): octal.
    pub chmod: Option<String>,
}

/// `HEALTHCHECK`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// `None` for `HEALTHCHECK NONE`; otherwise the `CMD` that tests.
    pub test: Option<Command>,
    /// `--interval`, ns (0 = unset).
    pub interval_ns: i64,
    /// `--timeout`, ns (0 = unset).
    pub timeout_ns: i64,
    /// `--start-period`, ns (0 = unset).
    pub start_period_ns: i64,
    /// `--start-interval`, ns (0 = unset).
    pub start_interval_ns: i64,
    /// `--retries` (0 = unset).
    pub retries: i64,
}

/// What an instruction says. Strings are raw (see the module docs) unless a field says
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `RUN`: the command, and the heredocs its line opened (`RUN <<EOF`, `RUN cat <<A <<B`),
    /// in order. Flags (`--mount`, `--network`) are refused by the parser.
    Run {
        /// The command.
        command: Command,
        /// Heredoc bodies, in the order their markers appear.
        heredocs: Vec<Heredoc>,
    },
    /// `CMD`.
    Cmd(Command),
    /// `ENTRYPOINT`.
    Entrypoint(Command),
    /// `ENV k=v …` or the legacy `ENV k v`: pairs, values raw (quotes kept).
    Env(Vec<(String, String)>),
    /// `ARG a[=x] [b[=y]…]`.
    Arg(Vec<ArgDecl>),
    /// `LABEL k=v …`: pairs, keys and values raw.
    Label(Vec<(String, String)>),
    /// `MAINTAINER name` (the rest of the line, not expanded).
    Maintainer(String),
    /// `EXPOSE 80 443/udp …`: words, raw.
    Expose(Vec<String>),
    /// `WORKDIR path`.
    Workdir(String),
    /// `USER user[:group]`.
    User(String),
    /// `VOLUME ["/a", "/b"]` or `VOLUME /a /b`: paths, raw.
    Volume(Vec<String>),
    /// `COPY`.
    Copy(CopyArgs),
    /// `ADD`.
    Add(CopyArgs),
    /// `ONBUILD <instruction>`: the trigger, parsed (never `ONBUILD`, `FROM` or `MAINTAINER`),
    /// and as written after the keyword (for the image config's `OnBuild`).
    Onbuild(Box<Instruction>),
    /// `STOPSIGNAL sig`.
    StopSignal(String),
    /// `HEALTHCHECK`.
    Healthcheck(Healthcheck),
    /// `SHELL ["exe", "arg"]` (exec form only).
    Shell(Vec<String>),
}

/// Parses Dockerfile `text`; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Dockerfile, ParseError> {
    let _ = (file, text);
    todo!("dockerfile parser")
}

/// Parses one instruction line (an `ONBUILD` trigger stored in a base image's config) with
/// escape character `escape`. `FROM`, `ONBUILD` and `MAINTAINER` are refused as triggers.
pub fn parse_trigger(file: &str, text: &str, escape: char) -> Result<Instruction, ParseError> {
    let _ = (file, text, escape);
    todo!("dockerfile trigger parser")
}

/// Expands one raw word as docker's builder does: quotes (`'…'` literal, `"…"` with
/// expansion) removed, `escape` escaping the next character, `$VAR`, `${VAR}`,
/// `${VAR:-default}`, `${VAR-default}`, `${VAR:+alt}`, `${VAR+alt}` (and `${VAR:?msg}` as an
/// error) substituted from `lookup`. An unset variable expands to nothing. Errors (unclosed
/// quote or brace, bad modifier) are messages for [`ParseError::message`].
pub fn expand(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let _ = (word, escape, lookup);
    todo!("dockerfile word expansion")
}

/// Parses a duration as docker's flags take it (`30s`, `1m30s`, `500ms`, `1h`): nanoseconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let _ = s;
    todo!("duration parser")
}
