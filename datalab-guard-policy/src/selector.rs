//! Kubernetes label selectors in their string form (`kubectl get -l`, apimachinery's
//! `labels.Parse`): the grammar, key and value validation, and matching.
//!
//! Supported: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a)`, `k` (exists), `!k`
//! (does not exist), requirements joined by `,` (AND). Whitespace around tokens is free, as
//! in Kubernetes. The empty (or all-blank) selector matches everything. The numeric `>`/`<`
//! operators of apimachinery are refused with a clear error: nothing here needs them.
//!
//! Matching follows Kubernetes, including the two cases that surprise people: `k!=v` and
//! `k notin (..)` also match objects that do not have the label `k` at all.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    str::FromStr,
};

/// A parsed label selector. Requirements are kept sorted by key (as apimachinery does), so
/// two spellings of the same selector compare equal and print the same.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// One `,`-separated part of a selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// `k=v` or `k==v`: the label is present with this value.
    Equals(String),
    /// `k!=v`: the label is absent or has another value.
    NotEquals(String),
    /// `k in (a,b)`: the label is present with one of these values.
    In(BTreeSet<String>),
    /// `k notin (a,b)`: the label is absent or has none of these values.
    NotIn(BTreeSet<String>),
    /// `k`: the label is present (any value).
    Exists,
    /// `!k`: the label is absent.
    DoesNotExist,
}

/// A selector string that does not parse or breaks Kubernetes' key/value rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {message}")]
pub struct SelectorError {
    /// The selector as written.
    pub selector: String,
    /// What is wrong, and where (1-based character position) when that helps.
    pub message: String,
}

impl LabelSelector {
    /// The selector that matches everything (the empty string).
    pub fn everything() -> LabelSelector {
        LabelSelector::default()
    }

    /// Parses the string form; see the module docs for the grammar.
    pub fn parse(text: &str) -> Result<LabelSelector, SelectorError> {
        let fail = |message: String| SelectorError {
            selector: text.to_owned(),
            message,
        };
        let tokens = lex(text);
        let mut requirements = Parser { tokens, pos: 0 }.parse().map_err(fail)?;
        requirements.sort();
        Ok(LabelSelector { requirements })
    }

    /// True for the selector that matches everything.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether an object with these labels is selected: every requirement holds.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            Operator::Equals(v) => value == Some(v),
            Operator::NotEquals(v) => value != Some(v),
            Operator::In(set) => value.is_some_and(|v| set.contains(v)),
            Operator::NotIn(set) => !value.is_some_and(|v| set.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// The canonical form: no blanks except around `in`/`notin`, `=` for equality.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set =
            |set: &BTreeSet<String>| set.iter().map(String::as_str).collect::<Vec<_>>().join(",");
        match &self.op {
            Operator::Equals(v) => write!(f, "{}={v}", self.key),
            Operator::NotEquals(v) => write!(f, "{}!={v}", self.key),
            Operator::In(s) => write!(f, "{} in ({})", self.key, set(s)),
            Operator::NotIn(s) => write!(f, "{} notin ({})", self.key, set(s)),
            Operator::Exists => f.write_str(&self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
        }
    }
}

impl FromStr for LabelSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LabelSelector::parse(s)
    }
}

impl serde::Serialize for LabelSelector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for LabelSelector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Parsed inside the visitor, so a YAML deserializer attaches the value's own path and
        // line to the error.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = LabelSelector;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a label selector such as app=web or env in (a,b)")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LabelSelector, E> {
                LabelSelector::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

// ---------------------------------------------------------------------------------------
// Lexer and parser (the token rules of apimachinery's selector lexer).

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Eq,
    DoubleEq,
    NotEq,
    Bang,
    LParen,
    RParen,
    Comma,
    Gt,
    Lt,
    End,
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Ident(s) => format!("{s:?}"),
            Tok::Eq => "'='".into(),
            Tok::DoubleEq => "'=='".into(),
            Tok::NotEq => "'!='".into(),
            Tok::Bang => "'!'".into(),
            Tok::LParen => "'('".into(),
            Tok::RParen => "')'".into(),
            Tok::Comma => "','".into(),
            Tok::Gt => "'>'".into(),
            Tok::Lt => "'<'".into(),
            Tok::End => "the end".into(),
        }
    }
}

/// A token and its 1-based character position.
type Spanned = (Tok, usize);

fn is_special(c: char) -> bool {
    c.is_whitespace() || matches!(c, '=' | '!' | '(' | ')' | ',' | '<' | '>')
}

fn lex(text: &str) -> Vec<Spanned> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at = i + 1;
        let next = chars.get(i + 1).copied();
        let (tok, len) = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '=' if next == Some('=') => (Tok::DoubleEq, 2),
            '=' => (Tok::Eq, 1),
            '!' if next == Some('=') => (Tok::NotEq, 2),
            '!' => (Tok::Bang, 1),
            '(' => (Tok::LParen, 1),
            ')' => (Tok::RParen, 1),
            ',' => (Tok::Comma, 1),
            '>' => (Tok::Gt, 1),
            '<' => (Tok::Lt, 1),
            _ => {
                let start = i;
                while i < chars.len() && !is_special(chars[i]) {
                    i += 1;
                }
                out.push((Tok::Ident(chars[start..i].iter().collect()), at));
                continue;
            }
        };
        out.push((tok, at));
        i += len;
    }
    out.push((Tok::End, chars.len() + 1));
    out
}

struct Parser {
    tokens: Vec<Spanned>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Spanned {
        &self.tokens[self.pos]
    }

    fn next(&mut self) -> Spanned {
        let t = self.tokens[self.pos].clone();
        if t.0 != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn parse(mut self) -> Result<Vec<Requirement>, String> {
        let mut out = Vec::new();
        if self.peek().0 == Tok::End {
            return Ok(out);
        }
        loop {
            out.push(self.requirement()?);
            match self.next() {
                (Tok::End, _) => return Ok(out),
                (Tok::Comma, at) => {
                    if self.peek().0 == Tok::End {
                        return Err(format!(
                            "trailing ',' at character {at}: a requirement must follow"
                        ));
                    }
                }
                (tok, at) => {
                    return Err(format!(
                        "found {} at character {at}, expected ',' or the end of the selector",
                        tok.describe()
                    ))
                }
            }
        }
    }

    fn key(&mut self) -> Result<String, String> {
        match self.next() {
            (Tok::Ident(key), at) => {
                validate_key(&key).map_err(|e| format!("key {key:?} at character {at}: {e}"))?;
                Ok(key)
            }
            (tok, at) => Err(format!(
                "found {} at character {at}, expected a label key",
                tok.describe()
            )),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        if self.peek().0 == Tok::Bang {
            self.next();
            let key = self.key()?;
            return match self.peek() {
                (Tok::Comma | Tok::End, _) => Ok(Requirement {
                    key,
                    op: Operator::DoesNotExist,
                }),
                (tok, at) => Err(format!(
                    "found {} at character {at} after '!{key}': '!key' takes no operator or value",
                    tok.describe()
                )),
            };
        }
        let key = self.key()?;
        let (tok, at) = self.peek().clone();
        let op = match tok {
            Tok::Comma | Tok::End => Operator::Exists,
            Tok::Eq | Tok::DoubleEq => {
                self.next();
                Operator::Equals(self.exact_value(&key)?)
            }
            Tok::NotEq => {
                self.next();
                Operator::NotEquals(self.exact_value(&key)?)
            }
            Tok::Ident(word) if word == "in" => {
                self.next();
                Operator::In(self.value_set(&key, "in")?)
            }
            Tok::Ident(word) if word == "notin" => {
                self.next();
                Operator::NotIn(self.value_set(&key, "notin")?)
            }
            Tok::Gt | Tok::Lt => {
                return Err(format!(
                    "operator {} at character {at} is not supported (use =, ==, !=, in, notin, 'key' or '!key')",
                    tok.describe()
                ))
            }
            other => {
                return Err(format!(
                    "found {} at character {at} after key {key:?}, expected an operator (=, ==, !=, in, notin), ',' or the end",
                    other.describe()
                ))
            }
        };
        Ok(Requirement { key, op })
    }

    /// The value after `=`, `==` or `!=`; empty when the requirement ends right there, as in
    /// Kubernetes (`k=` selects the empty value).
    fn exact_value(&mut self, key: &str) -> Result<String, String> {
        match self.peek().clone() {
            (Tok::Comma | Tok::End, _) => Ok(String::new()),
            (Tok::Ident(value), at) => {
                self.next();
                validate_value(&value).map_err(|e| {
                    format!("value {value:?} of key {key:?} at character {at}: {e}")
                })?;
                Ok(value)
            }
            (tok, at) => Err(format!(
                "found {} at character {at}, expected a value for key {key:?}",
                tok.describe()
            )),
        }
    }

    /// `(a,b,...)` after `in`/`notin`. Empty elements are the empty value (`(a,)`), as in
    /// Kubernetes; an empty set `()` is an error.
    fn value_set(&mut self, key: &str, op: &str) -> Result<BTreeSet<String>, String> {
        match self.next() {
            (Tok::LParen, _) => {}
            (tok, at) => {
                return Err(format!(
                    "found {} at character {at}, expected '(' after '{key} {op}'",
                    tok.describe()
                ))
            }
        }
        if let (Tok::RParen, at) = self.peek() {
            return Err(format!(
                "empty value set at character {at}: '{op}' needs at least one value"
            ));
        }
        let mut set = BTreeSet::new();
        loop {
            let value = match self.peek().clone() {
                (Tok::Ident(value), at) => {
                    self.next();
                    validate_value(&value).map_err(|e| {
                        format!("value {value:?} of key {key:?} at character {at}: {e}")
                    })?;
                    value
                }
                _ => String::new(),
            };
            set.insert(value);
            match self.next() {
                (Tok::Comma, _) => continue,
                (Tok::RParen, _) => return Ok(set),
                (tok, at) => {
                    return Err(format!(
                        "found {} at character {at} in the value set of {key:?}, expected a value, ',' or ')'",
                        tok.describe()
                    ))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes name rules (apimachinery validation: IsQualifiedName, IsValidLabelValue,
// IsDNS1123Subdomain, IsDNS1123Label).

const NAME_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, without the length limit.
fn is_qualified_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

const NAME_RULE: &str =
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name at most 63 characters.
pub fn validate_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err("prefix part must not be empty".into());
            }
            if name.contains('/') {
                return Err("a key has at most one '/' (prefix/name)".into());
            }
            (Some(prefix), name)
        }
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        validate_dns1123_subdomain(prefix).map_err(|e| format!("prefix part {e}"))?;
    }
    if name.is_empty() {
        return Err("name part must not be empty".into());
    }
    if name.len() > NAME_MAX {
        return Err(format!(
            "name part must be no more than {NAME_MAX} characters"
        ));
    }
    if !is_qualified_name_part(name) {
        return Err(format!("name part {NAME_RULE}"));
    }
    Ok(())
}

/// A label value: empty, or at most 63 characters of the same alphabet as a key's name.
pub fn validate_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > NAME_MAX {
        return Err(format!("must be no more than {NAME_MAX} characters"));
    }
    if !is_qualified_name_part(value) {
        return Err(NAME_RULE.into());
    }
    Ok(())
}

fn is_dns1123_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            ok(first) && ok(last) && bytes.iter().all(|b| ok(b) || *b == b'-')
        }
        _ => false,
    }
}

/// A DNS-1123 subdomain (label keys' prefix, object names such as a NetworkPolicy's).
pub fn validate_dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > SUBDOMAIN_MAX {
        return Err(format!("must be no more than {SUBDOMAIN_MAX} characters"));
    }
    if s.is_empty() || !s.split('.').all(is_dns1123_label) {
        return Err("must be a lowercase DNS-1123 subdomain: lowercase alphanumeric characters, '-' or '.', starting and ending with an alphanumeric character".into());
    }
    Ok(())
}

/// A DNS-1123 label (namespace names).
pub fn validate_dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > NAME_MAX {
        return Err(format!("must be no more than {NAME_MAX} characters"));
    }
    if !is_dns1123_label(s) {
        return Err("must be a lowercase DNS-1123 label: lowercase alphanumeric characters or '-', starting and ending with an alphanumeric character".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(s: &str) -> String {
        LabelSelector::parse(s).expect_err(s).to_string()
    }

    #[test]
    fn empty_and_blank_selectors_match_everything() {
        for s in ["", "   ", "\t\n"] {
            let selector = sel(s);
            assert!(selector.is_empty());
            assert!(selector.matches(&labels(&[])));
            assert!(selector.matches(&labels(&[("a", "b")])));
            assert_eq!(selector.to_string(), "");
        }
    }

    #[test]
    fn equality_forms() {
        let l = labels(&[("datalab.io/environment", "true"), ("tier", "web")]);
        assert!(sel("datalab.io/environment=true").matches(&l));
        assert!(sel("datalab.io/environment==true").matches(&l));
        assert!(!sel("datalab.io/environment=false").matches(&l));
        assert!(!sel("datalab.io/environment!=true").matches(&l));
        assert!(sel("tier!=db").matches(&l));
        // Absent keys: = fails, != holds (Kubernetes semantics).
        assert!(!sel("missing=x").matches(&l));
        assert!(sel("missing!=x").matches(&l));
        assert_eq!(sel("a==b"), sel("a=b"));
    }

    #[test]
    fn empty_values_are_values() {
        assert!(sel("a=").matches(&labels(&[("a", "")])));
        assert!(!sel("a=").matches(&labels(&[("a", "x")])));
        assert!(!sel("a=").matches(&labels(&[])));
        assert!(sel("a!=").matches(&labels(&[("a", "x")])));
        assert!(sel("a in (,x)").matches(&labels(&[("a", "")])));
        assert!(sel("a in (x,)").matches(&labels(&[("a", "")])));
        assert_eq!(sel("a=,b").requirements().len(), 2);
    }

    #[test]
    fn set_forms() {
        let s = sel("env in (prod, staging)");
        assert!(s.matches(&labels(&[("env", "prod")])));
        assert!(s.matches(&labels(&[("env", "staging")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
        assert!(!s.matches(&labels(&[])));
        let n = sel("env notin (prod)");
        assert!(!n.matches(&labels(&[("env", "prod")])));
        assert!(n.matches(&labels(&[("env", "dev")])));
        assert!(n.matches(&labels(&[])));
    }

    #[test]
    fn existence_forms() {
        assert!(sel("a").matches(&labels(&[("a", "")])));
        assert!(!sel("a").matches(&labels(&[("b", "")])));
        assert!(sel("!a").matches(&labels(&[("b", "")])));
        assert!(!sel("!a").matches(&labels(&[("a", "x")])));
        assert_eq!(sel("! a"), sel("!a"));
    }

    #[test]
    fn comma_is_and() {
        let s = sel("a=1,b,!c,d in (x,y)");
        assert!(s.matches(&labels(&[("a", "1"), ("b", ""), ("d", "x")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", ""), ("c", ""), ("d", "x")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("d", "x")])));
        assert!(!s.matches(&labels(&[("a", "2"), ("b", ""), ("d", "x")])));
    }

    #[test]
    fn tricky_whitespace() {
        let canonical = sel("a=b,c!=d,e in (f,g),h notin (i),j,!k");
        for spaced in [
            "  a = b , c != d , e in ( f , g ) , h notin ( i ) , j , ! k  ",
            "a=b,c!=d,e in(f,g),h notin(i),j,!k",
            "\ta\t=\tb,\nc!=d,e   in (g,f),h notin (i),j,!k",
            "j,!k,a==b,c!=d,h notin (i),e in (f,g)",
        ] {
            assert_eq!(sel(spaced), canonical, "{spaced:?}");
        }
        assert_eq!(
            canonical.to_string(),
            "a=b,c!=d,e in (f,g),h notin (i),j,!k"
        );
        // Blanks separate tokens; they never join or split a value.
        assert!(LabelSelector::parse("a = b c").is_err());
        assert!(LabelSelector::parse("a b").is_err());
        // A value can look like a keyword.
        assert!(sel("a=in").matches(&labels(&[("a", "in")])));
        assert!(sel("a in (in,notin)").matches(&labels(&[("a", "notin")])));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "",
            "a=b",
            "datalab.io/environment=true",
            "a!=",
            "a in (,b)",
            "x notin (1,2,3),y,!z",
            "example.com/team in (blue,red)",
        ] {
            let parsed = sel(s);
            assert_eq!(sel(&parsed.to_string()), parsed, "{s:?}");
        }
    }

    #[test]
    fn syntax_errors_are_clear() {
        assert!(err("a=b,").contains("trailing ','"), "{}", err("a=b,"));
        assert!(err(",a").contains("expected a label key"));
        assert!(err("a=b=c").contains("found '='"));
        assert!(err("!a=b").contains("'!key' takes no operator"));
        assert!(err("a in ()").contains("empty value set"));
        assert!(err("a in (b").contains("expected a value, ',' or ')'"));
        assert!(err("a in b").contains("expected '('"));
        assert!(err("a>1").contains("not supported"));
        assert!(err("a b").contains("after key \"a\""));
        assert!(err("a=(b)").contains("expected a value"));
        assert_eq!(
            err("a=b,,c"),
            "invalid label selector \"a=b,,c\": found ',' at character 5, expected a label key"
        );
    }

    #[test]
    fn keys_and_values_follow_kubernetes_rules() {
        assert!(err("-a=b").contains("key \"-a\""));
        assert!(err("a-=b").contains("name part must consist"));
        assert!(err("Example.COM/a=b").contains("prefix part"));
        assert!(err("/a=b").contains("prefix part must not be empty"));
        assert!(err("a/=b").contains("name part must not be empty"));
        assert!(err("a/b/c=d").contains("at most one '/'"));
        assert!(err(&format!("{}=b", "k".repeat(64))).contains("no more than 63"));
        assert!(err(&format!("a={}", "v".repeat(64))).contains("no more than 63"));
        assert!(err("a=b_").contains("value \"b_\""));
        assert!(err("a in (ok,-bad)").contains("value \"-bad\""));
        assert!(err("a=é").contains("value"));
        sel(&format!(
            "{}/{}={}",
            "p".repeat(253),
            "k".repeat(63),
            "v".repeat(63)
        ));
        sel("A_b.c-D=E_f.g-H");
        sel("kubernetes.io/metadata.name=kube-system");
    }

    #[test]
    fn dns_names() {
        assert!(validate_dns1123_label("kube-system").is_ok());
        assert!(validate_dns1123_label("Kube").is_err());
        assert!(validate_dns1123_label("a.b").is_err());
        assert!(validate_dns1123_label("").is_err());
        assert!(validate_dns1123_label(&"a".repeat(64)).is_err());
        assert!(validate_dns1123_subdomain("allow-web-egress").is_ok());
        assert!(validate_dns1123_subdomain("a.b-c.d").is_ok());
        assert!(validate_dns1123_subdomain("a..b").is_err());
        assert!(validate_dns1123_subdomain("a_b").is_err());
    }
}
