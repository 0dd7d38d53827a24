//! kubectl-style output: aligned tables with upper-case headers, `AGE` columns in kubectl's
//! human duration format, and `-o json|yaml|name` documents.

use crate::{errln, outln};

use chrono::{DateTime, Utc};
use clap::ValueEnum;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// Columns, like `kubectl get` (the default).
    #[default]
    #[value(skip)]
    Table,
    /// More columns.
    Wide,
    Json,
    Yaml,
    /// `kind.group/name` per object.
    Name,
}

impl Output {
    pub fn is_document(self) -> bool {
        matches!(self, Output::Json | Output::Yaml)
    }
}

/// Column-aligned rows, three spaces between columns, like kubectl's tabwriter.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table { rows: vec![headers.iter().map(|h| h.to_string()).collect()] }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0usize; cols];
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &self.rows {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                line.push_str(c);
                if i + 1 < r.len() {
                    line.extend(std::iter::repeat_n(' ', widths[i] - c.chars().count() + 3));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        crate::output::write_out(self.render().as_bytes());
    }
}

/// kubectl's `HumanDuration`: `45s`, `5m30s`, `45m`, `3h20m`, `30h`, `3d5h`, `200d`, `2y30d`, `10y`.
pub fn human_duration(d: chrono::Duration) -> String {
    let secs = d.num_seconds();
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 60 * 2 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 { format!("{minutes}m") } else { format!("{minutes}m{s}s") };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 { format!("{hours}h") } else { format!("{hours}h{m}m") };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 { format!("{days}d") } else { format!("{days}d{h}h") };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        let dy = days % 365;
        return if dy == 0 { format!("{years}y") } else { format!("{years}y{dy}d") };
    }
    format!("{years}y")
}

pub fn time_of(t: &Time) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.0.as_second(), 0)
}

pub fn parse_rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

/// AGE of a timestamp, `<unknown>` when absent.
pub fn age(t: Option<DateTime<Utc>>) -> String {
    match t {
        Some(t) => human_duration(Utc::now() - t),
        None => "<unknown>".into(),
    }
}

pub fn creation_age<K: Resource>(o: &K) -> String {
    age(o.meta().creation_timestamp.as_ref().and_then(time_of))
}

pub fn dash(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into())
}

pub fn phase_str<P: std::fmt::Debug>(p: Option<P>) -> String {
    p.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into())
}

pub fn bytes(n: Option<u64>) -> String {
    n.map(hoard_core::util::human_bytes).unwrap_or_else(|| "-".into())
}

/// The object as kubectl prints it: `apiVersion` and `kind` first.
pub fn to_value<K: Resource<DynamicType = ()> + Serialize>(o: &K) -> serde_json::Value {
    let mut v = serde_json::to_value(o).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut v {
        let mut ordered = serde_json::Map::new();
        ordered.insert("apiVersion".into(), K::api_version(&()).into());
        ordered.insert("kind".into(), K::kind(&()).into());
        for (k, mut val) in std::mem::take(map) {
            if k == "metadata"
                && let serde_json::Value::Object(meta) = &mut val
            {
                // Like kubectl without --show-managed-fields.
                meta.remove("managedFields");
            }
            if k != "apiVersion" && k != "kind" {
                ordered.insert(k, val);
            }
        }
        *map = ordered;
    }
    v
}

/// `backupsession.hoard.dev/name`.
pub fn name_of<K: Resource<DynamicType = ()>>(o: &K) -> String {
    let group = K::group(&());
    let kind = K::kind(&()).to_ascii_lowercase();
    let name = o.meta().name.clone().unwrap_or_default();
    if group.is_empty() { format!("{kind}/{name}") } else { format!("{kind}.{group}/{name}") }
}

pub fn print_document(v: &serde_json::Value, output: Output) -> anyhow::Result<()> {
    let mut text = match output {
        Output::Yaml => serde_yaml::to_string(v)?.into_bytes(),
        _ => serde_json::to_vec_pretty(v)?,
    };
    if !text.ends_with(b"\n") {
        text.push(b'\n');
    }
    crate::output::write_out(&text);
    Ok(())
}

/// One object in `-o json|yaml|name`.
pub fn print_object<K: Resource<DynamicType = ()> + Serialize>(o: &K, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Name => {
            outln!("{}", name_of(o));
            Ok(())
        }
        _ => print_document(&to_value(o), output),
    }
}

/// A list in `-o json|yaml|name`: a `v1/List` document, as kubectl prints one.
pub fn print_list<K: Resource<DynamicType = ()> + Serialize>(items: &[K], output: Output) -> anyhow::Result<()> {
    if output == Output::Name {
        for o in items {
            outln!("{}", name_of(o));
        }
        return Ok(());
    }
    let v = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": items.iter().map(to_value).collect::<Vec<_>>(),
        "metadata": {"resourceVersion": ""},
    });
    print_document(&v, output)
}

/// kubectl's message for an empty list (on stderr; stdout stays empty).
pub fn no_resources(ns: Option<&str>) {
    match ns {
        Some(ns) => errln!("No resources found in {ns} namespace."),
        None => errln!("No resources found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        let s = chrono::Duration::seconds;
        for (secs, want) in [
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (330, "5m30s"),
            (45 * 60, "45m"),
            (3 * 3600 + 20 * 60, "3h20m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 5 * 3600, "3d5h"),
            (200 * 86400, "200d"),
            (2 * 365 * 86400 + 30 * 86400, "2y30d"),
            (10 * 365 * 86400, "10y"),
        ] {
            assert_eq!(human_duration(s(secs)), want, "{secs}");
        }
        assert_eq!(human_duration(s(-5)), "<invalid>");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["NAME", "PHASE", "AGE"]);
        t.row(vec!["a-long-name".into(), "Succeeded".into(), "5m".into()]);
        t.row(vec!["b".into(), "-".into(), "10s".into()]);
        assert_eq!(
            t.render(),
            "NAME          PHASE       AGE\na-long-name   Succeeded   5m\nb             -           10s\n"
        );
    }
}
