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
            (l, false) => write!(
                f,
                "{}:{l}: {}: {}",
                self.file, self.instruction, self.message
            ),
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
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parser = Parser::new(file, text, '\\');
    let notes = parser.directives()?;
    let mut meta_args = Vec::new();
    let mut stages: Vec<Stage> = Vec::new();
    while let Some((line, joined)) = parser.next_logical_line() {
        match parser.line(line, &joined, true)? {
            Parsed::From(stage) => {
                let earlier = stages
                    .iter()
                    .find(|s| s.name.is_some() && s.name == stage.name);
                if let (Some(earlier), Some(name)) = (earlier, &stage.name) {
                    return Err(parser.error(
                        line,
                        "FROM",
                        format!(
                            "the stage name {name:?} is already used by the stage on line {}",
                            earlier.line
                        ),
                    ));
                }
                stages.push(stage);
            }
            Parsed::Instruction(instruction) => match stages.last_mut() {
                Some(stage) => stage.instructions.push(instruction),
                None => match instruction.kind {
                    Kind::Arg(decls) => meta_args.extend(decls),
                    _ => {
                        return Err(parser.error(
                            line,
                            instruction.keyword(),
                            "comes before the first FROM: only ARG may precede FROM",
                        ));
                    }
                },
            },
        }
    }
    if stages.is_empty() {
        return Err(parser.error(
            0,
            "",
            "the Dockerfile has no FROM: a build needs at least one stage",
        ));
    }
    Ok(Dockerfile {
        escape: parser.escape,
        notes,
        meta_args,
        stages,
    })
}

/// Parses one instruction line (an `ONBUILD` trigger stored in a base image's config) with
/// escape character `escape`. `FROM`, `ONBUILD` and `MAINTAINER` are refused as triggers.
pub fn parse_trigger(file: &str, text: &str, escape: char) -> Result<Instruction, ParseError> {
    let mut parser = Parser::new(file, text, escape);
    let Some((line, joined)) = parser.next_logical_line() else {
        return Err(parser.error(0, "ONBUILD", "the trigger is empty"));
    };
    let instruction = parser.trigger(line, &joined, false)?;
    if let Some((extra, _)) = parser.next_logical_line() {
        return Err(parser.error(
            extra,
            "ONBUILD",
            "a trigger is one instruction, but the text holds more",
        ));
    }
    Ok(instruction)
}

/// Expands one raw word as docker's builder does: quotes (`'…'` literal, `"…"` with
/// expansion) removed, `escape` escaping the next character, `$VAR`, `${VAR}`,
/// `${VAR:-default}`, `${VAR-default}`, `${VAR:+alt}`, `${VAR+alt}` (and `${VAR:?msg}` as an
/// error) substituted from `lookup`. An unset variable expands to nothing. Errors (unclosed
/// quote or brace, bad modifier) are messages for [`ParseError::message`].
///
/// Like BuildKit, it also takes `${VAR#pattern}`, `${VAR##pattern}`, `${VAR%pattern}`,
/// `${VAR%%pattern}` (remove the shortest/longest matching prefix/suffix) and
/// `${VAR/pattern/replacement}`, `${VAR//pattern/replacement}` (replace the first/every
/// match), with shell patterns (`*`, `?`, `[…]`).
pub fn expand(
    word: &str,
    escape: char,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        escape,
        lookup,
    };
    lexer.word(&[], false).map(|(word, _)| word)
}

/// Parses a duration as docker's flags take it (`30s`, `1m30s`, `500ms`, `1h`): nanoseconds.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let bad = || format!("invalid duration {s:?}: expected a number and a unit, like 30s or 1m30s");
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.starts_with('-') {
        return Err(format!("invalid duration {s:?}: it cannot be negative"));
    }
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(after) => {
                let len = after
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(after.len());
                after.split_at(len)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: a unit is missing (ns, us, ms, s, m or h)"
                ));
            }
            _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?}")),
        };
        let too_long = || format!("invalid duration {s:?}: it is too long");
        let mut value: u128 = 0;
        for d in int.bytes() {
            value = value
                .checked_mul(10)
                .and_then(|v| v.checked_add(u128::from(d - b'0')))
                .filter(|v| *v <= i64::MAX as u128)
                .ok_or_else(too_long)?;
        }
        value = value.checked_mul(scale).ok_or_else(too_long)?;
        // Digits past the 20th cannot change a nanosecond count that fits an i64.
        let mut frac_value: u128 = 0;
        let mut frac_scale: u128 = 1;
        for d in frac.bytes().take(20) {
            frac_value = frac_value * 10 + u128::from(d - b'0');
            frac_scale *= 10;
        }
        value += frac_value * scale / frac_scale;
        total = total.checked_add(value).ok_or_else(too_long)?;
        if total > i64::MAX as u128 {
            return Err(too_long());
        }
        rest = after;
    }
    i64::try_from(total).map_err(|_| format!("invalid duration {s:?}: it is too long"))
}

/// What one logical line turned out to be.
enum Parsed {
    /// A `FROM`: a new stage.
    From(Stage),
    /// Anything else.
    Instruction(Instruction),
}

/// The line-level state of a parse: the lines, where we are, and the escape character.
struct Parser<'a> {
    file: &'a str,
    escape: char,
    lines: Vec<&'a str>,
    /// Index of the next unread line.
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(file: &'a str, text: &'a str, escape: char) -> Parser<'a> {
        let lines = text
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        Parser {
            file,
            escape,
            lines,
            pos: 0,
        }
    }

    fn error(&self, line: usize, instruction: &str, message: impl Into<String>) -> ParseError {
        ParseError {
            file: self.file.to_string(),
            line,
            instruction: instruction.to_string(),
            message: message.into(),
        }
    }

    /// Reads the parser directives at the top of the file (consuming their lines) and sets the
    /// escape character. Returns the notes to show the user.
    fn directives(&mut self) -> Result<Vec<String>, ParseError> {
        let mut notes = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        while let Some(raw) = self.lines.get(self.pos) {
            let Some((key, value)) = directive(raw) else {
                break;
            };
            let line = self.pos + 1;
            if !matches!(key.as_str(), "escape" | "syntax" | "check") {
                break;
            }
            if seen.contains(&key) {
                return Err(self.error(
                    line,
                    "",
                    format!("only one `# {key}=` parser directive can be used"),
                ));
            }
            match key.as_str() {
                "escape" => {
                    self.escape = match value {
                        "\\" => '\\',
                        "`" => '`',
                        _ => {
                            return Err(self.error(
                                line,
                                "",
                                format!(
                                    "invalid escape character {value:?} in the `# escape=` \
                                     directive: it must be ` or \\"
                                ),
                            ));
                        }
                    }
                }
                "syntax" => notes.push(format!(
                    "ignored the `# syntax={value}` directive: berth builds with its own frontend"
                )),
                _ => notes.push(format!(
                    "ignored the `# check={value}` directive: berth's builder runs no build checks"
                )),
            }
            seen.push(key);
            self.pos += 1;
        }
        Ok(notes)
    }

    /// The next instruction's text with its continuation lines joined, and its 1-based first
    /// line; skips blank lines and comments. `None` at the end of the file.
    fn next_logical_line(&mut self) -> Option<(usize, String)> {
        loop {
            let raw = *self.lines.get(self.pos)?;
            self.pos += 1;
            let start = self.pos;
            let first = raw.trim_start();
            if first.is_empty() || first.starts_with('#') {
                continue;
            }
            let (text, mut more) = trim_continuation(first, self.escape);
            let mut joined = text.to_string();
            while more {
                let Some(raw) = self.lines.get(self.pos) else {
                    break;
                };
                self.pos += 1;
                let trimmed = raw.trim_start();
                // Docker skips comments and empty lines inside a continuation.
                if trimmed.is_empty() || trimmed.starts_with('#') {
                    continue;
                }
                let (text, again) = trim_continuation(raw, self.escape);
                joined.push_str(text);
                more = again;
            }
            if joined.trim().is_empty() {
                continue;
            }
            return Some((start, joined));
        }
    }

    /// Reads the bodies of `markers` from the lines after the instruction.
    fn heredoc_bodies(
        &mut self,
        line: usize,
        keyword: &str,
        markers: Vec<Marker>,
    ) -> Result<Vec<Heredoc>, ParseError> {
        let mut docs = Vec::new();
        for marker in markers {
            let mut content = String::new();
            let mut terminated = false;
            while let Some(raw) = self.lines.get(self.pos) {
                self.pos += 1;
                let body_line = if marker.strip_tabs {
                    raw.trim_start_matches('\t')
                } else {
                    raw
                };
                if body_line == marker.name {
                    terminated = true;
                    break;
                }
                content.push_str(body_line);
                content.push('\n');
            }
            if !terminated {
                return Err(self.error(
                    line,
                    keyword,
                    format!(
                        "unterminated heredoc: no line `{}` ends the heredoc `<<{}`",
                        marker.name, marker.name
                    ),
                ));
            }
            docs.push(Heredoc {
                name: marker.name,
                content,
                expand: marker.expand,
                strip_tabs: marker.strip_tabs,
            });
        }
        Ok(docs)
    }

    /// Parses an `ONBUILD` trigger; `heredocs` says whether bodies may follow (in a file, not
    /// in a trigger stored in an image config).
    fn trigger(
        &mut self,
        line: usize,
        text: &str,
        heredocs: bool,
    ) -> Result<Instruction, ParseError> {
        let keyword = first_word(text).to_ascii_uppercase();
        match keyword.as_str() {
            "ONBUILD" => Err(self.error(
                line,
                "ONBUILD",
                "chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
            )),
            "FROM" | "MAINTAINER" => Err(self.error(
                line,
                "ONBUILD",
                format!("{keyword} isn't allowed as an ONBUILD trigger"),
            )),
            _ => match self.line(line, text, heredocs)? {
                Parsed::Instruction(instruction) => Ok(instruction),
                Parsed::From(_) => {
                    Err(self.error(line, "ONBUILD", "FROM isn't allowed as an ONBUILD trigger"))
                }
            },
        }
    }

    /// Parses one logical line. `heredocs` says whether heredoc bodies may follow it.
    fn line(&mut self, line: usize, text: &str, heredocs: bool) -> Result<Parsed, ParseError> {
        let text = text.trim();
        let word = first_word(text);
        let rest = text[word.len()..].trim_start();
        let keyword = word.to_ascii_uppercase();
        let kw = keyword.as_str();
        let original = if rest.is_empty() {
            keyword.clone()
        } else {
            format!("{keyword} {rest}")
        };
        let known = [
            "FROM",
            "RUN",
            "CMD",
            "ENTRYPOINT",
            "ENV",
            "ARG",
            "LABEL",
            "MAINTAINER",
            "EXPOSE",
            "WORKDIR",
            "USER",
            "VOLUME",
            "COPY",
            "ADD",
            "ONBUILD",
            "STOPSIGNAL",
            "HEALTHCHECK",
            "SHELL",
        ];
        if !known.contains(&kw) {
            return Err(self.error(line, kw, "unknown instruction"));
        }
        if rest.is_empty() {
            let message = match kw {
                "COPY" | "ADD" => {
                    "requires at least two arguments: one or more sources and a destination"
                }
                _ => "requires at least one argument",
            };
            return Err(self.error(line, kw, message));
        }
        let file = self.file;
        let err = |message: String| ParseError {
            file: file.to_string(),
            line,
            instruction: kw.to_string(),
            message,
        };
        let (flag_words, rest) = if kw == "ONBUILD" {
            (Vec::new(), rest)
        } else {
            extract_flags(rest, self.escape)
        };
        let flags = Flags::parse(&flag_words, kw, allowed_flags(kw)).map_err(err)?;
        if rest.is_empty() {
            return Err(self.error(line, kw, "requires at least one argument after its flags"));
        }
        let escape = self.escape;
        let kind = match kw {
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let name = match words.as_slice() {
                    [_] => None,
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => {
                        let name = name.to_ascii_lowercase();
                        if !valid_stage_name(&name) {
                            return Err(self.error(
                                line,
                                kw,
                                format!(
                                    "invalid stage name {name:?}: it must start with a letter \
                                     and hold only letters, digits, `-`, `_` and `.`"
                                ),
                            ));
                        }
                        Some(name)
                    }
                    _ => {
                        return Err(self.error(
                            line,
                            kw,
                            "requires either one argument, or three: FROM image AS name",
                        ));
                    }
                };
                return Ok(Parsed::From(Stage {
                    line,
                    base: words[0].to_string(),
                    name,
                    platform: flags.value("platform"),
                    instructions: Vec::new(),
                }));
            }
            "RUN" => {
                let (command, markers) = match json_args(rest).map_err(err)? {
                    Some(args) => (Command::Exec(args), Vec::new()),
                    None => {
                        let markers = if heredocs {
                            parse_words(rest, escape)
                                .iter()
                                .filter_map(|w| heredoc_marker(w))
                                .collect()
                        } else {
                            Vec::new()
                        };
                        (Command::Shell(rest.to_string()), markers)
                    }
                };
                let heredocs = self.heredoc_bodies(line, kw, markers)?;
                Kind::Run { command, heredocs }
            }
            "CMD" => Kind::Cmd(maybe_json(rest).map_err(err)?),
            "ENTRYPOINT" => Kind::Entrypoint(maybe_json(rest).map_err(err)?),
            "ENV" => Kind::Env(name_values(rest, escape, kw).map_err(err)?),
            "LABEL" => Kind::Label(name_values(rest, escape, kw).map_err(err)?),
            "ARG" => {
                let mut decls = Vec::new();
                for word in parse_words(rest, escape) {
                    let (name, default) = match word.split_once('=') {
                        Some((name, default)) => (name, Some(default.to_string())),
                        None => (word.as_str(), None),
                    };
                    if name.is_empty() {
                        return Err(err(format!("the ARG {word:?} has no name")));
                    }
                    decls.push(ArgDecl {
                        name: name.to_string(),
                        default,
                    });
                }
                Kind::Arg(decls)
            }
            "MAINTAINER" => Kind::Maintainer(rest.to_string()),
            "EXPOSE" => Kind::Expose(rest.split_whitespace().map(str::to_string).collect()),
            "WORKDIR" => Kind::Workdir(rest.to_string()),
            "USER" => Kind::User(rest.to_string()),
            "STOPSIGNAL" => Kind::StopSignal(rest.to_string()),
            "VOLUME" => {
                let paths = match json_args(rest).map_err(err)? {
                    Some(paths) => paths,
                    None => rest.split_whitespace().map(str::to_string).collect(),
                };
                if paths.is_empty() {
                    return Err(err("requires at least one argument".to_string()));
                }
                if paths.iter().any(|p| p.trim().is_empty()) {
                    return Err(err("a volume path cannot be an empty string".to_string()));
                }
                Kind::Volume(paths)
            }
            "COPY" | "ADD" => {
                let (words, json) = match json_args(rest).map_err(err)? {
                    Some(words) => (words, true),
                    None => (rest.split_whitespace().map(str::to_string).collect(), false),
                };
                if words.len() < 2 {
                    return Err(err(format!(
                        "requires at least two arguments: one or more sources and a \
                         destination, but got {}",
                        words.len()
                    )));
                }
                let mut sources = Vec::new();
                let mut markers = Vec::new();
                for word in &words[..words.len() - 1] {
                    match heredoc_marker(word).filter(|_| heredocs && !json) {
                        Some(marker) => markers.push(marker),
                        None => sources.push(word.clone()),
                    }
                }
                let args = CopyArgs {
                    sources,
                    heredocs: self.heredoc_bodies(line, kw, markers)?,
                    dest: words[words.len() - 1].clone(),
                    from: flags.value("from"),
                    chown: flags.value("chown"),
                    chmod: flags.value("chmod"),
                };
                if kw == "COPY" {
                    Kind::Copy(args)
                } else {
                    Kind::Add(args)
                }
            }
            "ONBUILD" => {
                let mut trigger = self.trigger(line, rest, heredocs)?;
                if let Kind::Onbuild(_) = trigger.kind {
                    return Err(err(
                        "chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".to_string()
                    ));
                }
                trigger.line = line;
                Kind::Onbuild(Box::new(trigger))
            }
            "HEALTHCHECK" => {
                let kind = first_word(rest);
                let args = rest[kind.len()..].trim_start();
                match kind.to_ascii_uppercase().as_str() {
                    "NONE" => {
                        if !args.is_empty() {
                            return Err(err("HEALTHCHECK NONE takes no arguments".to_string()));
                        }
                        if !flag_words.is_empty() {
                            return Err(err(
                                "options like --interval cannot be used with HEALTHCHECK NONE"
                                    .to_string(),
                            ));
                        }
                        Kind::Healthcheck(Healthcheck {
                            test: None,
                            interval_ns: 0,
                            timeout_ns: 0,
                            start_period_ns: 0,
                            start_interval_ns: 0,
                            retries: 0,
                        })
                    }
                    "CMD" => {
                        if args.is_empty() {
                            return Err(err("HEALTHCHECK CMD needs a command to run".to_string()));
                        }
                        let retries = match flags.value("retries") {
                            None => 0,
                            Some(v) => match v.parse::<i64>() {
                                Ok(n) if n >= 0 => n,
                                Ok(_) => {
                                    return Err(err("--retries cannot be negative".to_string()));
                                }
                                Err(_) => {
                                    return Err(err(format!(
                                        "--retries={v} is not a whole number"
                                    )));
                                }
                            },
                        };
                        Kind::Healthcheck(Healthcheck {
                            test: Some(maybe_json(args).map_err(err)?),
                            interval_ns: flags.duration("interval").map_err(err)?,
                            timeout_ns: flags.duration("timeout").map_err(err)?,
                            start_period_ns: flags.duration("start-period").map_err(err)?,
                            start_interval_ns: flags.duration("start-interval").map_err(err)?,
                            retries,
                        })
                    }
                    _ => {
                        return Err(err(format!(
                            "unknown type {kind:?}: HEALTHCHECK takes CMD or NONE"
                        )));
                    }
                }
            }
            "SHELL" => match json_args(rest).map_err(err)? {
                Some(args) if args.is_empty() => {
                    return Err(err("requires at least one argument".to_string()));
                }
                Some(args) => Kind::Shell(args),
                None => {
                    return Err(err(
                        "requires the arguments in JSON form, like SHELL [\"/bin/sh\", \"-c\"]"
                            .to_string(),
                    ));
                }
            },
            _ => return Err(self.error(line, kw, "unknown instruction")),
        };
        Ok(Parsed::Instruction(Instruction {
            line,
            original,
            kind,
        }))
    }
}

/// Recognises a parser directive line (`# key=value`): the lower-cased key and the value.
fn directive(line: &str) -> Option<(String, &str)> {
    let rest = line.trim_start().strip_prefix('#')?;
    let rest = rest.trim_start_matches([' ', '\t']);
    let key_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    if !rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let (key, rest) = rest.split_at(key_len);
    let value = rest
        .trim_start_matches([' ', '\t'])
        .strip_prefix('=')?
        .trim_matches([' ', '\t']);
    if value.is_empty() {
        return None;
    }
    Some((key.to_ascii_lowercase(), value))
}

/// Removes a trailing escape character (and any spaces or tabs after it): the line continues
/// on the next one.
///
/// As in docker, an escape preceded by another escape (`foo \\`) is no continuation.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let trimmed = line.trim_end_matches([' ', '\t']);
    match trimmed.strip_suffix(escape) {
        Some(text) if !text.ends_with(escape) => (text, true),
        _ => (line, false),
    }
}

/// The text up to the first whitespace.
fn first_word(text: &str) -> &str {
    let end = text.find(char::is_whitespace).unwrap_or(text.len());
    &text[..end]
}

/// Whether `name` (lower case) is a valid `AS` name.
fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// The flags an instruction takes.
fn allowed_flags(keyword: &str) -> &'static [&'static str] {
    match keyword {
        "FROM" => &["platform"],
        "COPY" => &["from", "chown", "chmod", "link"],
        "ADD" => &["chown", "chmod", "link"],
        "HEALTHCHECK" => &[
            "interval",
            "timeout",
            "start-period",
            "start-interval",
            "retries",
        ],
        _ => &[],
    }
}

/// An instruction's parsed `--name[=value]` flags.
struct Flags(Vec<(String, Option<String>)>);

impl Flags {
    fn parse(words: &[String], keyword: &str, allowed: &[&str]) -> Result<Flags, String> {
        let mut flags: Vec<(String, Option<String>)> = Vec::new();
        for word in words {
            let word = word.trim_start_matches('-');
            let (name, value) = match word.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (word, None),
            };
            if keyword == "RUN" {
                return Err(format!(
                    "`--{name}` is not supported: berth's builder runs RUN without BuildKit's \
                     --mount, --network and --security flags"
                ));
            }
            if !allowed.contains(&name) {
                return Err(match allowed {
                    [] => format!("unknown flag `--{name}`: {keyword} takes no flags"),
                    _ => format!(
                        "unknown flag `--{name}`: {keyword} takes --{}",
                        allowed.join(", --")
                    ),
                });
            }
            if flags.iter().any(|(n, _)| n == name) {
                return Err(format!("the flag `--{name}` is given twice"));
            }
            // `--link` is a boolean; the others need a value.
            if name != "link" && value.as_deref().is_none_or(str::is_empty) {
                return Err(format!("the flag `--{name}` needs a value: --{name}=…"));
            }
            flags.push((name.to_string(), value));
        }
        Ok(Flags(flags))
    }

    fn value(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.clone())
    }

    /// A duration flag in ns, 0 when absent. Docker refuses non-zero values under 1ms.
    fn duration(&self, name: &str) -> Result<i64, String> {
        let Some(value) = self.value(name) else {
            return Ok(0);
        };
        let ns = parse_duration(&value).map_err(|e| format!("--{name}: {e}"))?;
        if ns != 0 && ns < 1_000_000 {
            return Err(format!("--{name}={value} is too short: the minimum is 1ms"));
        }
        Ok(ns)
    }
}

/// Splits the leading `--flag` words off `rest` (raw, as written), as docker does: flags end at
/// the first word not starting with `--`, or after a lone `--`.
fn extract_flags(rest: &str, escape: char) -> (Vec<String>, &str) {
    let mut flags = Vec::new();
    let mut rest = rest.trim_start();
    while rest.starts_with("--") {
        let (word, after) = next_word(rest, escape);
        rest = after.trim_start();
        if word == "--" {
            break;
        }
        flags.push(word);
    }
    (flags, rest)
}

/// Splits `text` into whitespace-separated words, as docker's `parseWords` does: quotes and
/// escapes group characters but are kept in the words.
fn parse_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let (word, after) = next_word(rest, escape);
        words.push(word);
        rest = after.trim_start();
    }
    words
}

/// The raw word at the start of `text` (which starts with a non-space), and what follows it.
fn next_word(text: &str, escape: char) -> (String, &str) {
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match quote {
            None if c.is_whitespace() => return (word, &text[i..]),
            None if c == escape => {
                // An escape at the very end is dropped.
                if let Some((_, next)) = chars.next() {
                    word.push(c);
                    word.push(next);
                }
            }
            None => {
                if c == '\'' || c == '"' {
                    quote = Some(c);
                }
                word.push(c);
            }
            Some(q) if c == q => {
                quote = None;
                word.push(c);
            }
            Some(q) if c == escape && q != '\'' => {
                if let Some((_, next)) = chars.next() {
                    word.push(c);
                    word.push(next);
                }
            }
            Some(_) => word.push(c),
        }
    }
    (word, "")
}

/// Parses ENV and LABEL arguments: `k=v k2="v 2"`, or the legacy `k value with spaces`.
fn name_values(rest: &str, escape: char, keyword: &str) -> Result<Vec<(String, String)>, String> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Err("requires at least one argument".to_string());
    };
    if !first.contains('=') {
        let name = first_word(rest);
        let value = rest[name.len()..].trim();
        if value.is_empty() {
            return Err(format!(
                "{name:?} has no value: write {keyword} {name}=value (or {keyword} {name} value)"
            ));
        }
        return Ok(vec![(name.to_string(), value.to_string())]);
    }
    let mut pairs = Vec::new();
    for word in words {
        let Some((name, value)) = word.split_once('=') else {
            return Err(format!(
                "{word:?} has no `=`: each argument must be of the form name=value"
            ));
        };
        if name.is_empty() {
            return Err(format!("{word:?} has no name before its `=`"));
        }
        pairs.push((name.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Exec form when `rest` is a JSON array of strings, shell form otherwise.
fn maybe_json(rest: &str) -> Result<Command, String> {
    Ok(match json_args(rest)? {
        Some(args) => Command::Exec(args),
        None => Command::Shell(rest.trim().to_string()),
    })
}

/// A heredoc marker found on an instruction line.
struct Marker {
    name: String,
    expand: bool,
    strip_tabs: bool,
}

/// Recognises a heredoc marker word (`<<EOF`, `<<-EOF`, `<<'EOF'`, `<<"EOF"`, `3<<EOF`), as
/// written.
fn heredoc_marker(word: &str) -> Option<Marker> {
    // An optional file descriptor comes first: `3<<EOF`.
    let rest = word.trim_start_matches(|c: char| c.is_ascii_digit());
    let rest = rest.strip_prefix("<<")?;
    let (strip_tabs, rest) = match rest.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    if rest.contains('<') {
        return None;
    }
    let quoted = rest.contains(['\'', '"']);
    let name = expand(rest, '\\', &|_| None).ok()?;
    if name.is_empty() {
        return None;
    }
    Some(Marker {
        name,
        expand: !quoted,
        strip_tabs,
    })
}

/// Docker's message for a JSON array that holds something other than strings.
const NOT_STRINGS: &str =
    "when using JSON array syntax, the array must hold only strings (quote every element)";

/// The rest of a line read as JSON.
#[derive(Debug, PartialEq, Eq)]
enum Json {
    /// A JSON array of strings: exec form.
    Strings(Vec<String>),
    /// A valid JSON array holding something else: docker refuses it rather than falling back
    /// to shell form.
    NotStrings,
    /// Not a JSON array: shell form.
    No,
}

/// The exec-form arguments in `rest`, `None` for shell form, or the error for a JSON array
/// that holds non-strings.
fn json_args(rest: &str) -> Result<Option<Vec<String>>, String> {
    match parse_json_array(rest) {
        Json::Strings(args) => Ok(Some(args)),
        Json::No => Ok(None),
        Json::NotStrings => Err(NOT_STRINGS.to_string()),
    }
}

type JsonChars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

fn json_ws(chars: &mut JsonChars<'_>) {
    while chars
        .next_if(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
        .is_some()
    {}
}

/// Reads `text` (surrounding whitespace allowed) as a JSON array.
fn parse_json_array(text: &str) -> Json {
    let mut chars = text.trim().chars().peekable();
    if chars.next() != Some('[') {
        return Json::No;
    }
    let mut items = Vec::new();
    let mut only_strings = true;
    json_ws(&mut chars);
    if chars.next_if_eq(&']').is_none() {
        loop {
            json_ws(&mut chars);
            if chars.peek() == Some(&'"') {
                match json_string(&mut chars) {
                    Some(item) => items.push(item),
                    None => return Json::No,
                }
            } else {
                if json_skip_value(&mut chars).is_none() {
                    return Json::No;
                }
                only_strings = false;
            }
            json_ws(&mut chars);
            match chars.next() {
                Some(',') => continue,
                Some(']') => break,
                _ => return Json::No,
            }
        }
    }
    json_ws(&mut chars);
    match (chars.next(), only_strings) {
        (Some(_), _) => Json::No,
        (None, true) => Json::Strings(items),
        (None, false) => Json::NotStrings,
    }
}

/// Skips one JSON value of any type; `None` when it is malformed.
fn json_skip_value(chars: &mut JsonChars<'_>) -> Option<()> {
    match *chars.peek()? {
        '"' => json_string(chars).map(drop),
        '[' | '{' => {
            let close = if chars.next()? == '[' { ']' } else { '}' };
            json_ws(chars);
            if chars.next_if_eq(&close).is_some() {
                return Some(());
            }
            loop {
                json_ws(chars);
                if close == '}' {
                    json_string(chars)?;
                    json_ws(chars);
                    if chars.next()? != ':' {
                        return None;
                    }
                    json_ws(chars);
                }
                json_skip_value(chars)?;
                json_ws(chars);
                match chars.next()? {
                    ',' => continue,
                    c if c == close => return Some(()),
                    _ => return None,
                }
            }
        }
        't' => json_literal(chars, "true"),
        'f' => json_literal(chars, "false"),
        'n' => json_literal(chars, "null"),
        _ => json_number(chars),
    }
}

fn json_literal(chars: &mut JsonChars<'_>, word: &str) -> Option<()> {
    for expected in word.chars() {
        if chars.next()? != expected {
            return None;
        }
    }
    Some(())
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
fn json_number(chars: &mut JsonChars<'_>) -> Option<()> {
    let digits = |chars: &mut JsonChars<'_>| {
        let mut n = 0;
        while chars.next_if(char::is_ascii_digit).is_some() {
            n += 1;
        }
        n
    };
    chars.next_if_eq(&'-');
    if chars.next_if_eq(&'0').is_none() && digits(chars) == 0 {
        return None;
    }
    if chars.next_if_eq(&'.').is_some() && digits(chars) == 0 {
        return None;
    }
    if chars.next_if(|c| matches!(c, 'e' | 'E')).is_some() {
        chars.next_if(|c| matches!(c, '+' | '-'));
        if digits(chars) == 0 {
            return None;
        }
    }
    Some(())
}

/// One JSON string literal, starting at its opening quote.
fn json_string(chars: &mut JsonChars<'_>) -> Option<String> {
    if chars.next()? != '"' {
        return None;
    }
    let mut out = String::new();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                '"' => out.push('"'),
                '\\' => out.push('\\'),
                '/' => out.push('/'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'u' => {
                    let high = json_hex4(chars)?;
                    let code = if (0xD800..0xDC00).contains(&high) {
                        // A surrogate pair; a lone half becomes U+FFFD as in Go.
                        let mut ahead = chars.clone();
                        let low = (ahead.next() == Some('\\') && ahead.next() == Some('u'))
                            .then(|| json_hex4(&mut ahead))
                            .flatten()
                            .filter(|low| (0xDC00..0xE000).contains(low));
                        match low {
                            Some(low) => {
                                *chars = ahead;
                                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                            }
                            None => 0xFFFD,
                        }
                    } else {
                        high
                    };
                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
                _ => return None,
            },
            c if (c as u32) < 0x20 => return None,
            c => out.push(c),
        }
    }
}

fn json_hex4(chars: &mut JsonChars<'_>) -> Option<u32> {
    let mut value = 0;
    for _ in 0..4 {
        value = value * 16 + chars.next()?.to_digit(16)?;
    }
    Some(value)
}

/// Docker's shell-word lexer (`ProcessWord`), over one word.
struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    escape: char,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes up to one of `stops` (consumed and returned; `}` ends a modifier's word) or,
    /// with no stops, the end of the word. `raw_escapes` keeps unquoted escapes (for patterns,
    /// where `\*` must stay a literal `*`).
    fn word(
        &mut self,
        stops: &[char],
        raw_escapes: bool,
    ) -> Result<(String, Option<char>), String> {
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return match stops {
                    [] => Ok((out, None)),
                    _ => Err("syntax error: missing '}'".to_string()),
                };
            };
            if stops.contains(&c) {
                self.pos += 1;
                return Ok((out, Some(c)));
            }
            match c {
                '\'' => out.push_str(&self.single_quoted()?),
                '"' => out.push_str(&self.double_quoted()?),
                '$' => out.push_str(&self.dollar()?),
                _ => {
                    self.pos += 1;
                    if c == self.escape {
                        // An escape at the very end is dropped.
                        if let Some(next) = self.next() {
                            if raw_escapes {
                                out.push(c);
                            }
                            out.push(next);
                        }
                    } else {
                        out.push(c);
                    }
                }
            }
        }
    }

    fn single_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.next() {
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .to_string(),
                    );
                }
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .to_string(),
                    );
                }
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) => {
                    self.pos += 1;
                    if c == self.escape {
                        match self.peek() {
                            // Only `"`, `$` and the escape itself can be escaped; any other
                            // escape stays as written.
                            Some(next) if next == '"' || next == '$' || next == self.escape => {
                                self.pos += 1;
                                out.push(next);
                            }
                            Some(_) => out.push(c),
                            None => {}
                        }
                    } else {
                        out.push(c);
                    }
                }
            }
        }
    }

    /// A name after `$`: letters, digits and `_`, or only digits when it starts with one.
    fn name(&mut self) -> String {
        let mut name = String::new();
        if self.peek().is_some_and(|c| c.is_ascii_digit()) {
            while let Some(c) = self.peek().filter(char::is_ascii_digit) {
                name.push(c);
                self.pos += 1;
            }
            return name;
        }
        while let Some(c) = self.peek().filter(|c| c.is_alphanumeric() || *c == '_') {
            name.push(c);
            self.pos += 1;
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok((self.lookup)(&name).unwrap_or_default());
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("syntax error: missing '}'".to_string()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".to_string()),
            Some(_) => {}
        }
        let name = self.name();
        let value = (self.lookup)(&name);
        match self.next() {
            None => Err("syntax error: missing '}'".to_string()),
            Some('}') if !name.is_empty() => Ok(value.unwrap_or_default()),
            Some(c) if !name.is_empty() && matches!(c, ':' | '-' | '+' | '?') => {
                let null_is_unset = c == ':';
                let op = if null_is_unset { self.next() } else { Some(c) };
                let op = match op {
                    Some(op @ ('-' | '+' | '?')) => op,
                    Some(other) => {
                        return Err(format!(
                            "unsupported modifier (:{other}) in substitution of ${{{name}}}"
                        ));
                    }
                    None => return Err("syntax error: missing '}'".to_string()),
                };
                let (word, _) = self.word(&['}'], false)?;
                let unset = match &value {
                    None => true,
                    Some(v) => null_is_unset && v.is_empty(),
                };
                match op {
                    '-' if unset => Ok(word),
                    '-' => Ok(value.unwrap_or_default()),
                    '+' if unset => Ok(String::new()),
                    '+' => Ok(word),
                    _ if unset => {
                        let message = match (word.is_empty(), value.is_none()) {
                            (false, _) => word,
                            (true, true) => "is not allowed to be unset".to_string(),
                            (true, false) => "is not allowed to be empty".to_string(),
                        };
                        Err(format!("{name}: {message}"))
                    }
                    _ => Ok(value.unwrap_or_default()),
                }
            }
            Some(op @ ('#' | '%')) if !name.is_empty() => {
                // `#`/`%` remove the shortest matching prefix/suffix, `##`/`%%` the longest.
                let longest = self.peek() == Some(op);
                if longest {
                    self.pos += 1;
                }
                let (pattern, _) = self.word(&['}'], true)?;
                let pattern = shell_pattern(&pattern, self.escape);
                let value: Vec<char> = value.unwrap_or_default().chars().collect();
                check_pattern_work(&name, value.len(), pattern.len())?;
                let n = value.len();
                let cut = if op == '#' {
                    let mut ends: Vec<usize> = (0..=n).collect();
                    if longest {
                        ends.reverse();
                    }
                    ends.into_iter()
                        .find(|&end| glob(&pattern, &value[..end]))
                        .map(|end| value[end..].iter().collect())
                } else {
                    let mut starts: Vec<usize> = (0..=n).rev().collect();
                    if longest {
                        starts.reverse();
                    }
                    starts
                        .into_iter()
                        .find(|&start| glob(&pattern, &value[start..]))
                        .map(|start| value[..start].iter().collect())
                };
                Ok(cut.unwrap_or_else(|| value.iter().collect()))
            }
            Some('/') if !name.is_empty() => {
                // `${VAR/pattern/replacement}` replaces the first match, `//` every match.
                let all = self.peek() == Some('/');
                if all {
                    self.pos += 1;
                }
                let (pattern, stop) = self.word(&['/', '}'], true)?;
                let replacement = match stop {
                    Some('/') => self.word(&['}'], false)?.0,
                    _ => String::new(),
                };
                let pattern = shell_pattern(&pattern, self.escape);
                let value: Vec<char> = value.unwrap_or_default().chars().collect();
                check_pattern_work(&name, value.len(), pattern.len())?;
                Ok(replace(&value, &pattern, &replacement, all))
            }
            Some(c) if !name.is_empty() => Err(format!(
                "unsupported modifier ({c}) in substitution of ${{{name}}}"
            )),
            Some(_) => Err("syntax error: bad substitution".to_string()),
        }
    }
}

/// One piece of a shell pattern (`${VAR#pattern}`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Glob {
    /// A character as is.
    Literal(char),
    /// `?`.
    One,
    /// `*`: any run of characters, `/` included.
    Any,
    /// `[…]`, `[!…]` or `[^…]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// Compiles a shell pattern; `escape` makes the next character literal. An unclosed `[` is a
/// literal `[`, as in the shell.
fn shell_pattern(pattern: &str, escape: char) -> Vec<Glob> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            _ if c == escape && i < chars.len() => {
                out.push(Glob::Literal(chars[i]));
                i += 1;
            }
            '*' => out.push(Glob::Any),
            '?' => out.push(Glob::One),
            '[' => match shell_class(&chars, i) {
                Some((class, end)) => {
                    out.push(class);
                    i = end;
                }
                None => out.push(Glob::Literal('[')),
            },
            _ => out.push(Glob::Literal(c)),
        }
    }
    out
}

/// A `[…]` class whose body starts at `chars[start]`, and the index after its `]`.
fn shell_class(chars: &[char], start: usize) -> Option<(Glob, usize)> {
    let mut i = start;
    let negated = matches!(chars.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let first = i;
    loop {
        let c = *chars.get(i)?;
        // A `]` right after the opening is a member, not the end.
        if c == ']' && i > first {
            return Some((Glob::Class { negated, ranges }, i + 1));
        }
        i += 1;
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
            ranges.push((c, chars[i + 1]));
            i += 2;
        } else {
            ranges.push((c, c));
        }
    }
}

/// Whether `pattern` matches all of `text`.
fn glob(pattern: &[Glob], text: &[char]) -> bool {
    // matches[j]: whether the pattern so far matches text[..j].
    let mut matches = vec![false; text.len() + 1];
    matches[0] = true;
    for token in pattern {
        let mut next = vec![false; text.len() + 1];
        match token {
            Glob::Any => {
                let mut any = false;
                for j in 0..=text.len() {
                    any |= matches[j];
                    next[j] = any;
                }
            }
            _ => {
                for j in 0..text.len() {
                    if !matches[j] {
                        continue;
                    }
                    let c = text[j];
                    next[j + 1] = match token {
                        Glob::Literal(l) => *l == c,
                        Glob::One => true,
                        Glob::Class { negated, ranges } => {
                            ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != *negated
                        }
                        Glob::Any => unreachable!("handled above"),
                    };
                }
            }
        }
        matches = next;
    }
    matches[text.len()]
}

/// Replaces the first (or, with `all`, every) leftmost-longest match of `pattern` in `value`.
/// Longest value a `#`, `%` or `/` substitution works on: their matching is polynomial in it,
/// and a builder must not spend minutes on one word.
pub const MAX_PATTERN_VALUE: usize = 4096;

/// Refuses a pattern substitution on a value or pattern too long to match in reasonable time.
fn check_pattern_work(name: &str, value: usize, pattern: usize) -> Result<(), String> {
    if value > MAX_PATTERN_VALUE || pattern > MAX_PATTERN_VALUE {
        return Err(format!(
            "${{{name}}}: pattern substitution on more than {MAX_PATTERN_VALUE} characters is refused"
        ));
    }
    Ok(())
}

fn replace(value: &[char], pattern: &[Glob], replacement: &str, all: bool) -> String {
    let mut out = String::new();
    let mut i = 0;
    let mut replaced = false;
    while i <= value.len() {
        let found = if replaced && !all {
            None
        } else {
            (i..=value.len())
                .rev()
                .find(|&end| glob(pattern, &value[i..end]))
        };
        match found {
            Some(end) => {
                out.push_str(replacement);
                replaced = true;
                if end > i {
                    i = end;
                    continue;
                }
            }
            None if replaced && !all => {
                out.extend(&value[i..]);
                return out;
            }
            None => {}
        }
        if let Some(c) = value.get(i) {
            out.push(*c);
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn parse_ok(text: &str) -> Dockerfile {
        match parse("Dockerfile", text) {
            Ok(df) => df,
            Err(e) => panic!("parse failed: {e}\n{text}"),
        }
    }

    fn parse_err(text: &str) -> ParseError {
        match parse("Dockerfile", text) {
            Ok(df) => panic!("parse succeeded: {df:?}\n{text}"),
            Err(e) => e,
        }
    }

    /// The instructions of the only stage of `FROM scratch\n{body}`.
    fn body(text: &str) -> Vec<Instruction> {
        let df = parse_ok(&format!("FROM scratch\n{text}"));
        assert_eq!(df.stages.len(), 1);
        df.stages
            .into_iter()
            .next()
            .expect("one stage")
            .instructions
    }

    fn one(text: &str) -> Instruction {
        let mut instructions = body(text);
        assert_eq!(instructions.len(), 1, "{instructions:?}");
        instructions.remove(0)
    }

    fn kind(text: &str) -> Kind {
        one(text).kind
    }

    fn strings(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    fn shell(text: &str) -> Command {
        Command::Shell(text.to_string())
    }

    fn exec(words: &[&str]) -> Command {
        Command::Exec(strings(words))
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn body_err(text: &str) -> ParseError {
        parse_err(&format!("FROM scratch\n{text}"))
    }

    /// Asserts `text` (after a `FROM scratch` line) fails on line 2 in `instruction` with a
    /// message containing `needle`.
    fn assert_body_err(text: &str, instruction: &str, needle: &str) {
        let e = body_err(text);
        assert_eq!(e.file, "Dockerfile");
        assert_eq!(e.line, 2, "{e}");
        assert_eq!(e.instruction, instruction, "{e}");
        assert!(e.message.contains(needle), "{e:?} lacks {needle:?}");
        assert_message_style(&e.message);
    }

    /// Messages start lower case (or with a quote, flag or keyword) and have no trailing
    /// period.
    fn assert_message_style(message: &str) {
        let first = message.chars().next().expect("empty message");
        let keyword = message
            .split(' ')
            .next()
            .is_some_and(|w| w.len() > 1 && w.chars().all(|c| c.is_ascii_uppercase()));
        assert!(
            !first.is_uppercase() || keyword,
            "message starts upper case: {message}"
        );
        assert!(
            !message.ends_with('.'),
            "message ends with a period: {message}"
        );
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn ex(word: &str, vars: &[(&str, &str)]) -> String {
        let lookup = env(vars);
        match expand(word, '\\', &lookup) {
            Ok(s) => s,
            Err(e) => panic!("expand({word:?}) failed: {e}"),
        }
    }

    fn ex_err(word: &str, vars: &[(&str, &str)]) -> String {
        let lookup = env(vars);
        match expand(word, '\\', &lookup) {
            Ok(s) => panic!("expand({word:?}) gave {s:?}"),
            Err(e) => e,
        }
    }

    // ---- stages and FROM ----

    #[test]
    fn from_plain_named_and_platform() {
        let df = parse_ok(
            "FROM alpine:3.20\nRUN true\nfrom --platform=$BUILDPLATFORM golang AS Build\n\
             FROM build as final\n",
        );
        assert_eq!(df.escape, '\\');
        assert!(df.notes.is_empty());
        assert_eq!(df.stages.len(), 3);
        let s = &df.stages[0];
        assert_eq!(
            (s.line, s.base.as_str(), &s.name, &s.platform),
            (1, "alpine:3.20", &None, &None)
        );
        assert_eq!(s.instructions.len(), 1);
        let s = &df.stages[1];
        assert_eq!(s.line, 3);
        assert_eq!(s.base, "golang");
        assert_eq!(s.name.as_deref(), Some("build"));
        assert_eq!(s.platform.as_deref(), Some("$BUILDPLATFORM"));
        assert!(s.instructions.is_empty());
        assert_eq!(df.stages[2].name.as_deref(), Some("final"));
        assert_eq!(df.stages[2].base, "build");
    }

    #[test]
    fn from_errors() {
        let e = parse_err("FROM a b\n");
        assert_eq!((e.line, e.instruction.as_str()), (1, "FROM"));
        assert!(e.message.contains("one argument, or three"), "{e}");
        let e = parse_err("FROM a AS\n");
        assert!(e.message.contains("one argument, or three"), "{e}");
        let e = parse_err("FROM a AS 1x\n");
        assert!(e.message.contains("invalid stage name \"1x\""), "{e}");
        let e = parse_err("FROM --platform linux/amd64 a\n");
        assert!(e.message.contains("--platform` needs a value"), "{e}");
        let e = parse_err("FROM --foo=bar a\n");
        assert!(e.message.contains("unknown flag `--foo`"), "{e}");
        let e = parse_err("FROM\n");
        assert_eq!(
            e.to_string(),
            "Dockerfile:1: FROM: requires at least one argument"
        );
    }

    #[test]
    fn duplicate_stage_names_are_refused() {
        let e = parse_err("FROM a AS build\nRUN x\nFROM b as BUILD\n");
        assert_eq!((e.line, e.instruction.as_str()), (3, "FROM"));
        assert!(
            e.message
                .contains("\"build\" is already used by the stage on line 1"),
            "{e}"
        );
        assert_eq!(parse_ok("FROM a\nFROM a\nFROM b AS x\n").stages.len(), 3);
    }

    #[test]
    fn meta_args_before_from() {
        let df = parse_ok("ARG VERSION=3.20 EXTRA\nARG BASE\nFROM alpine:$VERSION\nARG VERSION\n");
        assert_eq!(
            df.meta_args,
            vec![
                ArgDecl {
                    name: "VERSION".into(),
                    default: Some("3.20".into())
                },
                ArgDecl {
                    name: "EXTRA".into(),
                    default: None
                },
                ArgDecl {
                    name: "BASE".into(),
                    default: None
                },
            ]
        );
        assert_eq!(df.stages[0].base, "alpine:$VERSION");
        assert_eq!(
            df.stages[0].instructions[0].kind,
            Kind::Arg(vec![ArgDecl {
                name: "VERSION".into(),
                default: None
            }])
        );
    }

    #[test]
    fn instruction_before_from_is_refused() {
        let e = parse_err("# hi\n\nRUN echo\nFROM x\n");
        assert_eq!((e.line, e.instruction.as_str()), (3, "RUN"));
        assert!(e.message.contains("before the first FROM"), "{e}");
        assert_eq!(
            e.to_string(),
            "Dockerfile:3: RUN: comes before the first FROM: only ARG may precede FROM"
        );
    }

    #[test]
    fn empty_files_have_no_from() {
        for text in ["", "\n\n", "# just a comment\n", "ARG A=1\n", "\u{feff}"] {
            let e = parse_err(text);
            assert_eq!(e.line, 0, "{text:?}");
            assert_eq!(e.instruction, "");
            assert!(e.message.contains("has no FROM"), "{e}");
            assert_eq!(e.to_string(), format!("Dockerfile: {}", e.message));
        }
    }

    #[test]
    fn unknown_instruction() {
        let e = body_err("\n  FOO bar\n");
        assert_eq!((e.line, e.instruction.as_str()), (3, "FOO"));
        assert_eq!(e.to_string(), "Dockerfile:3: FOO: unknown instruction");
        let e = parse_err("FORM alpine\n");
        assert_eq!((e.line, e.instruction.as_str()), (1, "FORM"));
    }

    #[test]
    fn keywords_are_case_insensitive() {
        let instrs = body("run a\nCmd b\nexpose 80\nworkdir /x\n");
        let keywords: Vec<&str> = instrs.iter().map(|i| i.keyword()).collect();
        assert_eq!(keywords, ["RUN", "CMD", "EXPOSE", "WORKDIR"]);
        assert_eq!(instrs[0].original, "RUN a");
        assert_eq!(instrs[3].original, "WORKDIR /x");
    }

    // ---- RUN, CMD, ENTRYPOINT ----

    #[test]
    fn run_shell_and_exec_forms() {
        let i = one("RUN   apk add --no-cache curl  ");
        assert_eq!(i.line, 2);
        assert_eq!(i.original, "RUN apk add --no-cache curl");
        assert_eq!(
            i.kind,
            Kind::Run {
                command: shell("apk add --no-cache curl"),
                heredocs: vec![]
            }
        );
        assert_eq!(
            kind(r#"RUN ["echo", "a b", "c\"d\\e\u00e9\n"]"#),
            Kind::Run {
                command: exec(&["echo", "a b", "c\"d\\e\u{e9}\n"]),
                heredocs: vec![]
            }
        );
        assert_eq!(
            kind("RUN []"),
            Kind::Run {
                command: exec(&[]),
                heredocs: vec![]
            }
        );
    }

    #[test]
    fn run_not_json_falls_back_to_shell_form() {
        for text in [
            "[ -f /etc/x ] && echo yes",
            r#"["echo" "hi"]"#,
            r#"["echo", "hi"] extra"#,
            r#"["echo", 'hi']"#,
            r#"["unterminated"#,
            r#"["bad \q escape"]"#,
        ] {
            assert_eq!(
                kind(&format!("RUN {text}")),
                Kind::Run {
                    command: shell(text),
                    heredocs: vec![]
                },
                "{text}"
            );
        }
    }

    #[test]
    fn run_flags_are_refused() {
        assert_body_err(
            "RUN --mount=type=cache,target=/root/.cache go build",
            "RUN",
            "`--mount` is not supported",
        );
        assert_body_err(
            "RUN --network=none true",
            "RUN",
            "`--network` is not supported",
        );
        // A `--` word after the command is the command's.
        assert_eq!(
            kind("RUN ls -- --x"),
            Kind::Run {
                command: shell("ls -- --x"),
                heredocs: vec![]
            }
        );
    }

    #[test]
    fn cmd_and_entrypoint() {
        assert_eq!(
            kind(r#"CMD ["nginx", "-g", "daemon off;"]"#),
            Kind::Cmd(exec(&["nginx", "-g", "daemon off;"]))
        );
        assert_eq!(
            kind("CMD nginx -g 'daemon off;'"),
            Kind::Cmd(shell("nginx -g 'daemon off;'"))
        );
        assert_eq!(
            kind("ENTRYPOINT [\"/init\"]"),
            Kind::Entrypoint(exec(&["/init"]))
        );
        assert_eq!(
            kind("entrypoint exec /init \"$@\""),
            Kind::Entrypoint(shell("exec /init \"$@\""))
        );
        assert_body_err("CMD", "CMD", "requires at least one argument");
        assert_body_err(
            "CMD --help",
            "CMD",
            "unknown flag `--help`: CMD takes no flags",
        );
    }

    // ---- continuations, comments ----

    #[test]
    fn continuations_are_joined() {
        let i = one("RUN apk add \\\n curl \\  \n\tjq\n");
        assert_eq!(i.original, "RUN apk add  curl \tjq");
        assert_eq!(
            i.kind,
            Kind::Run {
                command: shell("apk add  curl \tjq"),
                heredocs: vec![]
            }
        );
        let instrs = body("RUN a \\\n b\nRUN c\n");
        assert_eq!(instrs[1].line, 4);
    }

    #[test]
    fn comments_and_blank_lines_inside_a_continuation_are_skipped() {
        let instrs =
            body("RUN a \\\n# a comment\n   # indented comment\n\n   \n  b \\\n c\nUSER x\n");
        assert_eq!(instrs.len(), 2);
        assert_eq!(instrs[0].line, 2);
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("a   b  c"),
                heredocs: vec![]
            }
        );
        assert_eq!(instrs[1].line, 9);
        assert_eq!(instrs[1].kind, Kind::User("x".into()));
    }

    #[test]
    fn an_escaped_escape_at_end_of_line_is_no_continuation() {
        let instrs = body("RUN echo a\\\\\nUSER u\n");
        assert_eq!(instrs.len(), 2);
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("echo a\\\\"),
                heredocs: vec![]
            }
        );
        let instrs = body("RUN echo `\nUSER u\n");
        assert_eq!(instrs.len(), 2, "` is no escape by default");
        // A line holding only the escape continues.
        let instrs = body("RUN a \\\n\\\n b\n");
        assert_eq!(instrs.len(), 1);
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("a  b"),
                heredocs: vec![]
            }
        );
    }

    #[test]
    fn continuation_at_end_of_file() {
        assert_eq!(
            kind("RUN a \\"),
            Kind::Run {
                command: shell("a"),
                heredocs: vec![]
            }
        );
    }

    #[test]
    fn comments_only_at_line_start() {
        let instrs = body("# c1\n   # c2\nRUN echo # not a comment\n");
        assert_eq!(instrs.len(), 1);
        assert_eq!(instrs[0].line, 4);
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("echo # not a comment"),
                heredocs: vec![]
            }
        );
    }

    #[test]
    fn crlf_line_endings() {
        let df = parse_ok("FROM a\r\nRUN x \\\r\n y\r\n");
        assert_eq!(
            df.stages[0].instructions[0].kind,
            Kind::Run {
                command: shell("x  y"),
                heredocs: vec![]
            }
        );
    }

    // ---- directives ----

    #[test]
    fn escape_directive_backtick() {
        let df = parse_ok("# escape=`\nFROM windows\nRUN dir C:\\ `\n  /s\nCOPY a\\b c:\\x\\\n");
        assert_eq!(df.escape, '`');
        let instrs = &df.stages[0].instructions;
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("dir C:\\   /s"),
                heredocs: vec![]
            }
        );
        assert_eq!(instrs[0].original, "RUN dir C:\\   /s");
        // With ` as escape, a trailing backslash is no continuation.
        match &instrs[1].kind {
            Kind::Copy(c) => {
                assert_eq!(c.sources, ["a\\b"]);
                assert_eq!(c.dest, "c:\\x\\");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(instrs[1].line, 5);
    }

    #[test]
    fn directive_keys_are_case_insensitive_and_spacing_free() {
        let df = parse_ok("#ESCAPE = `\n#  Syntax=docker/dockerfile:1\n\nFROM a\n");
        assert_eq!(df.escape, '`');
        assert_eq!(
            df.notes,
            [
                "ignored the `# syntax=docker/dockerfile:1` directive: berth builds with its own frontend"
            ]
        );
    }

    #[test]
    fn syntax_directive_is_noted() {
        let df = parse_ok("# syntax=docker/dockerfile:1.7\nFROM a\n");
        assert_eq!(df.notes.len(), 1);
        assert!(df.notes[0].contains("`# syntax=docker/dockerfile:1.7`"));
        assert!(df.notes[0].contains("berth builds with its own frontend"));
    }

    #[test]
    fn directive_after_a_comment_instruction_or_blank_line_is_a_comment() {
        for text in [
            "# a comment\n# escape=`\nFROM a\nRUN x \\\n y\n",
            "\n# escape=`\nFROM a\nRUN x \\\n y\n",
            "FROM a\n# escape=`\nRUN x \\\n y\n",
            "# unknown=1\n# escape=`\nFROM a\nRUN x \\\n y\n",
            "# 1key=x\n# escape=`\nFROM a\nRUN x \\\n y\n",
            "# escape=\n# escape=`\nFROM a\nRUN x \\\n y\n",
        ] {
            let df = parse_ok(text);
            assert_eq!(df.escape, '\\', "{text}");
            assert!(df.notes.is_empty());
            assert_eq!(
                df.stages[0].instructions[0].kind,
                Kind::Run {
                    command: shell("x  y"),
                    heredocs: vec![]
                },
                "{text}"
            );
        }
        let df = parse_ok("# syntax=x\n# foo=bar\n# syntax=again\nFROM a\n");
        assert_eq!(df.notes.len(), 1);
    }

    #[test]
    fn directive_errors() {
        let e = parse_err("# escape=x\nFROM a\n");
        assert_eq!(e.line, 1);
        assert!(e.message.contains("invalid escape character \"x\""), "{e}");
        let e = parse_err("# escape=\\\n# escape=`\nFROM a\n");
        assert_eq!(e.line, 2);
        assert!(
            e.message.contains("only one `# escape=` parser directive"),
            "{e}"
        );
    }

    // ---- ENV, ARG, LABEL ----

    #[test]
    fn env_forms() {
        assert_eq!(
            kind(r#"ENV A=1 B="two words" C='x y' D=a\ b E="""#),
            Kind::Env(pairs(&[
                ("A", "1"),
                ("B", "\"two words\""),
                ("C", "'x y'"),
                ("D", "a\\ b"),
                ("E", "\"\"")
            ]))
        );
        assert_eq!(
            kind("ENV PATH /usr/local/bin:$PATH  x"),
            Kind::Env(pairs(&[("PATH", "/usr/local/bin:$PATH  x")]))
        );
        assert_eq!(
            kind("ENV A=1 \\\n    B=2"),
            Kind::Env(pairs(&[("A", "1"), ("B", "2")]))
        );
        assert_body_err("ENV A", "ENV", "\"A\" has no value");
        assert_body_err("ENV A=1 B", "ENV", "\"B\" has no `=`");
        assert_body_err("ENV =1", "ENV", "no name");
        assert_body_err("ENV", "ENV", "requires at least one argument");
    }

    #[test]
    fn arg_forms() {
        assert_eq!(
            kind("ARG a=1 b c=\"x y\" d="),
            Kind::Arg(vec![
                ArgDecl {
                    name: "a".into(),
                    default: Some("1".into())
                },
                ArgDecl {
                    name: "b".into(),
                    default: None
                },
                ArgDecl {
                    name: "c".into(),
                    default: Some("\"x y\"".into())
                },
                ArgDecl {
                    name: "d".into(),
                    default: Some(String::new())
                },
            ])
        );
        assert_body_err("ARG =x", "ARG", "has no name");
    }

    #[test]
    fn label_and_maintainer() {
        assert_eq!(
            kind(r#"LABEL "com.example.vendor"="ACME Inc" version=1.0 desc="a \"b\"""#),
            Kind::Label(pairs(&[
                ("\"com.example.vendor\"", "\"ACME Inc\""),
                ("version", "1.0"),
                ("desc", "\"a \\\"b\\\"\"")
            ]))
        );
        assert_eq!(
            kind("LABEL maintainer me <me@x.org>"),
            Kind::Label(pairs(&[("maintainer", "me <me@x.org>")]))
        );
        assert_eq!(
            kind("MAINTAINER Jane Doe <jane@x.org>"),
            Kind::Maintainer("Jane Doe <jane@x.org>".into())
        );
    }

    // ---- EXPOSE, WORKDIR, USER, VOLUME, STOPSIGNAL ----

    #[test]
    fn simple_instructions() {
        assert_eq!(
            kind("EXPOSE 80 443/udp  $PORT"),
            Kind::Expose(strings(&["80", "443/udp", "$PORT"]))
        );
        assert_eq!(kind("WORKDIR /my app"), Kind::Workdir("/my app".into()));
        assert_eq!(kind("USER app:app"), Kind::User("app:app".into()));
        assert_eq!(
            kind("STOPSIGNAL SIGTERM"),
            Kind::StopSignal("SIGTERM".into())
        );
        assert_body_err("WORKDIR", "WORKDIR", "requires at least one argument");
        assert_body_err("USER --x=1 a", "USER", "unknown flag");
    }

    #[test]
    fn volume_forms() {
        assert_eq!(
            kind(r#"VOLUME ["/a", "/b c"]"#),
            Kind::Volume(strings(&["/a", "/b c"]))
        );
        assert_eq!(kind("VOLUME /a  /b"), Kind::Volume(strings(&["/a", "/b"])));
        assert_body_err(
            r#"VOLUME ["/a", ""]"#,
            "VOLUME",
            "cannot be an empty string",
        );
        assert_body_err("VOLUME []", "VOLUME", "requires at least one argument");
    }

    // ---- COPY, ADD ----

    fn copy_args(text: &str) -> CopyArgs {
        match kind(text) {
            Kind::Copy(c) | Kind::Add(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn copy_forms_and_flags() {
        let c = copy_args("COPY --from=build --chown=app:app --chmod=0755 --link a b* /dst/");
        assert_eq!(c.sources, ["a", "b*"]);
        assert_eq!(c.dest, "/dst/");
        assert_eq!(c.from.as_deref(), Some("build"));
        assert_eq!(c.chown.as_deref(), Some("app:app"));
        assert_eq!(c.chmod.as_deref(), Some("0755"));
        assert!(c.heredocs.is_empty());
        let c = copy_args(r#"COPY ["a b", "c", "/dst/"]"#);
        assert_eq!(c.sources, ["a b", "c"]);
        assert_eq!(c.dest, "/dst/");
        assert_eq!(c.from, None);
        let c = copy_args("COPY --chown=\"1000:1000\" x y");
        assert_eq!(c.chown.as_deref(), Some("\"1000:1000\""));
        let c = copy_args("ADD --chown=1 https://example.com/x.tgz /opt/");
        assert_eq!(c.sources, ["https://example.com/x.tgz"]);
        assert!(matches!(kind("ADD a b"), Kind::Add(_)));
        assert!(matches!(kind("COPY a b"), Kind::Copy(_)));
    }

    #[test]
    fn copy_errors() {
        assert_body_err("COPY onlyone", "COPY", "at least two arguments");
        assert_body_err(r#"COPY ["onlyone"]"#, "COPY", "at least two arguments");
        assert_body_err("COPY", "COPY", "at least two arguments");
        assert_body_err(
            "COPY --from=x",
            "COPY",
            "requires at least one argument after its flags",
        );
        assert_body_err("COPY --parents a b", "COPY", "unknown flag `--parents`");
        assert_body_err("ADD --from=x a b", "ADD", "unknown flag `--from`");
        assert_body_err(
            "ADD --checksum=sha256:x a b",
            "ADD",
            "unknown flag `--checksum`",
        );
        assert_body_err("COPY --from a b", "COPY", "`--from` needs a value");
        assert_body_err("COPY --from=a --from=b c d", "COPY", "given twice");
    }

    // ---- heredocs ----

    fn doc(name: &str, content: &str, expand: bool, strip_tabs: bool) -> Heredoc {
        Heredoc {
            name: name.into(),
            content: content.into(),
            expand,
            strip_tabs,
        }
    }

    #[test]
    fn run_heredoc() {
        let instrs = body("RUN <<EOF\napk add curl\n  echo done\nEOF\nUSER x\n");
        assert_eq!(instrs.len(), 2);
        assert_eq!(instrs[0].original, "RUN <<EOF");
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("<<EOF"),
                heredocs: vec![doc("EOF", "apk add curl\n  echo done\n", true, false)],
            }
        );
        assert_eq!(instrs[1].line, 6);
    }

    #[test]
    fn run_heredoc_redirect_and_empty_body() {
        assert_eq!(
            kind("RUN cat <<EOF > /x\nEOF\n"),
            Kind::Run {
                command: shell("cat <<EOF > /x"),
                heredocs: vec![doc("EOF", "", true, false)]
            }
        );
    }

    #[test]
    fn heredoc_strip_tabs() {
        assert_eq!(
            kind("RUN <<-EOT\n\t\techo a\n\t  b\n\tEOT\n"),
            Kind::Run {
                command: shell("<<-EOT"),
                heredocs: vec![doc("EOT", "echo a\n  b\n", true, true)]
            }
        );
        // Without `-`, an indented delimiter does not end the body.
        let e = body_err("RUN <<EOT\necho\n\tEOT\n");
        assert_eq!((e.line, e.instruction.as_str()), (2, "RUN"));
        assert!(e.message.contains("unterminated heredoc"), "{e}");
    }

    #[test]
    fn quoted_heredoc_delimiters_are_not_expanded() {
        assert_eq!(
            kind("RUN <<'EOF'\necho $HOME\nEOF\n"),
            Kind::Run {
                command: shell("<<'EOF'"),
                heredocs: vec![doc("EOF", "echo $HOME\n", false, false)]
            }
        );
        assert_eq!(
            kind("RUN <<-\"END\"\n\tx\nEND\n"),
            Kind::Run {
                command: shell("<<-\"END\""),
                heredocs: vec![doc("END", "x\n", false, true)]
            }
        );
    }

    #[test]
    fn several_heredocs_on_one_line() {
        let instrs = body("RUN cat <<A <<B > /out\na1\nA\nb1\nb2\nB\nUSER u\n");
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("cat <<A <<B > /out"),
                heredocs: vec![
                    doc("A", "a1\n", true, false),
                    doc("B", "b1\nb2\n", true, false)
                ],
            }
        );
        assert_eq!(instrs[1].line, 8);
    }

    #[test]
    fn heredoc_markers_in_quotes_are_not_heredocs() {
        let instrs = body("RUN echo '<<EOF' \"<<X\"\nUSER u\n");
        assert_eq!(instrs.len(), 2);
        assert_eq!(
            instrs[0].kind,
            Kind::Run {
                command: shell("echo '<<EOF' \"<<X\""),
                heredocs: vec![]
            }
        );
        // Exec form has no heredocs.
        assert_eq!(
            kind("RUN [\"cat\", \"<<EOF\"]"),
            Kind::Run {
                command: exec(&["cat", "<<EOF"]),
                heredocs: vec![]
            }
        );
    }

    #[test]
    fn heredoc_after_a_continuation() {
        assert_eq!(
            kind("RUN python3 \\\n <<EOF\nprint(1)\nEOF\n"),
            Kind::Run {
                command: shell("python3  <<EOF"),
                heredocs: vec![doc("EOF", "print(1)\n", true, false)]
            }
        );
    }

    #[test]
    fn copy_heredocs() {
        let c = copy_args("COPY <<EOF /etc/motd\nhello\nEOF\n");
        assert!(c.sources.is_empty());
        assert_eq!(c.dest, "/etc/motd");
        assert_eq!(c.heredocs, [doc("EOF", "hello\n", true, false)]);
        let c = copy_args("COPY --chmod=644 <<a.txt <<'b.txt' /dir/\nA\na.txt\n$B\nb.txt\n");
        assert_eq!(c.dest, "/dir/");
        assert_eq!(c.chmod.as_deref(), Some("644"));
        assert_eq!(
            c.heredocs,
            [
                doc("a.txt", "A\n", true, false),
                doc("b.txt", "$B\n", false, false)
            ]
        );
        let c = copy_args("ADD <<EOF /x\ny\nEOF\n");
        assert_eq!(c.heredocs.len(), 1);
    }

    #[test]
    fn heredoc_body_lines_are_not_instructions_or_comments() {
        let instrs = body("RUN <<EOF\nFROM nope\n# kept\n\nEOF\n");
        assert_eq!(instrs.len(), 1);
        match &instrs[0].kind {
            Kind::Run { heredocs, .. } => assert_eq!(heredocs[0].content, "FROM nope\n# kept\n\n"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unterminated_heredoc() {
        let e = body_err("RUN <<EOF\necho hi\n");
        assert_eq!(e.line, 2);
        assert_eq!(e.instruction, "RUN");
        assert!(e.message.contains("unterminated heredoc"), "{e}");
        assert!(e.message.contains("`EOF`"), "{e}");
        let e = body_err("COPY <<A <<B /x\nA\n");
        assert_eq!((e.line, e.instruction.as_str()), (2, "COPY"));
        assert!(e.message.contains("`<<B`"), "{e}");
    }

    #[test]
    fn heredoc_with_a_file_descriptor() {
        assert_eq!(
            kind("RUN cat 3<<EOF\nx\nEOF\n"),
            Kind::Run {
                command: shell("cat 3<<EOF"),
                heredocs: vec![doc("EOF", "x\n", true, false)]
            }
        );
        // `<<` with no word, or a word holding `<`, is not a heredoc.
        assert_eq!(
            kind("RUN a << b"),
            Kind::Run {
                command: shell("a << b"),
                heredocs: vec![]
            }
        );
        assert_eq!(
            kind("RUN a <<b<c"),
            Kind::Run {
                command: shell("a <<b<c"),
                heredocs: vec![]
            }
        );
    }

    #[test]
    fn onbuild_trigger_with_a_heredoc() {
        let instrs = body("ONBUILD RUN <<EOF\nmake\nEOF\nUSER u\n");
        assert_eq!(instrs.len(), 2);
        let Kind::Onbuild(trigger) = &instrs[0].kind else {
            panic!("{instrs:?}")
        };
        assert_eq!(
            trigger.kind,
            Kind::Run {
                command: shell("<<EOF"),
                heredocs: vec![doc("EOF", "make\n", true, false)]
            }
        );
    }

    #[test]
    fn heredocs_only_for_run_copy_add() {
        assert_eq!(kind("CMD cat <<EOF"), Kind::Cmd(shell("cat <<EOF")));
    }

    // ---- ONBUILD ----

    #[test]
    fn onbuild_triggers() {
        let i = one("ONBUILD  copy --from=x . /app");
        assert_eq!(i.original, "ONBUILD copy --from=x . /app");
        let Kind::Onbuild(trigger) = i.kind else {
            panic!("{i:?}")
        };
        assert_eq!(trigger.line, 2);
        assert_eq!(trigger.original, "COPY --from=x . /app");
        assert_eq!(trigger.keyword(), "COPY");
        let Kind::Copy(c) = trigger.kind else {
            panic!()
        };
        assert_eq!(c.from.as_deref(), Some("x"));
        assert_eq!(c.sources, ["."]);
        assert_body_err("ONBUILD ONBUILD RUN x", "ONBUILD", "chaining ONBUILD");
        assert_body_err(
            "ONBUILD FROM x",
            "ONBUILD",
            "FROM isn't allowed as an ONBUILD trigger",
        );
        assert_body_err(
            "ONBUILD maintainer x",
            "ONBUILD",
            "MAINTAINER isn't allowed",
        );
        assert_body_err("ONBUILD", "ONBUILD", "requires at least one argument");
        assert_body_err("ONBUILD BOGUS x", "BOGUS", "unknown instruction");
    }

    #[test]
    fn parse_trigger_works() {
        let t = parse_trigger("image config", "RUN make", '\\').expect("should succeed");
        assert_eq!(
            t.kind,
            Kind::Run {
                command: shell("make"),
                heredocs: vec![]
            }
        );
        assert_eq!(t.original, "RUN make");
        let t = parse_trigger("image config", "RUN a `\n b", '`').expect("should succeed");
        assert_eq!(
            t.kind,
            Kind::Run {
                command: shell("a  b"),
                heredocs: vec![]
            }
        );
        let e = parse_trigger("image config", "ONBUILD RUN x", '\\').expect_err("should fail");
        assert!(e.message.contains("chaining ONBUILD"), "{e}");
        assert_eq!(e.file, "image config");
        let e = parse_trigger("c", "FROM x", '\\').expect_err("should fail");
        assert!(e.message.contains("FROM isn't allowed"), "{e}");
        let e = parse_trigger("c", "MAINTAINER x", '\\').expect_err("should fail");
        assert!(e.message.contains("MAINTAINER isn't allowed"), "{e}");
        let e = parse_trigger("c", "  ", '\\').expect_err("should fail");
        assert!(e.message.contains("empty"), "{e}");
        let e = parse_trigger("c", "RUN a\nRUN b", '\\').expect_err("should fail");
        assert!(e.message.contains("one instruction"), "{e}");
        // A heredoc marker in a trigger is left as text: there is no body to read.
        let t = parse_trigger("c", "RUN cat <<EOF", '\\').expect("should succeed");
        assert_eq!(
            t.kind,
            Kind::Run {
                command: shell("cat <<EOF"),
                heredocs: vec![]
            }
        );
    }

    // ---- HEALTHCHECK ----

    #[test]
    fn healthcheck_none_and_cmd() {
        assert_eq!(
            kind("HEALTHCHECK none"),
            Kind::Healthcheck(Healthcheck {
                test: None,
                interval_ns: 0,
                timeout_ns: 0,
                start_period_ns: 0,
                start_interval_ns: 0,
                retries: 0
            })
        );
        assert_eq!(
            kind(
                "HEALTHCHECK --interval=30s --timeout=1m30s --start-period=1.5s --start-interval=500ms --retries=3 \\\n  CMD curl -f http://localhost/ || exit 1"
            ),
            Kind::Healthcheck(Healthcheck {
                test: Some(shell("curl -f http://localhost/ || exit 1")),
                interval_ns: 30_000_000_000,
                timeout_ns: 90_000_000_000,
                start_period_ns: 1_500_000_000,
                start_interval_ns: 500_000_000,
                retries: 3,
            })
        );
        let Kind::Healthcheck(h) = kind(r#"HEALTHCHECK cmd ["/bin/check", "-q"]"#) else {
            panic!()
        };
        assert_eq!(h.test, Some(exec(&["/bin/check", "-q"])));
        assert_eq!(h.interval_ns, 0);
    }

    #[test]
    fn healthcheck_errors() {
        assert_body_err("HEALTHCHECK NONE x", "HEALTHCHECK", "takes no arguments");
        assert_body_err(
            "HEALTHCHECK --interval=5s NONE",
            "HEALTHCHECK",
            "cannot be used with HEALTHCHECK NONE",
        );
        assert_body_err("HEALTHCHECK CMD", "HEALTHCHECK", "needs a command");
        assert_body_err("HEALTHCHECK RUN x", "HEALTHCHECK", "takes CMD or NONE");
        assert_body_err(
            "HEALTHCHECK --interval=5 CMD x",
            "HEALTHCHECK",
            "a unit is missing",
        );
        assert_body_err(
            "HEALTHCHECK --interval=10us CMD x",
            "HEALTHCHECK",
            "the minimum is 1ms",
        );
        assert_body_err(
            "HEALTHCHECK --retries=-1 CMD x",
            "HEALTHCHECK",
            "cannot be negative",
        );
        assert_body_err(
            "HEALTHCHECK --retries=x CMD x",
            "HEALTHCHECK",
            "not a whole number",
        );
        assert_body_err(
            "HEALTHCHECK --foo=1 CMD x",
            "HEALTHCHECK",
            "unknown flag `--foo`",
        );
    }

    // ---- SHELL ----

    #[test]
    fn shell_requires_json() {
        assert_eq!(
            kind(r#"SHELL ["powershell", "-command"]"#),
            Kind::Shell(strings(&["powershell", "-command"]))
        );
        assert_body_err(
            "SHELL /bin/bash -c",
            "SHELL",
            "requires the arguments in JSON form",
        );
        assert_body_err(r#"SHELL ["/bin/bash", -c]"#, "SHELL", "JSON form");
        assert_body_err("SHELL []", "SHELL", "requires at least one argument");
    }

    #[test]
    fn json_array_parser() {
        let strings_of = |text: &str| match parse_json_array(text) {
            Json::Strings(items) => items,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(strings_of(" [ ] "), Vec::<String>::new());
        assert_eq!(strings_of("[\"a\",\"b\"]"), strings(&["a", "b"]));
        assert_eq!(
            strings_of("[\"\\ud83d\\ude00\\u0041\\/\"]"),
            strings(&["\u{1f600}A/"])
        );
        assert_eq!(strings_of("[\"\\ud83d\"]"), strings(&["\u{fffd}"]));
        for text in [
            "[\"a\",]",
            "[,]",
            "[\"a\"]]",
            "[\"a\tb\"]",
            "\"a\"",
            "",
            "[01]",
            "[1.]",
            "[-]",
            "[1e]",
            "[tru]",
            "[{\"a\" 1}]",
            "[{1: 2}]",
            "[[1,]]",
        ] {
            assert_eq!(parse_json_array(text), Json::No, "{text}");
        }
        for text in [
            "[null]",
            "[\"a\", 1]",
            "[true, false]",
            "[-1.5e+3, 0, 20]",
            "[[\"a\"], {}]",
            "[{\"k\": [1, {\"x\": null}]}]",
            "[\"a\", []]",
        ] {
            assert_eq!(parse_json_array(text), Json::NotStrings, "{text}");
        }
    }

    #[test]
    fn json_arrays_of_non_strings_are_refused() {
        for text in [
            r#"CMD ["echo", 1]"#,
            r#"ENTRYPOINT [true]"#,
            r#"RUN ["a", null]"#,
            r#"SHELL ["sh", {}]"#,
            r#"VOLUME [1]"#,
            r#"COPY ["a", 2]"#,
            r#"HEALTHCHECK CMD [1]"#,
        ] {
            let instruction = text.split(' ').next().expect("keyword");
            assert_body_err(text, instruction, "must hold only strings");
        }
    }

    #[test]
    fn error_display_and_lower_case() {
        let e = body_err("ENV A");
        assert_eq!(e.to_string(), format!("Dockerfile:2: ENV: {}", e.message));
        let e = ParseError {
            file: "f".into(),
            line: 3,
            instruction: String::new(),
            message: "m".into(),
        };
        assert_eq!(e.to_string(), "f:3: m");
    }

    #[test]
    fn whole_file() {
        let df = parse_ok(
            "# syntax=docker/dockerfile:1\nARG GO=1.22\nFROM golang:${GO} AS build\nWORKDIR /src\n\
             COPY go.* ./\nRUN go mod download\nCOPY . .\nRUN CGO_ENABLED=0 go build -o /app \\\n    ./cmd/app\n\n\
             FROM gcr.io/distroless/static\nCOPY --from=build /app /app\nUSER nonroot\nENTRYPOINT [\"/app\"]\n",
        );
        assert_eq!(df.notes.len(), 1);
        assert_eq!(df.stages.len(), 2);
        assert_eq!(df.stages[0].instructions.len(), 5);
        assert_eq!(df.stages[1].line, 11);
        assert_eq!(
            df.stages[1].instructions[2].kind,
            Kind::Entrypoint(exec(&["/app"]))
        );
        let keywords: Vec<&str> = df.stages[0]
            .instructions
            .iter()
            .map(Instruction::keyword)
            .collect();
        assert_eq!(keywords, ["WORKDIR", "COPY", "RUN", "COPY", "RUN"]);
        assert_eq!(df.stages[0].instructions[4].line, 8);
    }

    // ---- expand ----

    #[test]
    fn pattern_substitutions_on_huge_values_are_refused() {
        let big = "a".repeat(MAX_PATTERN_VALUE + 1);
        let lookup = |n: &str| (n == "V").then(|| big.clone());
        let e = expand("${V//a/b}", '\\', &lookup).expect_err("refused");
        assert!(e.contains("pattern substitution"), "{e}");
        assert!(expand("${V#a}", '\\', &lookup).is_err());
        // A plain use of the same value is fine.
        assert_eq!(expand("$V", '\\', &lookup).expect("plain").len(), big.len());
    }

    #[test]
    fn expand_plain_and_braced() {
        let vars = [("A", "1"), ("B", "two words"), ("E", ""), ("_x1", "u")];
        assert_eq!(ex("plain", &vars), "plain");
        assert_eq!(ex("$A", &vars), "1");
        assert_eq!(ex("${A}", &vars), "1");
        assert_eq!(ex("x${A}y$A.z", &vars), "x1y1.z");
        assert_eq!(ex("$_x1-$B", &vars), "u-two words");
        assert_eq!(ex("$UNSET|${UNSET}|", &vars), "||");
        assert_eq!(ex("a b  c", &vars), "a b  c");
        assert_eq!(ex("$Ab", &vars), "");
        assert_eq!(ex("$1x", &[("1", "one")]), "onex");
    }

    #[test]
    fn expand_dollar_without_a_name_is_literal() {
        assert_eq!(ex("$", &[]), "$");
        assert_eq!(ex("a$", &[]), "a$");
        assert_eq!(ex("$/x $.y $ z", &[]), "$/x $.y $ z");
        assert_eq!(ex("\"$\"", &[]), "$");
    }

    #[test]
    fn expand_modifiers() {
        let vars = [("SET", "v"), ("EMPTY", "")];
        assert_eq!(ex("${SET:-d}", &vars), "v");
        assert_eq!(ex("${EMPTY:-d}", &vars), "d");
        assert_eq!(ex("${UNSET:-d}", &vars), "d");
        assert_eq!(ex("${SET-d}", &vars), "v");
        assert_eq!(ex("${EMPTY-d}", &vars), "");
        assert_eq!(ex("${UNSET-d}", &vars), "d");
        assert_eq!(ex("${SET:+a}", &vars), "a");
        assert_eq!(ex("${EMPTY:+a}", &vars), "");
        assert_eq!(ex("${UNSET:+a}", &vars), "");
        assert_eq!(ex("${SET+a}", &vars), "a");
        assert_eq!(ex("${EMPTY+a}", &vars), "a");
        assert_eq!(ex("${UNSET+a}", &vars), "");
        assert_eq!(ex("${SET:?boom}", &vars), "v");
        assert_eq!(ex("${EMPTY?boom}", &vars), "");
        assert_eq!(ex("${UNSET:-}", &vars), "");
    }

    #[test]
    fn expand_modifier_words_are_expanded() {
        let vars = [("SET", "v"), ("D", "dflt")];
        assert_eq!(ex("${UNSET:-$D}", &vars), "dflt");
        assert_eq!(ex("${UNSET:-${D}/x}", &vars), "dflt/x");
        assert_eq!(ex("${UNSET:-${ALSO:-deep}}", &vars), "deep");
        assert_eq!(ex("${SET:+'a b' \"$D\"}", &vars), "a b dflt");
        assert_eq!(ex("${UNSET:-a\\}b}", &vars), "a}b");
        assert_eq!(ex("${UNSET:-'}'}", &vars), "}");
    }

    #[test]
    fn expand_prefix_and_suffix_removal() {
        let vars = [("F", "dir/sub/file.tar.gz"), ("S", "a*b")];
        assert_eq!(ex("${F#*/}", &vars), "sub/file.tar.gz");
        assert_eq!(ex("${F##*/}", &vars), "file.tar.gz");
        assert_eq!(ex("${F%.*}", &vars), "dir/sub/file.tar");
        assert_eq!(ex("${F%%.*}", &vars), "dir/sub/file");
        assert_eq!(ex("${F#nomatch}", &vars), "dir/sub/file.tar.gz");
        assert_eq!(ex("${F#d?r}", &vars), "/sub/file.tar.gz");
        assert_eq!(ex("${F%[a-z][a-z]}", &vars), "dir/sub/file.tar.");
        assert_eq!(ex("${F%[!z]z}", &vars), "dir/sub/file.tar.");
        assert_eq!(ex("${S#a\\*}", &vars), "b");
        assert_eq!(ex("${S#a*}", &vars), "*b");
        assert_eq!(ex("${S##a*}", &vars), "");
        assert_eq!(ex("${UNSET#x}", &vars), "");
        assert_eq!(ex("${F#$UNSET}", &vars), "dir/sub/file.tar.gz");
        assert_eq!(ex("${F#[}", &[("F", "[x")]), "x");
    }

    #[test]
    fn expand_replacement() {
        let vars = [("V", "a-b-c"), ("P", "-")];
        assert_eq!(ex("${V/-/_}", &vars), "a_b-c");
        assert_eq!(ex("${V//-/_}", &vars), "a_b_c");
        assert_eq!(ex("${V//$P/}", &vars), "abc");
        assert_eq!(ex("${V/-}", &vars), "ab-c");
        assert_eq!(ex("${V/b*/X}", &vars), "a-X");
        assert_eq!(ex("${V//?/.}", &vars), ".....");
        assert_eq!(ex("${V/x/y}", &vars), "a-b-c");
        assert_eq!(ex("${V/a/${P}$P}", &vars), "---b-c");
        assert_eq!(ex("${UNSET/a/b}", &vars), "");
        assert!(ex_err("${V/a", &vars).contains("missing '}'"));
    }

    #[test]
    fn shell_globs() {
        let m = |p: &str, t: &str| glob(&shell_pattern(p, '\\'), &t.chars().collect::<Vec<_>>());
        assert!(m("*", ""));
        assert!(m("a*c", "abbbc"));
        assert!(m("a*c", "a/c"));
        assert!(!m("a*c", "abd"));
        assert!(m("?", "x"));
        assert!(!m("?", ""));
        assert!(m("[]a]", "]"));
        assert!(m("[^a]", "b"));
        assert!(!m("[!a]", "a"));
        assert!(m("\\?", "?"));
        assert!(!m("\\?", "x"));
    }

    #[test]
    fn expand_required_errors() {
        let vars = [("EMPTY", "")];
        assert_eq!(ex_err("${UNSET:?need it}", &vars), "UNSET: need it");
        assert_eq!(
            ex_err("${UNSET?}", &vars),
            "UNSET: is not allowed to be unset"
        );
        assert_eq!(
            ex_err("${EMPTY:?}", &vars),
            "EMPTY: is not allowed to be empty"
        );
        assert_eq!(
            ex_err("${UNSET:?$EMPTY}", &vars),
            "UNSET: is not allowed to be unset"
        );
    }

    #[test]
    fn expand_syntax_errors() {
        assert!(ex_err("${A", &[]).contains("missing '}'"));
        assert!(ex_err("${", &[]).contains("missing '}'"));
        assert!(ex_err("${A:-x", &[]).contains("missing '}'"));
        assert!(ex_err("${}", &[]).contains("bad substitution"));
        assert!(ex_err("${:-x}", &[]).contains("bad substitution"));
        assert!(ex_err("${-x}", &[]).contains("bad substitution"));
        assert!(ex_err("${A:x}", &[]).contains("unsupported modifier (:x)"));
        assert!(ex_err("${A*x}", &[]).contains("unsupported modifier (*)"));
        assert!(ex_err("${A=x}", &[]).contains("unsupported modifier (=)"));
        assert!(ex_err("'abc", &[]).contains("matching single-quote"));
        assert!(ex_err("\"abc", &[]).contains("matching double-quote"));
        assert!(ex_err("\"${A:-\"}", &[]).contains("matching double-quote"));
    }

    #[test]
    fn expand_quotes() {
        let vars = [("A", "1"), ("B", "x y")];
        assert_eq!(ex("'$A \\n \"'", &vars), "$A \\n \"");
        assert_eq!(ex("\"$A ${B} '$A'\"", &vars), "1 x y '1'");
        assert_eq!(ex("\"a\\\"b\\$A\\\\c\\nd\"", &vars), "a\"b$A\\c\\nd");
        assert_eq!(ex("x\"\"y''z", &vars), "xyz");
        assert_eq!(ex("pre\"$A\"post'$A'", &vars), "pre1post$A");
        assert!(ex_err("\"ends\\", &vars).contains("matching double-quote"));
    }

    #[test]
    fn expand_unquoted_escapes() {
        let vars = [("A", "1")];
        assert_eq!(ex("\\$A", &vars), "$A");
        assert_eq!(ex("a\\ b\\\"c\\'d\\\\e\\n", &vars), "a b\"c'd\\en");
        assert_eq!(ex("trailing\\", &vars), "trailing");
        assert_eq!(ex("\\${A}", &vars), "${A}");
    }

    #[test]
    fn expand_backtick_escape() {
        let lookup = env(&[("A", "1")]);
        let run = |w: &str| expand(w, '`', &lookup).expect("should succeed");
        assert_eq!(run("C:\\path\\$A"), "C:\\path\\1");
        assert_eq!(run("`$A"), "$A");
        assert_eq!(run("a` b"), "a b");
        assert_eq!(run("\"x`\"y\\\""), "x\"y\\");
        assert_eq!(run("\"`$A\""), "$A");
    }

    // ---- durations ----

    #[test]
    fn durations() {
        for (s, ns) in [
            ("0", 0),
            ("0s", 0),
            ("1ns", 1),
            ("1us", 1_000),
            ("1µs", 1_000),
            ("1μs", 1_000),
            ("500ms", 500_000_000),
            ("30s", 30_000_000_000),
            ("2m", 120_000_000_000),
            ("1h", 3_600_000_000_000),
            ("1h30m", 5_400_000_000_000),
            ("1m30.5s", 90_500_000_000),
            ("1.5s", 1_500_000_000),
            (".5s", 500_000_000),
            ("1.s", 1_000_000_000),
            ("+5s", 5_000_000_000),
            ("1.000000001s", 1_000_000_001),
            ("2562047h47m16.854775807s", i64::MAX),
        ] {
            assert_eq!(parse_duration(s), Ok(ns), "{s}");
        }
    }

    #[test]
    fn bad_durations() {
        for (s, needle) in [
            ("", "expected a number"),
            ("-1s", "cannot be negative"),
            ("5", "a unit is missing"),
            ("1h5", "a unit is missing"),
            ("s", "expected a number"),
            (".s", "expected a number"),
            ("1d", "unknown unit \"d\""),
            ("1 s", "unknown unit"),
            ("9999999999999999999s", "too long"),
            ("2562048h", "too long"),
        ] {
            let e = parse_duration(s).expect_err("should fail");
            assert!(e.contains(needle), "{s:?}: {e}");
        }
    }
}
