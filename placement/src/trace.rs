//! Reading the openb traces and the paper's result tables. Errors name the file and line.

use std::path::{Path, PathBuf};

use crate::cluster::Node;
use crate::error::{Error, Result};
use crate::request::{GpuDemand, PodRequest};

/// Pod slots per node in the simulator (never binding).
pub const TRACE_MAX_PODS: u32 = 1001;

/// The trace directory inside this repository.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/traces")
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A CSV file with a header; yields (line number, fields by header position).
struct Csv<'a> {
    path: &'a Path,
    header: Vec<&'a str>,
    lines: std::iter::Enumerate<std::str::Lines<'a>>,
}

impl<'a> Csv<'a> {
    fn new(path: &'a Path, text: &'a str) -> Result<Csv<'a>> {
        let mut lines = text.lines().enumerate();
        let header = match lines.next() {
            Some((_, h)) => h.trim_end_matches('\r').split(',').collect(),
            None => return Err(parse_error(path, 1, "empty file, expected a CSV header")),
        };
        Ok(Csv {
            path,
            header,
            lines,
        })
    }

    fn column(&self, name: &str) -> Result<usize> {
        self.header
            .iter()
            .position(|h| *h == name)
            .ok_or_else(|| parse_error(self.path, 1, &format!("missing column {name:?}")))
    }

    fn columns<const N: usize>(&self, names: [&str; N]) -> Result<[usize; N]> {
        let mut out = [0; N];
        for (o, name) in out.iter_mut().zip(names) {
            *o = self.column(name)?;
        }
        Ok(out)
    }

    fn rows(self) -> impl Iterator<Item = Result<Row<'a>>> {
        let width = self.header.len();
        let path = self.path;
        self.lines
            .filter(|(_, l)| !l.trim().is_empty())
            .map(move |(i, line)| {
                let fields: Vec<&str> = line.trim_end_matches('\r').split(',').collect();
                if fields.len() != width {
                    return Err(parse_error(
                        path,
                        i + 1,
                        &format!(
                            "expected {width} fields, found {} (truncated row?)",
                            fields.len()
                        ),
                    ));
                }
                Ok(Row {
                    path,
                    line: i + 1,
                    fields,
                })
            })
    }
}

struct Row<'a> {
    path: &'a Path,
    line: usize,
    fields: Vec<&'a str>,
}

impl Row<'_> {
    fn num<T: std::str::FromStr>(&self, col: usize, name: &str) -> Result<T> {
        let raw = self.fields[col].trim();
        raw.parse().map_err(|_| {
            parse_error(
                self.path,
                self.line,
                &format!("field {name} is {raw:?}, expected a number"),
            )
        })
    }

    fn error(&self, message: &str) -> Error {
        parse_error(self.path, self.line, message)
    }
}

fn parse_error(path: &Path, line: usize, message: &str) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        line,
        message: message.to_string(),
    }
}

/// `openb_node_list_*.csv`: sn, cpu_milli, memory_mib, gpu, model.
pub fn read_nodes(path: &Path) -> Result<Vec<Node>> {
    let text = read(path)?;
    let csv = Csv::new(path, &text)?;
    let [sn, cpu, mem, gpu, model] =
        csv.columns(["sn", "cpu_milli", "memory_mib", "gpu", "model"])?;
    csv.rows()
        .map(|row| {
            let row = row?;
            let gpus: usize = row.num(gpu, "gpu")?;
            let model = row.fields[model].trim();
            if gpus > 0 && model.is_empty() {
                return Err(row.error("a GPU node needs a model"));
            }
            Ok(Node::new(
                row.fields[sn].trim(),
                row.num(cpu, "cpu_milli")?,
                row.num(mem, "memory_mib")?,
                gpus,
                Some(model),
            )
            .with_max_pods(TRACE_MAX_PODS))
        })
        .collect()
}

/// `openb_pod_list_*.csv`. Only the columns the replay uses are read; timestamps are
/// ignored because the simulator never exported them.
pub fn read_pods(path: &Path) -> Result<Vec<PodRequest>> {
    let text = read(path)?;
    let csv = Csv::new(path, &text)?;
    let [name, cpu, mem, num, milli] =
        csv.columns(["name", "cpu_milli", "memory_mib", "num_gpu", "gpu_milli"])?;
    let spec = csv.column("gpu_spec").ok();
    csv.rows()
        .map(|row| {
            let row = row?;
            let count: u32 = row.num(num, "num_gpu")?;
            let per_gpu: i64 = row.num(milli, "gpu_milli")?;
            let gpu = GpuDemand::from_count_milli(count, per_gpu.clamp(0, 1000) as u32)
                .ok_or_else(|| {
                    row.error(&format!(
                        "{count} GPUs of {per_gpu} milli: a GPU share must be a single GPU"
                    ))
                })?;
            let models = match spec {
                Some(c) if gpu != GpuDemand::None => row.fields[c]
                    .split('|')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
                _ => Vec::new(),
            };
            let pod_name = row.fields[name].trim();
            if pod_name.is_empty() {
                return Err(row.error("empty pod name"));
            }
            Ok(PodRequest {
                gpu_models: models,
                ..PodRequest::new(
                    pod_name,
                    row.num(cpu, "cpu_milli")?,
                    row.num(mem, "memory_mib")?,
                    gpu,
                )
            })
        })
        .collect()
}

/// One row of `fgd-expected-results/analysis_*_discrete.csv`: a per-seed curve over the
/// arrived-demand buckets 0..=130 (None where the bucket had no event).
#[derive(Clone, Debug)]
pub struct PaperCurve {
    pub workload: String,
    pub policy: String,
    pub seed: u64,
    pub values: Vec<Option<f64>>,
}

pub fn read_paper(path: &Path) -> Result<Vec<PaperCurve>> {
    let text = read(path)?;
    let csv = Csv::new(path, &text)?;
    let [workload, policy, seed] = csv.columns(["workload", "sc_policy", "seed"])?;
    let first = csv.column("0")?;
    csv.rows()
        .map(|row| {
            let row = row?;
            let values = (first..row.fields.len())
                .map(|c| match row.fields[c].trim() {
                    "" => Ok(None),
                    _ => row.num(c, "value").map(Some),
                })
                .collect::<Result<_>>()?;
            Ok(PaperCurve {
                workload: row.fields[workload].to_string(),
                policy: row.fields[policy].to_string(),
                seed: row.num(seed, "seed")?,
                values,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ringmaster-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn errors_name_file_and_line() {
        let p = temp(
            "pods.csv",
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,10,1,500\np1,1000,10\n",
        );
        let err = read_pods(&p).unwrap_err().to_string();
        assert!(
            err.ends_with("pods.csv:3: expected 5 fields, found 3 (truncated row?)"),
            "{err}"
        );
        let p = temp(
            "bad.csv",
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,x,10,1,500\n",
        );
        let err = read_pods(&p).unwrap_err().to_string();
        assert!(
            err.ends_with("bad.csv:2: field cpu_milli is \"x\", expected a number"),
            "{err}"
        );
        let p = temp(
            "share.csv",
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1,1,2,500\n",
        );
        assert!(
            read_pods(&p)
                .unwrap_err()
                .to_string()
                .contains("share.csv:2:")
        );
        let p = temp("nodes.csv", "sn,cpu_milli,memory_mib,gpu\n");
        assert!(
            read_nodes(&p)
                .unwrap_err()
                .to_string()
                .contains("missing column \"model\"")
        );
        assert!(read_nodes(Path::new("/nonexistent.csv")).is_err());
    }

    #[test]
    fn reads_pods_and_nodes() {
        let p = temp(
            "ok.csv",
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n\
             a,1000,10,1,500,T4|P100\nb,2000,20,4,1000,\nc,3000,30,0,0,T4\n",
        );
        let pods = read_pods(&p).unwrap();
        assert_eq!(pods[0].gpu, GpuDemand::Share(500));
        assert_eq!(pods[0].gpu_models, vec!["T4", "P100"]);
        assert_eq!(pods[1].gpu, GpuDemand::Whole(4));
        assert_eq!(pods[2].gpu, GpuDemand::None);
        assert!(pods[2].gpu_models.is_empty());
        let nodes =
            read_nodes(&default_dir().join("alibaba-gpu-v2023/openb_node_list_gpu_node.csv"))
                .unwrap();
        assert_eq!(nodes.len(), 1213);
        assert_eq!(nodes.iter().map(|n| n.gpu_count()).sum::<usize>(), 6212);
    }
}
