//! The report: one table, each figure beside direct TCP and rathole-with-TLS from the same
//! run, as ratios; or the same as JSON (`--json`).

use std::collections::HashMap;

use serde_json::json;

use crate::paths::Column;

/// Whether more is better (throughput) or less (latency, memory, time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    Higher,
    Lower,
}

/// One figure per column.
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) section: &'static str,
    pub(crate) name: String,
    pub(crate) unit: &'static str,
    pub(crate) better: Better,
    pub(crate) values: HashMap<Column, f64>,
}

/// Everything measured in one run.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    /// What was not measured, and why.
    pub(crate) skipped: Vec<String>,
    /// One-line facts about the run (machine, sizes).
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn add(
        &mut self,
        section: &'static str,
        name: impl Into<String>,
        unit: &'static str,
        better: Better,
        values: impl IntoIterator<Item = (Column, f64)>,
    ) {
        self.rows.push(Row {
            section,
            name: name.into(),
            unit,
            better,
            values: values.into_iter().filter(|(_, v)| v.is_finite()).collect(),
        });
    }

    fn ratio(row: &Row, col: Column, base: Column) -> Option<f64> {
        let (v, b) = (row.values.get(&col)?, row.values.get(&base)?);
        (*b != 0.0).then(|| v / b)
    }

    pub(crate) fn print_table(&self) {
        for note in &self.notes {
            println!("{note}");
        }
        println!(
            "ratios: x dir = the figure ÷ direct TCP's; x rh = ÷ rathole-with-TLS's (same run)."
        );
        let mut section = "";
        for row in &self.rows {
            if row.section != section {
                section = row.section;
                println!();
                println!("{section}");
                println!(
                    "{:<34} {:>7} {:>9} | {:>9} {:>6} {:>6} | {:>9} {:>6} {:>6} | {:>9} {:>6}",
                    "",
                    "unit",
                    "direct",
                    "quic",
                    "x dir",
                    "x rh",
                    "grpc",
                    "x dir",
                    "x rh",
                    "rathole",
                    "x dir"
                );
            }
            let v = |c: Column| row.values.get(&c).map_or("-".to_owned(), |v| fmt(*v));
            let r = |c: Column, b: Column| {
                Self::ratio(row, c, b).map_or("-".to_owned(), |x| format!("{x:.2}"))
            };
            println!(
                "{:<34} {:>7} {:>9} | {:>9} {:>6} {:>6} | {:>9} {:>6} {:>6} | {:>9} {:>6}",
                row.name,
                row.unit,
                v(Column::Direct),
                v(Column::Quic),
                r(Column::Quic, Column::Direct),
                r(Column::Quic, Column::Rathole),
                v(Column::Grpc),
                r(Column::Grpc, Column::Direct),
                r(Column::Grpc, Column::Rathole),
                v(Column::Rathole),
                r(Column::Rathole, Column::Direct),
            );
        }
        if !self.skipped.is_empty() {
            println!();
            for s in &self.skipped {
                println!("skipped: {s}");
            }
        }
    }

    pub(crate) fn print_json(&self) {
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|row| {
                let values: serde_json::Map<_, _> = Column::ALL
                    .iter()
                    .filter_map(|c| Some((c.name().to_owned(), json!(row.values.get(c)?))))
                    .collect();
                let mut ratios = serde_json::Map::new();
                for c in [Column::Quic, Column::Grpc, Column::Rathole] {
                    for b in [Column::Direct, Column::Rathole] {
                        if c != b
                            && let Some(x) = Self::ratio(row, c, b)
                        {
                            ratios.insert(format!("{}_vs_{}", c.name(), b.name()), json!(x));
                        }
                    }
                }
                json!({
                    "section": row.section,
                    "name": row.name,
                    "unit": row.unit,
                    "better": if row.better == Better::Higher { "higher" } else { "lower" },
                    "values": values,
                    "ratios": ratios,
                })
            })
            .collect();
        let doc = json!({ "notes": self.notes, "rows": rows, "skipped": self.skipped });
        println!("{doc}");
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
