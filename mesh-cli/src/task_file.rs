//! Task files: a whole task in TOML (docs/task-file.md). Unknown keys are errors;
//! `@FILE` paths are relative to the task file's directory; inputs and outputs bind in
//! the order they are written.

use crate::task_spec::{
    input_path, parse_requirements, read_input, read_wgsl, workgroups_from, NOT_SHARDED,
};
use anyhow::Context as _;
use mesh_core::duration::parse_duration;
use mesh_core::task::{KernelSpec, OutputDecl, DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT};
use mesh_core::TaskSpec;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;

/// The TOML document, as written (also one `[[task]]` table of a batch file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    kernel: Option<String>,
    wgsl: Option<String>,
    entry: Option<String>,
    workgroups: Option<Vec<u32>>,
    #[serde(default)]
    params: Ordered<ParamValue>,
    #[serde(default)]
    inputs: Ordered<String>,
    #[serde(default)]
    outputs: Ordered<u64>,
    timeout: Option<String>,
    max_attempts: Option<u32>,
    priority: Option<i32>,
    #[serde(default)]
    require: Vec<String>,
    #[serde(default)]
    prefer: Vec<String>,
    shards: Option<u32>,
    idempotency_key: Option<String>,
}

/// A TOML table read in document order (the toml crate's `preserve_order`), so that
/// `inputs = { x = .., y = .. }` binds x before y. Duplicate keys are a TOML error.
#[derive(Debug, Clone)]
struct Ordered<V>(Vec<(String, V)>);

impl<V> Default for Ordered<V> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<V>, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    entries.push((k, v));
                }
                Ok(Ordered(entries))
            }
        }
        d.deserialize_map(OrderedVisitor(PhantomData))
    }
}

/// A built-in kernel parameter: a string, or a number written bare (`a = 2`).
#[derive(Debug, Clone)]
struct ParamValue(String);

impl<'de> Deserialize<'de> for ParamValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ParamVisitor;
        impl Visitor<'_> for ParamVisitor {
            type Value = ParamValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ParamValue, E> {
                Ok(ParamValue(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ParamValue, E> {
                // Rust prints 2.0 as "2" and 0.1 as "0.1": the shortest text that reads back.
                Ok(ParamValue(v.to_string()))
            }
        }
        d.deserialize_any(ParamVisitor)
    }
}

/// Read a task file and build the spec it describes, reading the WGSL source and the
/// input files it names (relative to the task file's directory).
pub fn load(path: &Path) -> anyhow::Result<TaskSpec> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the task file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new(""));
    parse(&text, base).with_context(|| format!("task file {}", path.display()))
}

/// Build the spec of a task file's text; relative paths are taken from `base`.
pub fn parse(text: &str, base: &Path) -> anyhow::Result<TaskSpec> {
    let file: TaskFile = from_toml(text)?;
    build(&file, base)
}

/// Deserialize TOML text; the error names the line where it went wrong.
pub fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> anyhow::Result<T> {
    toml::from_str(text).map_err(|e| match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            anyhow::anyhow!("line {line}: {}", e.message().trim_end())
        }
        None => anyhow::anyhow!("{}", e.message().trim_end()),
    })
}

/// Build the spec a parsed task file describes, reading the files it names (relative
/// paths are taken from `base`).
pub fn build(file: &TaskFile, base: &Path) -> anyhow::Result<TaskSpec> {
    let file = file.clone();
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };

    let kernel = match (file.kernel, file.wgsl) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give either kernel = \"NAME\" (built-in) or wgsl = \"FILE\", not both")
        }
        (None, None) => {
            anyhow::bail!("say what to run: kernel = \"saxpy\" (built-in) or wgsl = \"FILE.wgsl\"")
        }
        (Some(name), None) => {
            for (key, given) in [
                ("entry", file.entry.is_some()),
                ("workgroups", file.workgroups.is_some()),
                ("outputs", !file.outputs.0.is_empty()),
            ] {
                if given {
                    anyhow::bail!(
                        "'{key}' belongs to WGSL kernels; the built-in kernel {name} sets its own"
                    );
                }
            }
            let mut params = BTreeMap::new();
            for (k, ParamValue(v)) in file.params.0 {
                params.insert(k, v);
            }
            KernelSpec::Builtin { name, params }
        }
        (None, Some(wgsl)) => {
            if !file.params.0.is_empty() {
                anyhow::bail!("'params' belongs to built-in kernels; a WGSL kernel takes its data from inputs");
            }
            let counts = file
                .workgroups
                .ok_or_else(|| anyhow::anyhow!("a WGSL kernel needs workgroups = [X, Y, Z]"))?;
            let workgroups = workgroups_from(&counts).ok_or_else(|| {
                anyhow::anyhow!(
                    "workgroups = {counts:?}: give 1 to 3 positive counts, e.g. [4, 1, 1]"
                )
            })?;
            KernelSpec::Wgsl {
                source: read_wgsl(&resolve(Path::new(&wgsl)))?,
                entry: file.entry.unwrap_or_else(|| "main".into()),
                workgroups,
            }
        }
    };
    let inputs = file
        .inputs
        .0
        .iter()
        .map(|(name, value)| {
            let path = input_path(value).map_err(|e| anyhow::anyhow!("inputs.{name}: {e}"))?;
            read_input(name, &resolve(&path))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let outputs = file
        .outputs
        .0
        .into_iter()
        .map(|(name, size)| OutputDecl { name, size })
        .collect();
    let timeout = match file.timeout {
        Some(t) => parse_duration(&t).map_err(|e| anyhow::anyhow!("timeout: {e}"))?,
        None => DEFAULT_TIMEOUT,
    };
    Ok(TaskSpec {
        kernel,
        inputs,
        outputs,
        requirements: parse_requirements("require", &file.require)?,
        prefer: parse_requirements("prefer", &file.prefer)?,
        shards: file.shards.unwrap_or(NOT_SHARDED),
        priority: file.priority.unwrap_or(0),
        timeout,
        max_attempts: file.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        idempotency_key: file.idempotency_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task_spec::check_locally;
    use mesh_core::requirement::Requirement;
    use std::time::Duration;

    fn write_f32(dir: &Path, name: &str, n: usize) {
        std::fs::write(dir.join(name), mesh_core::builtin::f32_bytes(&vec![1.0; n])).unwrap();
    }

    #[test]
    fn builtin_task_file_with_relative_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        write_f32(&dir.path().join("data"), "x.bin", 256);
        write_f32(&dir.path().join("data"), "y.bin", 256);
        let file = dir.path().join("saxpy.toml");
        std::fs::write(
            &file,
            r#"
kernel = "saxpy"
params = { a = 2 }
inputs = { x = "@data/x.bin", y = "@data/y.bin" }
timeout = "30s"
max_attempts = 4
priority = 7
require = ["device=cpu", "label:zone=a"]
idempotency_key = "demo-1"
"#,
        )
        .unwrap();
        // Loaded from another working directory: paths follow the task file.
        let spec = load(&file).unwrap();
        let KernelSpec::Builtin { name, params } = &spec.kernel else {
            panic!()
        };
        assert_eq!(name, "saxpy");
        assert_eq!(
            params.get("a").map(String::as_str),
            Some("2"),
            "a bare number becomes text"
        );
        assert_eq!(spec.inputs.len(), 2);
        assert_eq!(spec.inputs[0].data.len(), 1024);
        assert_eq!(spec.timeout, Duration::from_secs(30));
        assert_eq!((spec.max_attempts, spec.priority), (4, 7));
        assert_eq!(
            spec.requirements,
            vec![
                Requirement::parse("device=cpu").unwrap(),
                Requirement::parse("label:zone=a").unwrap()
            ]
        );
        assert_eq!(spec.idempotency_key.as_deref(), Some("demo-1"));
        check_locally(&spec).unwrap();
    }

    #[test]
    fn wgsl_task_file_keeps_binding_order_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("add.wgsl"),
            "
@group(0) @binding(0) var<storage, read> b: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read_write> z: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&a)) { z[id.x] = a[id.x] + b[id.x]; c[id.x] = b[id.x]; }
}
",
        )
        .unwrap();
        write_f32(dir.path(), "a.bin", 64);
        write_f32(dir.path(), "b.bin", 64);
        let text = r#"
wgsl = "add.wgsl"
entry = "add"
workgroups = [1]
inputs = { b = "@b.bin", a = "@a.bin" }
outputs = { z = 256, c = 256 }
"#;
        let spec = parse(text, dir.path()).unwrap();
        let names: Vec<&str> = spec.inputs.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            ["b", "a"],
            "inputs bind in the order written, not sorted"
        );
        let outs: Vec<&str> = spec.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(outs, ["z", "c"]);
        let KernelSpec::Wgsl {
            entry, workgroups, ..
        } = &spec.kernel
        else {
            panic!()
        };
        assert_eq!((entry.as_str(), *workgroups), ("add", [1, 1, 1]));
        assert_eq!(
            (spec.timeout, spec.max_attempts, spec.priority),
            (DEFAULT_TIMEOUT, DEFAULT_MAX_ATTEMPTS, 0)
        );
        check_locally(&spec).unwrap();
    }

    #[test]
    fn shards_and_preferences_in_a_task_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = r#"
kernel = "mandelbrot"
params = { width = 64, height = 48, max_iter = 100 }
shards = 4
require = ["max_buffer_size>=1048576", "label:zone in a,b"]
prefer = ["device=discrete", "label:zone=a"]
"#;
        let spec = parse(text, dir.path()).unwrap();
        assert_eq!(spec.shards, 4);
        let shown = |r: &[Requirement]| r.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            shown(&spec.requirements),
            ["max_buffer_size>=1048576", "label:zone in a,b"]
        );
        assert_eq!(
            shown(&spec.prefer),
            ["device=discrete", "label:zone=a"],
            "preferences keep the order written"
        );
        check_locally(&spec).unwrap();

        // Flags: --shards replaces the file's; --prefer and --require come after the file's.
        let cli = <crate::args::Cli as clap::Parser>::try_parse_from([
            "mesh-cli",
            "submit",
            "t.toml",
            "--shards",
            "8",
            "--prefer",
            "backend=vulkan",
            "--require",
            "feature=shader-f16",
        ])
        .unwrap();
        let crate::args::Command::Submit(args) = cli.command else {
            panic!()
        };
        let spec = crate::task_spec::apply_policy(spec, &args);
        assert_eq!(spec.shards, 8);
        assert_eq!(
            shown(&spec.prefer),
            ["device=discrete", "label:zone=a", "backend=vulkan"]
        );
        assert_eq!(
            shown(&spec.requirements).last().unwrap(),
            "feature=shader-f16"
        );

        // Without `shards` the task runs whole.
        let spec = parse(
            "kernel = \"mandelbrot\"\nparams = { width = 4, height = 4, max_iter = 1 }\n",
            dir.path(),
        )
        .unwrap();
        assert_eq!((spec.shards, spec.prefer.len()), (1, 0));
    }

    #[test]
    fn bad_shards_in_a_task_file_are_refused_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        let mandelbrot = |shards: u32| {
            parse(
                &format!("kernel = \"mandelbrot\"\nparams = {{ width = 8, height = 4, max_iter = 9 }}\nshards = {shards}\n"),
                dir.path(),
            )
            .unwrap()
        };
        check_locally(&mandelbrot(4)).unwrap();
        let e = check_locally(&mandelbrot(5)).unwrap_err().to_string();
        assert!(e.contains("5 shards for 4 rows"), "{e}");
        let e = check_locally(&mandelbrot(0)).unwrap_err().to_string();
        assert!(e.starts_with("shards must be at least 1"), "{e}");

        std::fs::write(
            dir.path().join("k.wgsl"),
            crate::task_spec::tests::DOUBLE_WGSL,
        )
        .unwrap();
        write_f32(dir.path(), "x.bin", 64);
        let text = "wgsl = \"k.wgsl\"\nworkgroups = [1]\ninputs = { x = \"@x.bin\" }\noutputs = { y = 256 }\nshards = 2\n";
        let e = check_locally(&parse(text, dir.path()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("WGSL kernels cannot be sharded (2 shards asked); shardable built-in kernels are: saxpy, vector-add, matmul, mandelbrot"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_mixed_kinds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = parse(
            "kernel = \"saxpy\"\nparams = { a = \"2\" }\ncolour = \"red\"\n",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = parse("kernel = \"saxpy\"\nwgsl = \"x.wgsl\"\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not both"), "{e}");
        let e = parse("kernel = \"saxpy\"\noutputs = { y = 4 }\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("'outputs' belongs to WGSL kernels"), "{e}");
        let e = parse("wgsl = \"x.wgsl\"\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs workgroups"), "{e}");
        let e = parse(
            "kernel = \"saxpy\"\ninputs = { x = \"x.bin\" }\n",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("inputs.x: expected @FILE"), "{e}");
        let e = parse("kernel = \"saxpy\"\ntimeout = \"30\"\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeout: '30' is not a duration"), "{e}");
        let e = parse("kernel = \"saxpy\"\nrequire = [\"gpu=yes\"]\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read requirement 'gpu=yes'"), "{e}");
        let e = parse(
            "kernel = \"saxpy\"\nprefer = [\"device=gpu\"]\n",
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("prefer: cannot read requirement 'device=gpu'"),
            "{e}"
        );
        let e = parse("kernel = \"saxpy\"\nprefer = \"device=cpu\"\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        let e = parse("kernel = \"saxpy\"\nshards = -1\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = parse("kernel = \"saxpy\"\nshard = 4\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `shard`"), "{e}");
        let e = parse("kernel = \"saxpy\"\nparams = { a = true }\n", dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("a string or a number"), "{e}");
    }
}
