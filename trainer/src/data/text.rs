//! Labelled text from CSV, TSV or JSONL files: rows read with errors that name the file
//! and line, labels mapped to indices (the spec's names, or the sorted set found in the
//! data), and batches tokenised with the model's tokenizer, padded to the longest text of
//! each batch (never to a fixed length).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use ringmaster_crds::{DataFormat, DataSpec};
use ringmaster_nn::models::bert::BertInput;
use tokenizers::Tokenizer;

use super::batches::{Batch, Examples, Input};
use super::{Labelled, hold_out};
use crate::error::{Error, Result};
use crate::rng::TrainRng;

/// One labelled text.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: usize,
}

/// A row as read, before its label is mapped.
#[derive(Debug, Clone)]
struct Row {
    text: String,
    label: String,
    line: usize,
}

/// Reads `spec.train` (and `spec.validation`, or holds out `validationSplit` of the
/// training rows, chosen by `seed`). `labels`: the spec's names; empty means the sorted
/// set of labels in the training data.
pub fn load(spec: &DataSpec, labels: &[String], seed: u64) -> Result<Labelled<Example>> {
    let train_path = Path::new(&spec.train);
    let train_rows = read_rows(train_path, spec)?;
    let labels: Vec<String> = if labels.is_empty() {
        let found: BTreeSet<&str> = train_rows.iter().map(|r| r.label.as_str()).collect();
        found.into_iter().map(str::to_string).collect()
    } else {
        labels.to_vec()
    };
    if labels.len() < 2 {
        return Err(Error::Config(format!(
            "{}: the data has {} distinct label(s); classification needs at least 2",
            train_path.display(),
            labels.len()
        )));
    }
    let mut train = map_labels(train_rows, &labels, train_path)?;
    let validation = match &spec.validation {
        Some(path) => {
            let path = Path::new(path);
            map_labels(read_rows(path, spec)?, &labels, path)?
        }
        None => hold_out(&mut train, spec.validation_split, seed),
    };
    Ok(Labelled {
        train,
        validation,
        labels,
    })
}

fn read_rows(path: &Path, spec: &DataSpec) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: "reading the dataset",
        path: path.to_path_buf(),
        source,
    })?;
    let rows = match spec.format {
        DataFormat::Jsonl => read_jsonl(&text, path, spec)?,
        DataFormat::Csv => read_delimited(&text, b',', path, spec)?,
        DataFormat::Tsv => read_delimited(&text, b'\t', path, spec)?,
        other => {
            return Err(Error::Config(format!(
                "{}: format {other:?} is not a text format (csv, tsv, jsonl)",
                path.display()
            )));
        }
    };
    if rows.is_empty() {
        return Err(Error::Config(format!(
            "{}: the dataset has no rows",
            path.display()
        )));
    }
    Ok(rows)
}

/// A field named by header name, or by a 0-based column index.
fn column(field: &str, header: Option<&csv::StringRecord>, path: &Path) -> Result<usize> {
    if let Some(pos) = header.and_then(|h| h.iter().position(|c| c.trim() == field)) {
        return Ok(pos);
    }
    field.trim().parse().map_err(|_| {
        let known = header.map_or(
            "the file has no header row (header: false)".to_string(),
            |h| format!("the header names {:?}", h.iter().collect::<Vec<_>>()),
        );
        Error::Config(format!(
            "{}: no column {field:?}: {known}; name a column or give its 0-based index",
            path.display()
        ))
    })
}

fn read_delimited(text: &str, delimiter: u8, path: &Path, spec: &DataSpec) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(spec.header)
        .flexible(true)
        // TSV files such as the SMS spam collection hold stray quotes inside fields.
        .quoting(delimiter == b',')
        .from_reader(text.as_bytes());
    let header = if spec.header {
        Some(reader.headers().map_err(|e| bad_row(path, 1, e))?.clone())
    } else {
        None
    };
    let text_col = column(&spec.text_field, header.as_ref(), path)?;
    let label_col = column(&spec.label_field, header.as_ref(), path)?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            bad_row(path, line, e)
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.iter().all(|f| f.trim().is_empty()) {
            continue;
        }
        let get = |col: usize, what: &str| {
            record.get(col).map(str::to_string).ok_or_else(|| {
                Error::Config(format!(
                    "{}:{line}: row has {} fields, the {what} is column {col}",
                    path.display(),
                    record.len()
                ))
            })
        };
        rows.push(Row {
            text: get(text_col, "text")?,
            label: get(label_col, "label")?.trim().to_string(),
            line,
        });
    }
    Ok(rows)
}

fn read_jsonl(text: &str, path: &Path, spec: &DataSpec) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad_row(path, line_no, e))?;
        let field = |name: &str| -> Result<String> {
            match value.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(other) => Err(Error::Config(format!(
                    "{}:{line_no}: field {name:?} is {other}, expected a string or number",
                    path.display()
                ))),
                None => Err(Error::Config(format!(
                    "{}:{line_no}: no field {name:?}",
                    path.display()
                ))),
            }
        };
        rows.push(Row {
            text: field(&spec.text_field)?,
            label: field(&spec.label_field)?.trim().to_string(),
            line: line_no,
        });
    }
    Ok(rows)
}

fn bad_row(path: &Path, line: usize, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("{}:{line}: malformed row: {e}", path.display()))
}

/// Labels may be names from `labels` or indices into it.
fn map_labels(rows: Vec<Row>, labels: &[String], path: &Path) -> Result<Vec<Example>> {
    rows.into_iter()
        .map(|row| {
            let label = labels
                .iter()
                .position(|l| *l == row.label)
                .or_else(|| {
                    row.label
                        .parse::<usize>()
                        .ok()
                        .filter(|i| *i < labels.len())
                })
                .ok_or_else(|| {
                    Error::Config(format!(
                        "{}:{}: label {:?} is not one of {labels:?} (nor an index below {})",
                        path.display(),
                        row.line,
                        row.label,
                        labels.len()
                    ))
                })?;
            Ok(Example {
                text: row.text,
                label,
            })
        })
        .collect()
}

/// Labelled texts and the tokenizer that turns them into model input.
pub struct TextExamples {
    examples: Vec<Example>,
    tokenizer: Arc<Tokenizer>,
}

impl TextExamples {
    pub fn new(examples: Vec<Example>, tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            examples,
            tokenizer,
        }
    }
}

impl Examples for TextExamples {
    fn len(&self) -> usize {
        self.examples.len()
    }

    fn label(&self, index: usize) -> usize {
        self.examples[index].label
    }

    /// Texts have no augmentation: `_augment` is unused.
    fn batch(&self, indices: &[usize], _augment: Option<TrainRng>) -> Result<Batch> {
        // One text at a time: `encode_batch` fans out on rayon's pool, where the model's
        // own kernels run, and this thread is meant to use only the time they leave.
        let encodings = indices
            .iter()
            .map(|&i| self.tokenizer.encode(self.examples[i].text.as_str(), true))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Config(format!("tokenising a batch: {e}")))?;
        let longest = encodings
            .iter()
            .map(|e| e.get_ids().len())
            .max()
            .unwrap_or(1);
        let pad = self.tokenizer.token_to_id("[PAD]").unwrap_or(0);
        let n = indices.len();
        let (mut ids, mut mask, mut types) = (
            Vec::with_capacity(n * longest),
            Vec::with_capacity(n * longest),
            Vec::with_capacity(n * longest),
        );
        for e in &encodings {
            let len = e.get_ids().len();
            let padding = longest - len;
            ids.extend(
                e.get_ids()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, padding)),
            );
            types.extend(
                e.get_type_ids()
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, padding)),
            );
            mask.extend((0..longest).map(|p| u32::from(p < len)));
        }
        let labels: Vec<u32> = indices.iter().map(|&i| self.label(i) as u32).collect();
        let cpu = Device::Cpu;
        Ok(Batch {
            input: Input::Text(BertInput {
                input_ids: Tensor::from_vec(ids, (n, longest), &cpu)?,
                token_type_ids: Some(Tensor::from_vec(types, (n, longest), &cpu)?),
                attention_mask: Some(Tensor::from_vec(mask, (n, longest), &cpu)?),
            }),
            labels: Tensor::from_vec(labels, n, &cpu)?,
            size: n,
        })
    }
}

/// Sets truncation to `max_len` tokens ([CLS] and [SEP] included).
pub fn truncate_to(tokenizer: &mut Tokenizer, max_len: usize) -> Result<()> {
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::Config(format!("cannot truncate to {max_len} tokens: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: &str, extra: &str, train: &Path) -> DataSpec {
        serde_yaml::from_str(&format!(
            "{{train: {:?}, format: {format}{extra}}}",
            train.display().to_string()
        ))
        .unwrap()
    }

    #[test]
    fn tsv_without_header_by_index_with_discovered_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spam.tsv");
        let rows: String = (0..20)
            .map(|i| {
                format!(
                    "{}\tmessage \"{i}\n",
                    if i % 4 == 0 { "spam" } else { "ham" }
                )
            })
            .collect();
        std::fs::write(&path, rows).unwrap();
        let s = spec(
            "tsv",
            ", header: false, labelField: '0', textField: '1', validationSplit: 0.2",
            &path,
        );
        let data = load(&s, &[], 7).unwrap();
        assert_eq!(data.labels, ["ham", "spam"]);
        assert_eq!((data.train.len(), data.validation.len()), (16, 4));
        assert!(data.train.iter().any(|e| e.text == "message \"3"));
        let again = load(&s, &[], 7).unwrap();
        assert_eq!(
            again.validation, data.validation,
            "the split follows the seed"
        );
        let other = load(&s, &[], 8).unwrap();
        assert_ne!(other.validation, data.validation);
    }

    #[test]
    fn csv_and_jsonl_by_name_and_errors_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let csv_path = dir.path().join("d.csv");
        std::fs::write(
            &csv_path,
            "text,label\n\"a, quoted\",pos\nplain,neg\nthird,maybe\n",
        )
        .unwrap();
        let labels = ["neg".to_string(), "pos".to_string()];
        let err = load(&spec("csv", "", &csv_path), &labels, 1).unwrap_err();
        assert!(
            err.to_string().contains("d.csv:4: label \"maybe\""),
            "{err}"
        );
        std::fs::write(&csv_path, "text,label\n\"a, quoted\",pos\nplain,1\n").unwrap();
        let data = load(
            &spec("csv", ", validation: null, validationSplit: 0", &csv_path),
            &labels,
            1,
        )
        .unwrap();
        assert_eq!(
            data.train[0],
            Example {
                text: "a, quoted".into(),
                label: 1
            }
        );
        assert_eq!(data.train[1].label, 1, "an index is a label too");

        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\": \"x\", \"label\": \"pos\"}\n{\"text\": \"y\"\n",
        )
        .unwrap();
        let err = load(&spec("jsonl", "", &jsonl), &labels, 1).unwrap_err();
        assert!(
            err.to_string().contains("d.jsonl:2: malformed row"),
            "{err}"
        );
        let err = load(&spec("csv", ", textField: body", &csv_path), &labels, 1).unwrap_err();
        assert!(err.to_string().contains("no column \"body\""), "{err}");
        let empty = dir.path().join("empty.csv");
        std::fs::write(&empty, "text,label\n").unwrap();
        let err = load(&spec("csv", "", &empty), &labels, 1).unwrap_err();
        assert!(err.to_string().contains("has no rows"), "{err}");
    }
}
