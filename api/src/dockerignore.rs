//! `.dockerignore`: which files of a build context the builder never sees, with docker's
//! semantics (Go `filepath.Match` patterns, `**` for any number of directories, `!` exceptions
//! where the last matching pattern wins, `#` comments, leading `/` and `./` ignored, a pattern
//! that matches a directory excludes everything under it unless an exception brings a path
//! back).

/// Longest pattern taken: matching costs grow with (pattern × path).
pub const MAX_PATTERN: usize = 4096;

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
    /// `text`, compiled.
    tokens: Vec<Token>,
}

impl DockerIgnore {
    /// Parses the file's text. Errors name the 1-based line of a malformed pattern (an
    /// unclosed `[`).
    ///
    /// As in docker, a line is a comment only when `#` is its very first character, and
    /// surrounding whitespace is trimmed from patterns.
    pub fn parse(text: &str) -> Result<DockerIgnore, String> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line.len() > MAX_PATTERN {
                return Err(format!(
                    "line {}: a pattern of over {MAX_PATTERN} bytes is refused",
                    i + 1
                ));
            }
            let (exception, raw) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let text = if raw.is_empty() {
                String::new()
            } else {
                let cleaned = clean(raw);
                match cleaned.strip_prefix('/') {
                    Some(rest) if !rest.is_empty() => rest.to_string(),
                    _ => cleaned,
                }
            };
            let tokens = compile(&text).map_err(|e| format!("line {}: {raw:?}: {e}", i + 1))?;
            patterns.push(Pattern {
                text,
                exception,
                tokens,
            });
        }
        Ok(DockerIgnore { patterns })
    }

    /// Whether the context path `path` (relative, `/`-separated, no leading `./`) is excluded.
    /// A path is excluded when the last pattern matching it or one of its parent directories
    /// is not an exception.
    pub fn excluded(&self, path: &str) -> bool {
        let path = path.trim_end_matches('/');
        let parents: Vec<&str> = path
            .match_indices('/')
            .map(|(i, _)| &path[..i])
            .filter(|p| !p.is_empty())
            .collect();
        let mut excluded = false;
        for pattern in &self.patterns {
            // As in docker's matcher: an exclusion only matters while the path is included,
            // an exception only while it is excluded.
            if pattern.exception != excluded {
                continue;
            }
            let matched =
                pattern.matches(path) || parents.iter().any(|parent| pattern.matches(parent));
            if matched {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Whether a walker must look inside the excluded directory `dir`: true when some
    /// exception could bring back a path under it.
    pub fn may_include_under(&self, dir: &str) -> bool {
        let dir = dir.trim_end_matches('/');
        let prefix = format!("{dir}/");
        self.patterns.iter().filter(|p| p.exception).any(|p| {
            // An exception for `dir` or one of its parents brings back everything under it;
            // otherwise it matters when it can still match once `dir/` is consumed.
            p.matches(dir)
                || dir.match_indices('/').any(|(i, _)| p.matches(&dir[..i]))
                || p.can_continue(&prefix)
        })
    }

    /// Whether it has no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// One piece of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A character as is.
    Literal(char),
    /// `?`: any character but `/`.
    One,
    /// `*`: any run of characters without `/`.
    Star,
    /// `**` (or `**/`) before more pattern: any number of whole directories, even none.
    Dirs,
    /// `**` at the end: anything.
    Rest,
    /// `[…]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        run(&self.tokens, path).contains(&State::at(self.tokens.len()))
    }

    /// Whether some path starting with `prefix` could match.
    fn can_continue(&self, prefix: &str) -> bool {
        !run(&self.tokens, prefix).is_empty()
    }
}

/// A position in a compiled pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct State {
    /// The next token to match (`tokens.len()`: the pattern is complete).
    token: usize,
    /// Inside a [`Token::Dirs`]: characters were consumed, so it can only end with a `/`.
    inside: bool,
}

impl State {
    fn at(token: usize) -> State {
        State {
            token,
            inside: false,
        }
    }
}

/// Runs `tokens` as an NFA over `input`: the states reachable after it.
fn run(tokens: &[Token], input: &str) -> Vec<State> {
    let mut states = closure(tokens, vec![State::at(0)]);
    for c in input.chars() {
        let mut next = Vec::new();
        for &state in &states {
            let s = state.token;
            let Some(token) = tokens.get(s) else {
                continue;
            };
            match token {
                Token::Literal(l) if *l == c => next.push(State::at(s + 1)),
                Token::One if c != '/' => next.push(State::at(s + 1)),
                Token::Star if c != '/' => next.push(state),
                Token::Rest => next.push(state),
                Token::Dirs => {
                    next.push(State {
                        token: s,
                        inside: true,
                    });
                    if c == '/' {
                        next.push(State::at(s + 1));
                    }
                }
                Token::Class { negated, ranges } => {
                    let inside = ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c));
                    if inside != *negated {
                        next.push(State::at(s + 1));
                    }
                }
                _ => {}
            }
        }
        states = closure(tokens, next);
        if states.is_empty() {
            break;
        }
    }
    states
}

/// Adds the states reachable without consuming a character (`*` and `**` matching nothing).
fn closure(tokens: &[Token], mut states: Vec<State>) -> Vec<State> {
    // Which fresh (not `inside`) states are in: a linear walk, whatever the pattern.
    let mut fresh = vec![false; tokens.len() + 2];
    for s in &states {
        if *s == State::at(s.token) {
            fresh[s.token] = true;
        }
    }
    let mut i = 0;
    while i < states.len() {
        let state = states[i];
        let skippable = match tokens.get(state.token) {
            Some(Token::Star | Token::Rest) => true,
            Some(Token::Dirs) => !state.inside,
            _ => false,
        };
        let skipped = State::at(state.token + 1);
        if skippable && !fresh[skipped.token] {
            fresh[skipped.token] = true;
            states.push(skipped);
        }
        i += 1;
    }
    states.sort_unstable();
    states.dedup();
    states
}

/// Compiles a cleaned pattern, with docker's reading of `**`.
fn compile(pattern: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                // `**/` is read as `**`.
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                tokens.push(if i == chars.len() {
                    Token::Rest
                } else {
                    Token::Dirs
                });
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::One),
            '\\' => match chars.get(i) {
                Some(&next) => {
                    i += 1;
                    tokens.push(Token::Literal(next));
                }
                None => tokens.push(Token::Literal('\\')),
            },
            '[' => {
                let (token, end) = class(&chars, i)?;
                tokens.push(token);
                i = end;
            }
            _ => tokens.push(Token::Literal(c)),
        }
    }
    Ok(tokens)
}

/// Parses a character class whose body starts at `chars[start]`: the token and the index
/// after its `]`.
fn class(chars: &[char], start: usize) -> Result<(Token, usize), String> {
    let unclosed = || "unclosed `[` in the pattern".to_string();
    let mut i = start;
    let negated = chars.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let read = |i: &mut usize| -> Result<char, String> {
        match chars.get(*i) {
            None => Err(unclosed()),
            Some('\\') => {
                *i += 1;
                let c = *chars.get(*i).ok_or_else(unclosed)?;
                *i += 1;
                Ok(c)
            }
            Some(&c) => {
                *i += 1;
                Ok(c)
            }
        }
    };
    loop {
        match chars.get(i) {
            None => return Err(unclosed()),
            Some(']') if !ranges.is_empty() => {
                return Ok((Token::Class { negated, ranges }, i + 1));
            }
            Some(']' | '-') => return Err("bad character class in the pattern".to_string()),
            Some(_) => {}
        }
        let lo = read(&mut i)?;
        let hi = if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
            i += 1;
            read(&mut i)?
        } else {
            lo
        };
        if hi < lo {
            return Err("bad range in a character class of the pattern".to_string());
        }
        ranges.push((lo, hi));
    }
}

/// Go's `filepath.Clean` for `/`-separated paths.
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            _ => parts.push(part),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn di(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text).expect("should succeed")
    }

    fn assert_excluded(ignore: &DockerIgnore, paths: &[&str]) {
        for path in paths {
            assert!(
                ignore.excluded(path),
                "{path} should be excluded by {ignore:?}"
            );
        }
    }

    fn assert_included(ignore: &DockerIgnore, paths: &[&str]) {
        for path in paths {
            assert!(
                !ignore.excluded(path),
                "{path} should be included by {ignore:?}"
            );
        }
    }

    #[test]
    fn empty_and_comments() {
        let ignore = di("# a comment\n\n   \n#node_modules\n");
        assert!(ignore.is_empty());
        assert_included(&ignore, &["# a comment", "node_modules", "a/b"]);
        assert!(!di("x").is_empty());
    }

    #[test]
    fn lines_are_trimmed_and_cleaned() {
        let ignore = di("  build/  \n/abs\n./dot\nx/../y\na//b/./c\n\u{feff}");
        let texts: Vec<&str> = ignore.patterns.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(texts, ["build", "abs", "dot", "y", "a/b/c", "\u{feff}"]);
        assert_excluded(
            &ignore,
            &["build", "build/out.o", "abs", "dot/x", "y", "a/b/c/d"],
        );
        assert_included(&ignore, &["x", "x/y", "a/b", "builder", "sub/abs"]);
        assert_eq!(clean("../a/./../b/"), "../b");
        assert_eq!(clean("/../a"), "/a");
        assert_eq!(clean("."), ".");
        assert_eq!(clean("a/.."), ".");
    }

    #[test]
    fn byte_order_mark_is_dropped() {
        let ignore = di("\u{feff}secret\n");
        assert_excluded(&ignore, &["secret"]);
    }

    #[test]
    fn star_does_not_cross_slashes() {
        let ignore = di("*.log\n");
        assert_excluded(&ignore, &["a.log", ".log"]);
        assert_included(&ignore, &["logs/a.log", "a.logx", "a.lo"]);
        let ignore = di("*/*.o\n");
        assert_excluded(&ignore, &["src/a.o", "src/a.o/inner"]);
        assert_included(&ignore, &["a.o", "src/sub/a.o"]);
    }

    #[test]
    fn question_mark_is_one_char_but_not_a_slash() {
        let ignore = di("file?.txt\na?b\n");
        assert_excluded(&ignore, &["file1.txt", "filex.txt", "axb"]);
        assert_included(&ignore, &["file.txt", "file12.txt", "a/b"]);
    }

    #[test]
    fn double_star() {
        let ignore = di("**/*.go\n");
        assert_excluded(&ignore, &["a.go", "x/a.go", "x/y/z/a.go"]);
        assert_included(&ignore, &["a.gox", "x/a.rs"]);
        let ignore = di("a/**/b\n");
        assert_excluded(&ignore, &["a/b", "a/x/b", "a/x/y/b", "a/x/b/c"]);
        assert_included(&ignore, &["a/xb", "ab", "x/a/b"]);
        let ignore = di("**/node_modules\n");
        assert_excluded(&ignore, &["node_modules", "web/node_modules/x/y.js"]);
        assert_included(&ignore, &["web/node_modules_x"]);
        let ignore = di("**\n");
        assert_excluded(&ignore, &["x", "x/y/z"]);
        let ignore = di("cache/**\n");
        assert_excluded(&ignore, &["cache/x", "cache/x/y"]);
        // Docker's `dir/**` does not match `dir` itself.
        assert_included(&ignore, &["cache", "cachex"]);
    }

    #[test]
    fn parent_directory_match_excludes_children() {
        let ignore = di("target\ndocs/*\n");
        assert_excluded(
            &ignore,
            &["target", "target/debug/x", "docs/a", "docs/a/b.md"],
        );
        assert_included(&ignore, &["docs", "src/target", "targets"]);
    }

    #[test]
    fn char_classes() {
        let ignore = di("file[0-9].txt\n[^a]bc\nx[abc]y\nq[\\]]\n");
        assert_excluded(
            &ignore,
            &["file1.txt", "file9.txt", "xbc", "zbc", "xay", "xcy", "q]"],
        );
        assert_included(&ignore, &["filea.txt", "file10.txt", "abc", "xdy", "q"]);
    }

    #[test]
    fn escapes() {
        let ignore = di("a\\*b\n\\[x]\nend\\\n");
        assert_excluded(&ignore, &["a*b", "[x]", "end\\"]);
        assert_included(&ignore, &["axb", "x", "end"]);
    }

    #[test]
    fn bad_patterns_name_their_line() {
        let e = DockerIgnore::parse("ok\n# c\n[abc\n").expect_err("should fail");
        assert!(e.starts_with("line 3:"), "{e}");
        assert!(e.contains("unclosed `[`"), "{e}");
        assert!(
            DockerIgnore::parse("[]")
                .expect_err("should fail")
                .starts_with("line 1:")
        );
        assert!(
            DockerIgnore::parse("x\n[z-a]")
                .expect_err("should fail")
                .contains("bad range")
        );
        assert!(DockerIgnore::parse("[a-]").is_err());
        assert!(DockerIgnore::parse("[\\").is_err());
    }

    #[test]
    fn exceptions_and_last_match_wins() {
        let ignore = di("*.md\n!README.md\n");
        assert_excluded(&ignore, &["CHANGES.md"]);
        assert_included(&ignore, &["README.md", "main.rs"]);
        let ignore = di("!README.md\n*.md\n");
        assert_excluded(&ignore, &["README.md"]);
        let ignore = di("*.md\n!*.md\n*.md\n! keep.md\n");
        assert_excluded(&ignore, &["a.md"]);
        assert_included(&ignore, &["keep.md"]);
    }

    #[test]
    fn exception_under_an_excluded_directory() {
        let ignore = di("docs\n!docs/keep.md\n");
        assert_excluded(&ignore, &["docs", "docs/other.md", "docs/sub/keep.md"]);
        assert_included(&ignore, &["docs/keep.md", "src/x"]);
        // An exception for a directory brings back what is under it.
        let ignore = di("*\n!src\n");
        assert_excluded(&ignore, &["target", "Cargo.toml"]);
        assert_included(&ignore, &["src", "src/main.rs", "src/a/b.rs"]);
        // ... until a later pattern excludes again.
        let ignore = di("*\n!src\nsrc/gen\n");
        assert_excluded(&ignore, &["src/gen/x.rs"]);
        assert_included(&ignore, &["src/main.rs"]);
    }

    #[test]
    fn may_include_under() {
        let ignore = di("docs\n!docs/keep.md\n!**/*.keep\n");
        assert!(ignore.may_include_under("docs"));
        assert!(ignore.may_include_under("docs/"));
        assert!(ignore.may_include_under("anything/deep"));
        let ignore = di("docs\n!docs/keep.md\n!*.txt\n!other/*/x\n");
        assert!(ignore.may_include_under("docs"));
        assert!(!ignore.may_include_under("docs/sub"));
        assert!(!ignore.may_include_under("src"));
        assert!(!ignore.may_include_under("do"));
        assert!(ignore.may_include_under("other/a"));
        assert!(!ignore.may_include_under("other/a/b"));
        // An exception matching the directory or a parent brings everything back.
        let ignore = di("*\n!src\n");
        assert!(ignore.may_include_under("src"));
        assert!(ignore.may_include_under("src/deep/er"));
        assert!(!ignore.may_include_under("target"));
        // No exceptions at all: never look inside.
        let ignore = di("target\n*.o\n");
        assert!(!ignore.may_include_under("target"));
        let ignore = di("x\n!x/[ab]*/keep\n");
        assert!(ignore.may_include_under("x"));
        assert!(ignore.may_include_under("x/abc"));
        assert!(!ignore.may_include_under("x/cde"));
    }

    #[test]
    fn a_pattern_of_many_stars_matches_in_linear_time() {
        // Quadratic work per character would take minutes here.
        let pattern = format!("{}b", "*a".repeat(300));
        let ig = DockerIgnore::parse(&pattern).expect("parse");
        assert!(!ig.excluded(&"a".repeat(500)));
        assert!(ig.excluded(&format!("{}b", "a".repeat(500))));
        let too_long = "*".repeat(MAX_PATTERN + 1);
        let e = DockerIgnore::parse(&too_long).expect_err("refused");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn trailing_slash_on_queried_paths() {
        let ignore = di("build\n");
        assert!(ignore.excluded("build/"));
    }
}
