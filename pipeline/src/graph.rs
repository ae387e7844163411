//! Graph files: a gst-launch description with named parameters, defaults and a description.
//!
//! ```text
//! # Transcribe an audio file: one line of text per utterance.
//! #
//! # @param input    file               audio file to transcribe
//! # @param model    string=tiny.en-q8_0  Whisper model name or path
//! # @param threads  uint=2             inference threads
//! filesrc location=${input} ! decodebin ! ... ! whisperstt model=${model} threads=${threads} ! fakesink
//! ```
//!
//! Comment lines before the first `@param` form the description. Each `@param` line gives a
//! name, a type (`string`, `file` (must exist), `path`, `int`, `uint`, `float`, `bool`) with an
//! optional `=default` (no default: required), and a description. `${name}` in the body is
//! replaced by the value, quoted for gst-launch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GraphError {
    #[error("cannot read graph file {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("malformed graph file {path}, line {line}: {why}")]
    Malformed {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("unknown parameter {name:?} for graph {graph}; it takes: {known}")]
    UnknownParam {
        graph: String,
        name: String,
        known: String,
    },
    #[error("missing parameter {name:?} for graph {graph} ({description}): add {name}=VALUE")]
    MissingParam {
        graph: String,
        name: String,
        description: String,
    },
    #[error("bad value {value:?} for parameter {name:?}: {why}")]
    BadValue {
        name: String,
        value: String,
        why: String,
    },
    #[error("argument {0:?} is not key=value")]
    NotKeyValue(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    File,
    Path,
    Int,
    UInt,
    Float,
    Bool,
}

impl ParamType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "string" => Self::String,
            "file" => Self::File,
            "path" => Self::Path,
            "int" => Self::Int,
            "uint" => Self::UInt,
            "float" => Self::Float,
            "bool" => Self::Bool,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::File => "file",
            Self::Path => "path",
            Self::Int => "int",
            Self::UInt => "uint",
            Self::Float => "float",
            Self::Bool => "bool",
        }
    }

    fn check(self, name: &str, value: &str) -> Result<(), GraphError> {
        let bad = |why: &str| GraphError::BadValue {
            name: name.into(),
            value: value.into(),
            why: why.into(),
        };
        match self {
            Self::String | Self::Path => Ok(()),
            Self::File => {
                if Path::new(value).is_file() {
                    Ok(())
                } else {
                    Err(bad("no such file"))
                }
            }
            Self::Int => value
                .parse::<i64>()
                .map(|_| ())
                .map_err(|_| bad("expected an integer")),
            Self::UInt => value
                .parse::<u64>()
                .map(|_| ())
                .map_err(|_| bad("expected a non-negative integer")),
            Self::Float => value
                .parse::<f64>()
                .map(|_| ())
                .map_err(|_| bad("expected a number")),
            Self::Bool => match value {
                "true" | "false" => Ok(()),
                _ => Err(bad("expected true or false")),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub name: String,
    pub ty: ParamType,
    pub default: Option<String>,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GraphFile {
    pub name: String,
    pub path: PathBuf,
    pub description: String,
    pub params: Vec<Param>,
    pub body: String,
}

impl GraphFile {
    pub fn load(path: &Path) -> Result<Self, GraphError> {
        let text = std::fs::read_to_string(path).map_err(|e| GraphError::Read {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, GraphError> {
        let malformed = |line: usize, why: String| GraphError::Malformed {
            path: path.to_path_buf(),
            line,
            why,
        };
        let mut description = Vec::new();
        let mut params: Vec<Param> = Vec::new();
        let mut body = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim();
            if let Some(comment) = line.strip_prefix('#') {
                let comment = comment.trim();
                if let Some(spec) = comment.strip_prefix("@param") {
                    let mut parts = spec.split_whitespace();
                    let name = parts
                        .next()
                        .ok_or_else(|| malformed(line_no, "@param without a name".into()))?;
                    if !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(malformed(line_no, format!("bad parameter name {name:?}")));
                    }
                    let ty_spec = parts
                        .next()
                        .ok_or_else(|| malformed(line_no, format!("@param {name} needs a type")))?;
                    let (ty, default) = match ty_spec.split_once('=') {
                        Some((t, d)) => (t, Some(d.to_string())),
                        None => (ty_spec, None),
                    };
                    let ty = ParamType::parse(ty).ok_or_else(|| {
                        malformed(
                            line_no,
                            format!(
                                "unknown type {ty:?} for {name} (string, file, path, int, uint, float, bool)"
                            ),
                        )
                    })?;
                    if params.iter().any(|p| p.name == name) {
                        return Err(malformed(
                            line_no,
                            format!("parameter {name} declared twice"),
                        ));
                    }
                    if let Some(d) = &default
                        && ty != ParamType::File
                    {
                        ty.check(name, d)
                            .map_err(|e| malformed(line_no, e.to_string()))?;
                    }
                    params.push(Param {
                        name: name.to_string(),
                        ty,
                        default,
                        description: parts.collect::<Vec<_>>().join(" "),
                    });
                } else if params.is_empty() && body.is_empty() {
                    description.push(comment.to_string());
                }
                continue;
            }
            if !line.is_empty() {
                body.push(line.to_string());
            }
        }
        if body.is_empty() {
            return Err(malformed(
                text.lines().count().max(1),
                "no pipeline description".into(),
            ));
        }
        let body = body.join(" ");
        // Every ${name} must be declared, and every declared parameter used.
        let mut rest = body.as_str();
        while let Some(start) = rest.find("${") {
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| malformed(0, "unclosed ${ in the pipeline".into()))?;
            let name = &after[..end];
            if !params.iter().any(|p| p.name == name) {
                return Err(malformed(
                    0,
                    format!("${{{name}}} is used but not declared with @param"),
                ));
            }
            rest = &after[end + 1..];
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("graph")
            .to_string();
        while description.last().is_some_and(|l| l.is_empty()) {
            description.pop();
        }
        Ok(Self {
            name,
            path: path.to_path_buf(),
            description: description.join("\n").trim().to_string(),
            params,
            body,
        })
    }

    /// Parses `key=value` arguments into a map, checking names and values.
    pub fn bind<S: AsRef<str>>(&self, args: &[S]) -> Result<BTreeMap<String, String>, GraphError> {
        let mut values = BTreeMap::new();
        for arg in args {
            let arg = arg.as_ref();
            let (k, v) = arg
                .split_once('=')
                .ok_or_else(|| GraphError::NotKeyValue(arg.to_string()))?;
            values.insert(k.to_string(), v.to_string());
        }
        self.check(&values)?;
        Ok(values)
    }

    fn check(&self, values: &BTreeMap<String, String>) -> Result<(), GraphError> {
        for (k, v) in values {
            let param = self.params.iter().find(|p| &p.name == k).ok_or_else(|| {
                GraphError::UnknownParam {
                    graph: self.name.clone(),
                    name: k.clone(),
                    known: self
                        .params
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?;
            param.ty.check(k, v)?;
        }
        for p in &self.params {
            if p.default.is_none() && !values.contains_key(&p.name) {
                return Err(GraphError::MissingParam {
                    graph: self.name.clone(),
                    name: p.name.clone(),
                    description: p.description.clone(),
                });
            }
        }
        Ok(())
    }

    /// The gst-launch description with parameters substituted (defaults for those not given).
    pub fn render(&self, values: &BTreeMap<String, String>) -> Result<String, GraphError> {
        self.check(values)?;
        let mut out = self.body.clone();
        for p in &self.params {
            let value = values
                .get(&p.name)
                .or(p.default.as_ref())
                .expect("checked: required parameters are present");
            out = out.replace(&format!("${{{}}}", p.name), &quote(value));
        }
        Ok(out)
    }
}

/// The ready graph `name` (see [`find`]) with `values` filled in, as a gst-launch description.
pub fn render_named(name: &str, values: &[(&str, String)]) -> Result<String, GraphError> {
    let values: BTreeMap<String, String> = values
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    find(name)?.render(&values)
}

/// Quotes a value for gst-launch syntax.
pub fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/+:".contains(c));
    if plain {
        return value.to_string();
    }
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

/// The graphs directory: `$VOX_GRAPHS`, else `graphs/` beside the executable's install prefix
/// (`<prefix>/share/vox/graphs`), else the source tree's `graphs/`.
pub fn graph_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("VOX_GRAPHS").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(bin) = exe.parent()
    {
        dirs.push(bin.join("../share/vox/graphs"));
    }
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../graphs"));
    dirs
}

/// Finds a graph by path or by name (`transcribe` → `transcribe.graph` in the graph dirs).
pub fn find(name_or_path: &str) -> Result<GraphFile, GraphError> {
    let p = Path::new(name_or_path);
    if p.is_file() || name_or_path.contains('/') || name_or_path.ends_with(".graph") {
        return GraphFile::load(p);
    }
    for dir in graph_dirs() {
        let candidate = dir.join(format!("{name_or_path}.graph"));
        if candidate.is_file() {
            return GraphFile::load(&candidate);
        }
    }
    Err(GraphError::Read {
        path: PathBuf::from(format!("{name_or_path}.graph")),
        why: format!(
            "no such graph; `vox graphs` lists the ready ones (looked in {})",
            graph_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// All ready graphs, by name (first directory wins).
pub fn list() -> Vec<Result<GraphFile, GraphError>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for dir in graph_dirs() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "graph"))
            .collect();
        paths.sort();
        for p in paths {
            let stem = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            if seen.insert(stem) {
                out.push(GraphFile::load(&p));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# Say hello.\n#\n# @param input file  the input\n# @param n uint=2 how many\n\
                        filesrc location=${input} ! fakesink num-buffers=${n}\n";

    fn graph() -> GraphFile {
        GraphFile::parse(Path::new("hello.graph"), TEXT).unwrap()
    }

    #[test]
    fn parses_description_and_params() {
        let g = graph();
        assert_eq!(g.description, "Say hello.");
        assert_eq!(g.params.len(), 2);
        assert_eq!(g.params[1].default.as_deref(), Some("2"));
        assert_eq!(g.params[0].ty, ParamType::File);
    }

    #[test]
    fn renders_with_quoting() {
        let g = graph();
        let v = g.bind(&["input=/etc/hostname", "n=3"]).unwrap();
        assert_eq!(
            g.render(&v).unwrap(),
            "filesrc location=/etc/hostname ! fakesink num-buffers=3"
        );
        let q = quote("a b\"c");
        assert_eq!(q, "\"a b\\\"c\"");
    }

    #[test]
    fn errors_name_the_problem() {
        let g = graph();
        assert!(matches!(
            g.bind(&["n=1"]),
            Err(GraphError::MissingParam { .. })
        ));
        assert!(matches!(
            g.bind(&["input=/etc/hostname", "bogus=1"]),
            Err(GraphError::UnknownParam { .. })
        ));
        assert!(matches!(
            g.bind(&["input=/etc/hostname", "n=-1"]),
            Err(GraphError::BadValue { .. })
        ));
        assert!(matches!(
            g.bind(&["input=/no/such/file"]),
            Err(GraphError::BadValue { .. })
        ));
        assert!(matches!(
            g.bind(&["input"]),
            Err(GraphError::NotKeyValue(_))
        ));
    }

    #[test]
    fn malformed_files_are_rejected() {
        let p = Path::new("bad.graph");
        for text in [
            "# only a comment\n",
            "# @param x\nfakesink\n",
            "# @param x colour\nfakesink\n",
            "fakesink name=${undeclared}\n",
            "# @param n uint=abc x\nfakesink\n",
        ] {
            assert!(
                matches!(GraphFile::parse(p, text), Err(GraphError::Malformed { .. })),
                "{text:?}"
            );
        }
    }
}
