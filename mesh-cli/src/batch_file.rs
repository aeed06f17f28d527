//! Batch files: many tasks in one TOML file, each a `[[task]]` table with the keys of a
//! task file (docs/task-file.md). `@FILE` paths are relative to the batch file's
//! directory. Unknown keys are errors, at the top level as inside a task.

use crate::task_file::{self, TaskFile};
use anyhow::Context as _;
use mesh_core::TaskSpec;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The TOML document, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchDocument {
    #[serde(default)]
    task: Vec<TaskFile>,
}

/// One `[[task]]` table.
#[derive(Debug, Clone)]
pub struct BatchEntry {
    /// Its position in the file, from 1.
    pub index: usize,
    /// The line of its `[[task]]` header, when it can be found.
    pub line: Option<usize>,
    file: TaskFile,
}

impl BatchEntry {
    /// How messages name this entry: `#3 (line 12)`.
    pub fn label(&self) -> String {
        match self.line {
            Some(line) => format!("#{} (line {line})", self.index),
            None => format!("#{}", self.index),
        }
    }
}

/// A parsed batch file. The tasks' input files are read only when a spec is built,
/// so that a large batch is never held in memory all at once.
#[derive(Debug)]
pub struct Batch {
    /// Where the batch file is.
    pub path: PathBuf,
    /// Its tasks, in file order.
    pub entries: Vec<BatchEntry>,
    base: PathBuf,
}

impl Batch {
    /// Read and parse a batch file (not the files it names).
    pub fn load(path: &Path) -> anyhow::Result<Batch> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the batch file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        Batch::parse(&text, path, &base)
    }

    /// Parse a batch file's text; `path` names it in errors, `base` anchors relative
    /// paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> anyhow::Result<Batch> {
        let doc: BatchDocument =
            task_file::from_toml(text).with_context(|| format!("batch file {}", path.display()))?;
        if doc.task.is_empty() {
            anyhow::bail!(
                "batch file {} holds no [[task]] table; write each task as a [[task]] table with the keys \
                 of a task file (see docs/task-file.md)",
                path.display()
            );
        }
        // Header lines are trusted only when there is one for every task (an inline
        // `task = [{ .. }]` array has none).
        let lines = Some(header_lines(text)).filter(|l| l.len() == doc.task.len());
        let entries = doc
            .task
            .into_iter()
            .enumerate()
            .map(|(i, file)| BatchEntry {
                index: i + 1,
                line: lines.as_ref().map(|l| l[i]),
                file,
            })
            .collect();
        Ok(Batch {
            path: path.to_path_buf(),
            entries,
            base: base.to_path_buf(),
        })
    }

    /// Build the spec of one entry, reading the files it names. The error names the
    /// batch file and the entry.
    pub fn spec(&self, entry: &BatchEntry) -> anyhow::Result<TaskSpec> {
        task_file::build(&entry.file, &self.base)
            .with_context(|| format!("batch file {}: task {}", self.path.display(), entry.label()))
    }
}

/// The line numbers (from 1) of the `[[task]]` headers, in order. TOML allows blanks
/// inside the brackets and a comment after them.
fn header_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let squeezed: String = line
                .split('#')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            squeezed == "[[task]]"
        })
        .map(|(i, _)| i + 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task_spec::check_locally;
    use mesh_core::task::KernelSpec;

    const BATCH: &str = r#"# two tasks
[[task]]
kernel = "saxpy"
params = { a = 2 }
inputs = { x = "@data/x.bin", y = "@data/y.bin" }

[[ task ]]   # blanks are allowed
kernel = "mandelbrot"
params = { width = 8, height = 4, max_iter = 9 }
shards = 2
priority = 3
"#;

    #[test]
    fn tasks_come_in_file_order_with_their_lines_and_relative_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        for name in ["x.bin", "y.bin"] {
            std::fs::write(
                dir.path().join("data").join(name),
                mesh_core::builtin::f32_bytes(&[1.0; 16]),
            )
            .unwrap();
        }
        let path = dir.path().join("jobs.toml");
        std::fs::write(&path, BATCH).unwrap();
        let batch = Batch::load(&path).unwrap();
        let labels: Vec<String> = batch.entries.iter().map(BatchEntry::label).collect();
        assert_eq!(labels, ["#1 (line 2)", "#2 (line 7)"]);

        let first = batch.spec(&batch.entries[0]).unwrap();
        assert!(matches!(&first.kernel, KernelSpec::Builtin { name, .. } if name == "saxpy"));
        assert_eq!(
            first.inputs[1].data.len(),
            64,
            "paths follow the batch file"
        );
        check_locally(&first).unwrap();
        let second = batch.spec(&batch.entries[1]).unwrap();
        assert_eq!((second.shards, second.priority), (2, 3));
        check_locally(&second).unwrap();
    }

    #[test]
    fn mistakes_name_the_file_the_task_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.toml");
        let parse = |text: &str| Batch::parse(text, &path, dir.path());

        let e = format!("{:#}", parse("").unwrap_err());
        assert!(e.contains("holds no [[task]] table"), "{e}");
        let e = format!(
            "{:#}",
            parse("[[task]]\nkernel = \"saxpy\"\ncolour = 1\n").unwrap_err()
        );
        assert!(
            e.starts_with(&format!(
                "batch file {}: line 3: unknown field `colour`",
                path.display()
            )),
            "{e}"
        );
        let e = format!("{:#}", parse("jobs = 1\n").unwrap_err());
        assert!(
            e.contains("line 1: unknown field `jobs`, expected `task`"),
            "{e}"
        );

        // A task that parses but cannot be built: named by its place and line.
        let batch = parse("[[task]]\nkernel = \"saxpy\"\n\n[[task]]\npriority = 1\n").unwrap();
        let e = format!("{:#}", batch.spec(&batch.entries[1]).unwrap_err());
        assert_eq!(
            e,
            format!(
                "batch file {}: task #2 (line 4): say what to run: kernel = \"saxpy\" (built-in) or wgsl = \"FILE.wgsl\"",
                path.display()
            )
        );
        let batch = parse("[[task]]\nkernel = \"saxpy\"\ninputs = { x = \"x.bin\" }\n").unwrap();
        let e = format!("{:#}", batch.spec(&batch.entries[0]).unwrap_err());
        assert!(
            e.contains("task #1 (line 1): inputs.x: expected @FILE"),
            "{e}"
        );
    }

    #[test]
    fn headers_are_found_with_blanks_and_comments() {
        assert_eq!(
            header_lines("[[task]]\n[task.params]\n  [[ task ]] # c\n[[tasks]]\n"),
            [1, 3]
        );
    }
}
