//! The part of Go's text/template that `--format` strings use in practice: literal text,
//! `{{.Field.Path}}`, `{{json .X}}`, `{{join .X ", "}}`, `{{index .X "key"}}`, `{{upper .X}}`,
//! `{{lower .X}}`, `{{len .X}}`, `{{println ...}}`, string literals, and docker's `table` prefix.
//! Values are JSON, printed the way Go prints the decoded value.

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// A parsed `--format` string.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
    /// `table …`: a header row first, columns aligned.
    pub table: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Action(Vec<Arg>),
}

#[derive(Debug, Clone, PartialEq)]
enum Arg {
    /// `.A.B`; empty for `.`.
    Path(Vec<String>),
    Str(String),
    Ident(String),
    Group(Vec<Arg>),
}

impl Template {
    /// Parses `format`. As docker does, a literal `\t` or `\n` (typed in a shell) is a tab or a
    /// newline, and `table` at the start asks for a header and aligned columns.
    pub fn parse(format: &str) -> Result<Template> {
        let (table, body) = match format.strip_prefix("table") {
            Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => {
                (true, rest.trim())
            }
            _ => (false, format),
        };
        let body = body.replace("\\t", "\t").replace("\\n", "\n");
        let mut parts = Vec::new();
        let mut rest = body.as_str();
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end =
                find_close(after).with_context(|| format!("unclosed action in {format:?}"))?;
            let mut inner = &after[..end];
            // `{{- x -}}` trims the text around the action.
            if let Some(s) = inner.strip_prefix('-') {
                inner = s;
                if let Some(Part::Text(t)) = parts.last_mut() {
                    *t = t.trim_end().to_owned();
                }
            }
            let mut trim_after = false;
            if let Some(s) = inner.strip_suffix('-') {
                inner = s;
                trim_after = true;
            }
            let args = parse_args(&mut tokenize(inner)?.into_iter().peekable(), false)?;
            if args.is_empty() {
                bail!("empty action in {format:?}");
            }
            parts.push(Part::Action(args));
            rest = &after[end + 2..];
            if trim_after {
                rest = rest.trim_start();
            }
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts, table })
    }

    /// Renders against `v`.
    pub fn render(&self, v: &Value) -> Result<String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Action(args) => out.push_str(&go_string(&eval(args, v)?)),
            }
        }
        Ok(out)
    }
}

fn find_close(s: &str) -> Option<usize> {
    let mut in_str = false;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'}' if !in_str && b.get(i + 1) == Some(&b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

#[derive(Debug, PartialEq)]
enum Tok {
    Path(Vec<String>),
    Str(String),
    Ident(String),
    Open,
    Close,
}

fn tokenize(s: &str) -> Result<Vec<Tok>> {
    let mut toks = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                toks.push(Tok::Open);
            }
            ')' => {
                chars.next();
                toks.push(Tok::Close);
            }
            '"' | '`' => {
                chars.next();
                let mut lit = String::new();
                loop {
                    match chars.next() {
                        None => bail!("unterminated string in {s:?}"),
                        Some(q) if q == c => break,
                        Some('\\') if c == '"' => match chars.next() {
                            Some('n') => lit.push('\n'),
                            Some('t') => lit.push('\t'),
                            Some(o) => lit.push(o),
                            None => bail!("unterminated string in {s:?}"),
                        },
                        Some(o) => lit.push(o),
                    }
                }
                toks.push(Tok::Str(lit));
            }
            _ => {
                let mut word = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || c == '(' || c == ')' {
                        break;
                    }
                    word.push(c);
                    chars.next();
                }
                if let Some(path) = word.strip_prefix('.') {
                    let fields = if path.is_empty() {
                        Vec::new()
                    } else {
                        path.split('.').map(str::to_owned).collect()
                    };
                    if fields.iter().any(String::is_empty) {
                        bail!("bad field path {word:?}");
                    }
                    toks.push(Tok::Path(fields));
                } else {
                    toks.push(Tok::Ident(word));
                }
            }
        }
    }
    Ok(toks)
}

fn parse_args(
    toks: &mut std::iter::Peekable<std::vec::IntoIter<Tok>>,
    nested: bool,
) -> Result<Vec<Arg>> {
    let mut args = Vec::new();
    while let Some(t) = toks.next() {
        args.push(match t {
            Tok::Path(p) => Arg::Path(p),
            Tok::Str(s) => Arg::Str(s),
            Tok::Ident(i) => Arg::Ident(i),
            Tok::Open => Arg::Group(parse_args(toks, true)?),
            Tok::Close if nested => return Ok(args),
            Tok::Close => bail!("unexpected )"),
        });
    }
    if nested {
        bail!("unclosed (");
    }
    Ok(args)
}

fn eval(args: &[Arg], dot: &Value) -> Result<Value> {
    let Some((first, rest)) = args.split_first() else {
        bail!("empty expression");
    };
    let Arg::Ident(f) = first else {
        if !rest.is_empty() {
            bail!("can't give argument to non-function {first:?}");
        }
        return value(first, dot);
    };
    let vals = rest
        .iter()
        .map(|a| value(a, dot))
        .collect::<Result<Vec<_>>>()?;
    let one = |name: &str| -> Result<&Value> {
        match vals.as_slice() {
            [v] => Ok(v),
            _ => bail!("wrong number of args for {name}: want 1 got {}", vals.len()),
        }
    };
    Ok(match f.as_str() {
        "json" => Value::String(serde_json::to_string(one("json")?)?),
        "upper" => Value::String(go_string(one("upper")?).to_uppercase()),
        "lower" => Value::String(go_string(one("lower")?).to_lowercase()),
        "title" => {
            let s = go_string(one("title")?);
            let mut c = s.chars();
            Value::String(c.next().map_or(String::new(), |f| {
                f.to_uppercase().chain(c).collect::<String>()
            }))
        }
        "len" => Value::from(match one("len")? {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            Value::String(s) => s.len(),
            other => bail!("len of {other}"),
        }),
        "join" => match vals.as_slice() {
            [Value::Array(a), sep] => Value::String(
                a.iter()
                    .map(go_string)
                    .collect::<Vec<_>>()
                    .join(&go_string(sep)),
            ),
            [Value::Null, _] => Value::String(String::new()),
            _ => bail!("join wants a list and a separator"),
        },
        "index" => {
            let mut cur = vals.first().context("index wants arguments")?.clone();
            for k in &vals[1..] {
                cur = match (&cur, k) {
                    (Value::Object(o), k) => o.get(&go_string(k)).cloned().unwrap_or(Value::Null),
                    (Value::Array(a), Value::Number(n)) => n
                        .as_u64()
                        .and_then(|i| a.get(i as usize))
                        .cloned()
                        .context("index out of range")?,
                    (Value::Null, _) => Value::Null,
                    _ => bail!("can't index {cur} with {k}"),
                };
            }
            cur
        }
        "print" => Value::String(vals.iter().map(go_string).collect::<Vec<_>>().join(" ")),
        "println" => Value::String(vals.iter().map(go_string).collect::<Vec<_>>().join(" ") + "\n"),
        other => bail!("function {other:?} not defined"),
    })
}

fn value(a: &Arg, dot: &Value) -> Result<Value> {
    match a {
        Arg::Str(s) => Ok(Value::String(s.clone())),
        Arg::Path(p) => Ok(lookup(dot, p)),
        Arg::Group(g) => eval(g, dot),
        Arg::Ident(i) if i == "true" || i == "false" => Ok(Value::Bool(i == "true")),
        Arg::Ident(i) if i.parse::<i64>().is_ok() => Ok(Value::from(i.parse::<i64>()?)),
        Arg::Ident(i) => {
            eval(std::slice::from_ref(a), dot).with_context(|| format!("evaluating {i}"))
        }
    }
}

/// A missing key is Go's "no value" (JSON null here), as a map lookup gives.
fn lookup(v: &Value, path: &[String]) -> Value {
    let mut cur = v;
    for k in path {
        match cur.get(k) {
            Some(next) => cur = next,
            None => return Value::Null,
        }
    }
    cur.clone()
}

/// A value printed as Go's fmt prints what json.Unmarshal made of it.
pub fn go_string(v: &Value) -> String {
    match v {
        Value::Null => "<no value>".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(go_string).collect::<Vec<_>>().join(" ")
        ),
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{k}:{}", go_string(&o[k.as_str()])))
                .collect();
            format!("map[{}]", items.join(" "))
        }
    }
}

/// Lines of tab-separated cells aligned as docker's tabwriter does (minimum width 10, three
/// spaces of padding, the last cell unpadded).
pub fn align(rows: &[String]) -> String {
    let split: Vec<Vec<&str>> = rows.iter().map(|r| r.split('\t').collect()).collect();
    let ncols = split.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; ncols];
    for r in &split {
        for (i, c) in r.iter().enumerate() {
            if i + 1 < r.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    for r in &split {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                let w = (widths[i] + 3).max(10);
                line.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
        }
        out.push_str(line.trim_end_matches(' '));
        out.push('\n');
    }
    out
}

/// Renders `rows` with `format` (with a header row from `header` when it is a table), or,
/// without a format, the default table `default`.
pub fn render_rows(format: &str, header: &Value, rows: &[Value]) -> Result<String> {
    let t = Template::parse(format)?;
    let mut lines = Vec::new();
    if t.table {
        lines.push(t.render(header)?);
    }
    for r in rows {
        lines.push(t.render(r)?);
    }
    if t.table {
        Ok(align(&lines))
    } else {
        Ok(lines.into_iter().map(|l| l + "\n").collect())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn r(f: &str, v: &Value) -> String {
        Template::parse(f)
            .expect("parse")
            .render(v)
            .expect("render")
    }

    #[test]
    fn paths_and_literals() {
        let v = json!({"State": {"Status": "running", "ExitCode": 0, "Pid": 42}, "Name": "/x"});
        assert_eq!(r("{{.State.Status}}", &v), "running");
        assert_eq!(r("{{.State.Status}} {{.State.ExitCode}}", &v), "running 0");
        assert_eq!(r("pid={{ .State.Pid }}!", &v), "pid=42!");
        assert_eq!(r("{{.Missing}}", &v), "<no value>");
        assert_eq!(r("{{.Missing.Deeper}}", &v), "<no value>");
        assert_eq!(r("no actions", &v), "no actions");
        assert_eq!(r("{{\"lit\"}}", &v), "lit");
    }

    #[test]
    fn functions() {
        let v = json!({"Config": {"Labels": {"a": "1", "b.c": "2"}, "Cmd": ["sh", "-c"]}});
        assert_eq!(r("{{json .Config.Labels}}", &v), r#"{"a":"1","b.c":"2"}"#);
        assert_eq!(r("{{json .Config.Cmd}}", &v), r#"["sh","-c"]"#);
        assert_eq!(r("{{join .Config.Cmd \" \"}}", &v), "sh -c");
        assert_eq!(r("{{index .Config.Labels \"b.c\"}}", &v), "2");
        assert_eq!(r("{{upper (index .Config.Cmd 0)}}", &v), "SH");
        assert_eq!(r("{{len .Config.Cmd}}", &v), "2");
        assert_eq!(r("{{.Config.Cmd}}", &v), "[sh -c]");
        assert_eq!(r("{{.Config.Labels}}", &v), "map[a:1 b.c:2]");
        assert_eq!(r("{{json .}}", &json!(null)), "null");
    }

    #[test]
    fn table_prefix_and_escapes() {
        let t = Template::parse("table {{.ID}}\\t{{.Names}}").expect("parse");
        assert!(t.table);
        assert_eq!(
            t.render(&json!({"ID": "abc", "Names": "n"}))
                .expect("render"),
            "abc\tn"
        );
        let out = render_rows(
            "table {{.ID}}\\t{{.Names}}",
            &json!({"ID": "CONTAINER ID", "Names": "NAMES"}),
            &[json!({"ID": "abc", "Names": "n"})],
        )
        .expect("rows");
        assert_eq!(out, "CONTAINER ID   NAMES\nabc            n\n");
        let plain = render_rows(
            "{{.ID}}",
            &json!({}),
            &[json!({"ID": "a"}), json!({"ID": "b"})],
        )
        .expect("rows");
        assert_eq!(plain, "a\nb\n");
    }

    #[test]
    fn trim_markers_and_errors() {
        let v = json!({"A": "x"});
        assert_eq!(r("a  {{- .A -}}  b", &v), "axb");
        assert!(Template::parse("{{.A").is_err());
        assert!(Template::parse("{{}}").is_err());
        assert!(
            Template::parse("{{nosuchfunc .A}}")
                .expect("parse")
                .render(&v)
                .is_err()
        );
    }

    #[test]
    fn alignment_has_a_minimum_width() {
        assert_eq!(
            align(&["A\tB".into(), "long-cell-here\tc".into()]),
            "A                B\nlong-cell-here   c\n"
        );
        assert_eq!(align(&["x\ty".into()]), "x         y\n");
    }
}
