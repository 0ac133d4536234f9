//! From a row change to the cache keys it touches: key templates and the rules for
//! inserts, updates (old keys too), deletes and truncates. Pure and synchronous.
//!
//! A row is seen as [`Cell`]s by column name. A cell is `Unknown` when the change does
//! not carry its value: an unchanged TOASTed value in a new tuple (taken from the old
//! tuple when that has it), or a column outside the replica identity in an old tuple of
//! a table without `REPLICA IDENTITY FULL`. A key whose template needs an unknown value
//! cannot be named, so the whole key space of that template is invalidated instead
//! ([`KeyChange::InvalidatePrefix`]): correct, but heavy, which is why tables whose key
//! columns are not all in the replica identity get a warning at start-up.

use crate::config::{Mode, TableMapping};
use bytes::Bytes;
use std::collections::BTreeMap;

/// Why a key template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{` without its `}`.
    #[error("key template {0:?}: unclosed `{{` (write `{{{{` for a literal brace)")]
    Unclosed(String),
    /// `}` without a `{` before it.
    #[error("key template {0:?}: unmatched `}}` (write `}}}}` for a literal brace)")]
    Unmatched(String),
    /// `{}`.
    #[error("key template {0:?}: empty column name in `{{}}`")]
    EmptyColumn(String),
    /// An empty template.
    #[error("key template is empty")]
    Empty,
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
}

/// A key template such as `user_by_email:{email}`: literal text and column placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    source: String,
    parts: Vec<Part>,
}

/// A column value as far as a row change tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    /// SQL NULL.
    Null,
    /// Not carried by the change (unchanged TOAST, or outside the replica identity).
    Unknown,
    /// The value in Postgres's text format.
    Text(&'a [u8]),
}

/// What rendering a template against a row gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    /// The key.
    Key(Bytes),
    /// A placeholder column is NULL: the row has no such key.
    Null,
    /// A placeholder column's value is not known.
    Unknown,
}

impl KeyTemplate {
    /// Parses `user:{id}`; `{{` and `}}` stand for literal braces.
    ///
    /// # Errors
    /// [`TemplateError`] for unbalanced braces, `{}` or an empty template.
    pub fn parse(source: &str) -> Result<KeyTemplate, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::Unmatched(source.to_owned())),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(TemplateError::Unclosed(source.to_owned()))
                            }
                            Some(c) => name.push(c),
                        }
                    }
                    if name.is_empty() {
                        return Err(TemplateError::EmptyColumn(source.to_owned()));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(name));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(KeyTemplate {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The columns it reads, in order.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// The literal text before the first placeholder: every key of this template starts
    /// with it (empty when the template starts with a placeholder: then "every key").
    pub fn prefix(&self) -> Bytes {
        match self.parts.first() {
            Some(Part::Literal(l)) => Bytes::copy_from_slice(l.as_bytes()),
            _ => Bytes::new(),
        }
    }

    /// The key for a row whose columns `cell` looks up.
    pub fn render<'a>(&self, cell: impl Fn(&str) -> Cell<'a>) -> Rendered {
        let mut key = Vec::with_capacity(self.source.len() + 16);
        for part in &self.parts {
            match part {
                Part::Literal(l) => key.extend_from_slice(l.as_bytes()),
                Part::Column(c) => match cell(c) {
                    Cell::Text(v) => key.extend_from_slice(v),
                    Cell::Null => return Rendered::Null,
                    Cell::Unknown => return Rendered::Unknown,
                },
            }
        }
        Rendered::Key(Bytes::from(key))
    }
}

/// A row as a change carries it: cells by column name.
#[derive(Debug, Clone, Default)]
pub struct Row<'a> {
    cells: BTreeMap<&'a str, Cell<'a>>,
    order: Vec<&'a str>,
}

impl<'a> Row<'a> {
    /// A row from `(column, cell)` pairs in table order.
    pub fn new(cells: impl IntoIterator<Item = (&'a str, Cell<'a>)>) -> Row<'a> {
        let mut row = Row::default();
        for (name, cell) in cells {
            row.order.push(name);
            row.cells.insert(name, cell);
        }
        row
    }

    /// The cell of `column` (`Unknown` for a column the row does not have).
    pub fn cell(&self, column: &str) -> Cell<'a> {
        self.cells.get(column).copied().unwrap_or(Cell::Unknown)
    }

    /// This row with its unknown cells taken from `old` where `old` knows them (an
    /// update's new tuple does not repeat unchanged TOASTed values).
    fn filled_from(&self, old: Option<&Row<'a>>) -> Row<'a> {
        let mut row = self.clone();
        if let Some(old) = old {
            for (name, cell) in row.cells.iter_mut() {
                if *cell == Cell::Unknown {
                    *cell = old.cell(name);
                }
            }
        }
        row
    }

    /// The row as a JSON object of column → text (null for NULL), restricted to
    /// `columns` when given; `None` when an included value is unknown.
    fn to_json(&self, columns: Option<&[String]>) -> Option<Bytes> {
        let mut object = serde_json::Map::new();
        for name in &self.order {
            if columns.is_some_and(|c| !c.iter().any(|c| c == name)) {
                continue;
            }
            let value = match self.cell(name) {
                Cell::Null => serde_json::Value::Null,
                Cell::Unknown => return None,
                Cell::Text(t) => serde_json::Value::String(String::from_utf8_lossy(t).into()),
            };
            object.insert((*name).to_owned(), value);
        }
        serde_json::to_vec(&object).ok().map(Bytes::from)
    }
}

/// What a row change does to one key (or key space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// Remove the key.
    Invalidate(Bytes),
    /// Store the row (update mode), with the table's TTL.
    Put(Bytes, Bytes),
    /// Remove every key starting with this prefix (and refuse older fills under it).
    InvalidatePrefix(Bytes),
}

impl KeyChange {
    /// The key or prefix concerned.
    pub fn key(&self) -> &Bytes {
        match self {
            KeyChange::Invalidate(k) | KeyChange::Put(k, _) | KeyChange::InvalidatePrefix(k) => k,
        }
    }
}

impl TableMapping {
    /// The changes for a row as it is now (insert, or the new side of an update):
    /// `Put` in update mode when the whole row is known, else `Invalidate`.
    fn new_side(&self, row: &Row<'_>, out: &mut Vec<KeyChange>) -> Vec<Bytes> {
        let json = match self.mode {
            Mode::Update => row.to_json(self.columns.as_deref()),
            Mode::Invalidate => None,
        };
        let mut keys = Vec::new();
        for template in &self.keys {
            match template.render(|c| row.cell(c)) {
                Rendered::Key(k) => {
                    keys.push(k.clone());
                    out.push(match &json {
                        Some(j) => KeyChange::Put(k, j.clone()),
                        None => KeyChange::Invalidate(k),
                    });
                }
                Rendered::Null => {}
                Rendered::Unknown => out.push(KeyChange::InvalidatePrefix(template.prefix())),
            }
        }
        keys
    }

    /// The invalidations for a row as it was (delete, or the old side of an update),
    /// except for keys in `keep` (still derived from the new row).
    fn old_side(&self, row: &Row<'_>, keep: &[Bytes], out: &mut Vec<KeyChange>) {
        for template in &self.keys {
            match template.render(|c| row.cell(c)) {
                Rendered::Key(k) if !keep.contains(&k) => out.push(KeyChange::Invalidate(k)),
                Rendered::Key(_) | Rendered::Null => {}
                Rendered::Unknown => out.push(KeyChange::InvalidatePrefix(template.prefix())),
            }
        }
    }

    /// The changes an INSERT of `new` makes.
    pub fn on_insert(&self, new: &Row<'_>) -> Vec<KeyChange> {
        let mut out = Vec::new();
        self.new_side(new, &mut out);
        out
    }

    /// The changes an UPDATE makes. `old` is the old tuple when the change carries one
    /// (replica identity FULL, or an identity column changed).
    pub fn on_update(&self, old: Option<&Row<'_>>, new: &Row<'_>) -> Vec<KeyChange> {
        let mut out = Vec::new();
        let new = new.filled_from(old);
        let keep = self.new_side(&new, &mut out);
        if let Some(old) = old {
            self.old_side(old, &keep, &mut out);
        }
        out
    }

    /// The changes a DELETE of `old` makes.
    pub fn on_delete(&self, old: &Row<'_>) -> Vec<KeyChange> {
        let mut out = Vec::new();
        self.old_side(old, &[], &mut out);
        out
    }

    /// The changes a TRUNCATE makes: every key space of the table.
    pub fn on_truncate(&self) -> Vec<KeyChange> {
        let mut out: Vec<KeyChange> = Vec::new();
        for template in &self.keys {
            let change = KeyChange::InvalidatePrefix(template.prefix());
            if !out.contains(&change) {
                out.push(change);
            }
        }
        out
    }

    /// The template columns missing from `identity` (the replica identity's columns;
    /// `None` for FULL): an update changing them cannot invalidate the old key.
    pub fn columns_outside(&self, identity: Option<&[String]>) -> Vec<String> {
        let Some(identity) = identity else {
            return Vec::new();
        };
        let mut missing: Vec<String> = Vec::new();
        for c in self.keys.iter().flat_map(|t| t.columns()) {
            if !identity.iter().any(|i| i == c) && !missing.iter().any(|m| m == c) {
                missing.push(c.to_owned());
            }
        }
        missing
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn users(mode: Mode) -> TableMapping {
        TableMapping {
            schema: "public".into(),
            table: "users".into(),
            keys: vec![
                KeyTemplate::parse("user:{id}").unwrap(),
                KeyTemplate::parse("user_by_email:{email}").unwrap(),
            ],
            mode,
            ttl: Some(Duration::from_secs(60)),
            columns: None,
        }
    }

    fn row<'a>(id: &'a str, email: Cell<'a>, name: Cell<'a>) -> Row<'a> {
        Row::new([
            ("id", Cell::Text(id.as_bytes())),
            ("email", email),
            ("name", name),
        ])
    }

    fn inv(k: &str) -> KeyChange {
        KeyChange::Invalidate(Bytes::copy_from_slice(k.as_bytes()))
    }

    #[test]
    fn templates_parse_and_render() {
        let t = KeyTemplate::parse("a{{b}}:{x}:{y}!").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["x", "y"]);
        assert_eq!(t.prefix(), Bytes::from_static(b"a{b}:"));
        let r = Row::new([("x", Cell::Text(b"1")), ("y", Cell::Text(b"2"))]);
        assert_eq!(
            t.render(|c| r.cell(c)),
            Rendered::Key(Bytes::from_static(b"a{b}:1:2!"))
        );
        let r = Row::new([("x", Cell::Null), ("y", Cell::Text(b"2"))]);
        assert_eq!(t.render(|c| r.cell(c)), Rendered::Null);
        assert_eq!(KeyTemplate::parse("{id}").unwrap().prefix(), Bytes::new());
        for bad in ["", "a{", "a}", "{}", "a{b{c}}"] {
            assert!(KeyTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn insert_update_delete_in_invalidate_mode() {
        let m = users(Mode::Invalidate);
        let new = row("1", Cell::Text(b"a@x"), Cell::Text(b"Ada"));
        assert_eq!(m.on_insert(&new), [inv("user:1"), inv("user_by_email:a@x")]);
        // email changed: the old email key goes too.
        let old = row("1", Cell::Text(b"old@x"), Cell::Text(b"Ada"));
        assert_eq!(
            m.on_update(Some(&old), &new),
            [
                inv("user:1"),
                inv("user_by_email:a@x"),
                inv("user_by_email:old@x")
            ]
        );
        // no old tuple (default identity, key unchanged): the new keys only.
        assert_eq!(m.on_update(None, &new).len(), 2);
        assert_eq!(
            m.on_delete(&old),
            [inv("user:1"), inv("user_by_email:old@x")]
        );
        // NULL email: no such key.
        let nul = row("2", Cell::Null, Cell::Null);
        assert_eq!(m.on_insert(&nul), [inv("user:2")]);
        // delete with only the identity (email unknown): the whole email key space.
        let key_only = row("3", Cell::Unknown, Cell::Unknown);
        assert_eq!(
            m.on_delete(&key_only),
            [
                inv("user:3"),
                KeyChange::InvalidatePrefix(Bytes::from_static(b"user_by_email:"))
            ]
        );
        assert_eq!(m.on_truncate().len(), 2);
    }

    #[test]
    fn update_mode_writes_the_row_as_json() {
        let m = users(Mode::Update);
        let new = row("1", Cell::Text(b"a@x"), Cell::Null);
        let changes = m.on_insert(&new);
        let KeyChange::Put(k, v) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!(k.as_ref(), b"user:1");
        let json: serde_json::Value = serde_json::from_slice(v).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "1", "email": "a@x", "name": null})
        );
        // an unchanged TOASTed value is taken from the old tuple...
        let old = row("1", Cell::Text(b"a@x"), Cell::Text(b"long"));
        let new = row("1", Cell::Text(b"a@x"), Cell::Unknown);
        let changes = m.on_update(Some(&old), &new);
        assert!(
            matches!(&changes[0], KeyChange::Put(_, v) if v.as_ref().windows(4).any(|w| w == b"long"))
        );
        // ...and without it the keys are invalidated instead of written half.
        let changes = m.on_update(None, &new);
        assert_eq!(changes, [inv("user:1"), inv("user_by_email:a@x")]);
    }

    #[test]
    fn identity_coverage() {
        let m = users(Mode::Invalidate);
        assert_eq!(m.columns_outside(Some(&["id".into()])), ["email"]);
        assert!(m.columns_outside(None).is_empty());
    }
}
