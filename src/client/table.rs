//! Plain-text tables and the printing of API answers as tables or JSON.

use serde_json::Value;

use super::args::Output;

/// The widest a table cell gets; longer values are cut (`--output json` has them whole).
const MAX_CELL_CHARS: usize = 72;

/// A table with a header row; columns are as wide as their widest cell.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.into_iter().map(shorten).collect());
    }

    pub fn render(&self) -> String {
        let header: Vec<String> = self.header.iter().map(|h| h.to_uppercase()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// `text` cut to [`MAX_CELL_CHARS`], ending in `…` when cut.
fn shorten(text: String) -> String {
    if text.chars().count() <= MAX_CELL_CHARS {
        return text;
    }
    let mut short: String = text.chars().take(MAX_CELL_CHARS - 1).collect();
    short.push('…');
    short
}

/// A JSON value as one table cell: strings bare, null as `-`, anything else as compact JSON.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The cells of `fields` of one JSON object.
pub fn cells(object: &Value, fields: &[&str]) -> Vec<String> {
    fields.iter().map(|f| cell(&object[*f])).collect()
}

/// `key  value` lines for the named fields of an object.
pub fn fields(object: &Value, names: &[&str]) -> String {
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
    names
        .iter()
        .map(|name| format!("{name:<width$}  {}\n", cell(&object[*name])))
        .collect()
}

/// Prints `body` as pretty JSON, or as the table `table` makes of it.
pub fn print(output: Output, body: &Value, table: impl FnOnce(&Value) -> String) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(body).unwrap_or_else(|_| body.to_string())
        ),
        Output::Table => print!("{}", table(body)),
    }
}

/// A page of `items` as a table of `columns`, with the cursor of the next page if any.
pub fn page(body: &Value, columns: &[&'static str]) -> String {
    let mut table = Table::new(columns);
    for item in body["items"].as_array().into_iter().flatten() {
        table.row(cells(item, columns));
    }
    let mut out = table.render();
    if let Some(next) = body["next_cursor"].as_str() {
        out.push_str(&format!("next page: --cursor {next}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut table = Table::new(&["name", "state"]);
        table.row(vec!["zitadel".into(), "ready".into()]);
        table.row(vec!["a".into(), "-".into()]);
        assert_eq!(
            table.render(),
            "NAME     STATE\nzitadel  ready\na        -\n"
        );
    }

    #[test]
    fn long_cells_are_cut() {
        let mut table = Table::new(&["v"]);
        table.row(vec!["x".repeat(100)]);
        let line = table.render().lines().nth(1).expect("row").to_owned();
        assert_eq!(line.chars().count(), MAX_CELL_CHARS);
        assert!(line.ends_with('…'));
    }

    #[test]
    fn cells_show_null_as_a_dash_and_objects_as_json() {
        let object = json!({"a": null, "b": "x", "c": {"k": 1}, "d": 3});
        assert_eq!(
            cells(&object, &["a", "b", "c", "d"]),
            ["-", "x", "{\"k\":1}", "3"]
        );
    }
}
