//! From `submit` flags to a `mesh_core::TaskSpec`, and the local check before sending.
//! The pieces (`K=V`, `NAME=@FILE`, `NAME=BYTES`, `X,Y,Z`) are shared with task files.

use crate::args::SubmitArgs;
use anyhow::Context as _;
use mesh_core::builtin::{shard_units, SHARDABLE};
use mesh_core::limits::MAX_IDEMPOTENCY_KEY_BYTES;
use mesh_core::requirement::Requirement;
use mesh_core::task::{KernelSpec, NamedBytes, OutputDecl, DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT};
use mesh_core::{Bytes, TaskSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `shards` of a task that runs whole.
pub const NOT_SHARDED: u32 = 1;

/// An input given as `NAME=@FILE`; the file is read when the spec is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputArg {
    /// Buffer name.
    pub name: String,
    /// The file holding its bytes.
    pub path: PathBuf,
}

/// Parse `K=V`.
pub fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("expected NAME=VALUE, e.g. a=2; got '{s}'")),
    }
}

/// Parse `NAME=@FILE`.
pub fn parse_input(s: &str) -> Result<InputArg, String> {
    let (name, file) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=@FILE, e.g. x=@x.bin; got '{s}'"))?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!(
            "the input name is empty in '{s}'; expected NAME=@FILE"
        ));
    }
    input_path(file).map(|path| InputArg {
        name: name.to_string(),
        path,
    })
}

/// The path of an `@FILE` reference.
pub fn input_path(value: &str) -> Result<PathBuf, String> {
    match value.trim().strip_prefix('@') {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(format!(
            "expected @FILE (a file holding the input's bytes), e.g. @x.bin; got '{value}'"
        )),
    }
}

/// Parse `NAME=BYTES`.
pub fn parse_output(s: &str) -> Result<OutputDecl, String> {
    let bad =
        || format!("expected NAME=BYTES (the output's size in bytes), e.g. y=4096; got '{s}'");
    let (name, size) = s.split_once('=').ok_or_else(bad)?;
    let size: u64 = size.trim().parse().map_err(|_| bad())?;
    if name.trim().is_empty() || size == 0 {
        return Err(bad());
    }
    Ok(OutputDecl {
        name: name.trim().to_string(),
        size,
    })
}

/// Parse `X`, `X,Y` or `X,Y,Z`; missing counts are 1.
pub fn parse_workgroups(s: &str) -> Result<[u32; 3], String> {
    let bad = || {
        format!("expected workgroup counts X,Y,Z (1 to 3 positive numbers), e.g. 4,1,1; got '{s}'")
    };
    let counts: Vec<u32> = s
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    workgroups_from(&counts).ok_or_else(bad)
}

/// 1 to 3 counts, padded with 1s.
pub fn workgroups_from(counts: &[u32]) -> Option<[u32; 3]> {
    if counts.is_empty() || counts.len() > 3 || counts.contains(&0) {
        return None;
    }
    let mut w = [1u32; 3];
    w[..counts.len()].copy_from_slice(counts);
    Some(w)
}

/// Read one input file.
pub fn read_input(name: &str, path: &Path) -> anyhow::Result<NamedBytes> {
    let data = std::fs::read(path)
        .with_context(|| format!("input {name}: cannot read {}", path.display()))?;
    Ok(NamedBytes {
        name: name.to_string(),
        data: Bytes::from(data),
    })
}

/// Read a WGSL source file.
pub fn read_wgsl(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the WGSL file {}", path.display()))
}

/// Build the spec described by `submit`'s flags (no task file).
pub fn from_flags(args: &SubmitArgs) -> anyhow::Result<TaskSpec> {
    let kernel = match (&args.kernel, &args.wgsl) {
        (Some(name), None) => KernelSpec::Builtin {
            name: name.clone(),
            params: params_map(&args.params)?,
        },
        (None, Some(path)) => KernelSpec::Wgsl {
            source: read_wgsl(path)?,
            entry: args.entry.clone().unwrap_or_else(|| "main".into()),
            workgroups: args.workgroups.ok_or_else(|| {
                anyhow::anyhow!(
                    "a WGSL kernel needs --workgroups X,Y,Z (how many workgroups to dispatch)"
                )
            })?,
        },
        _ => anyhow::bail!("give either --kernel NAME or --wgsl FILE"),
    };
    let inputs = args
        .inputs
        .iter()
        .map(|i| read_input(&i.name, &i.path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = TaskSpec {
        kernel,
        inputs,
        outputs: args.outputs.clone(),
        requirements: Vec::new(),
        prefer: Vec::new(),
        shards: NOT_SHARDED,
        priority: 0,
        timeout: DEFAULT_TIMEOUT,
        max_attempts: DEFAULT_MAX_ATTEMPTS,
        idempotency_key: None,
    };
    Ok(apply_policy(spec, args))
}

/// Apply the policy flags (timeout, attempts, priority, key, shards, requirements,
/// preferences) on top of a spec from flags or from a task file. Requirements and
/// preferences from flags come after the file's, so a file's preferences keep
/// their weight.
pub fn apply_policy(mut spec: TaskSpec, args: &SubmitArgs) -> TaskSpec {
    if let Some(t) = args.timeout {
        spec.timeout = t;
    }
    if let Some(n) = args.max_attempts {
        spec.max_attempts = n;
    }
    if let Some(p) = args.priority {
        spec.priority = p;
    }
    if let Some(k) = &args.idempotency_key {
        spec.idempotency_key = Some(k.clone());
    }
    if let Some(n) = args.shards {
        spec.shards = n;
    }
    spec.requirements.extend(args.requirements.iter().cloned());
    spec.prefer.extend(args.prefer.iter().cloned());
    spec
}

/// Parameters as a map; a name given twice is an error.
pub fn params_map(params: &[(String, String)]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for (k, v) in params {
        if map.insert(k.clone(), v.clone()).is_some() {
            anyhow::bail!("parameter '{k}' is given twice");
        }
    }
    Ok(map)
}

/// Check a spec the way the node will, so that mistakes show before any upload: the
/// kernel plans (built-in parameters and inputs fit, WGSL validates with naga, sizes
/// are within limits), the kernel can be split into that many shards, buffer names
/// are unique, and the policy values make sense.
pub fn check_locally(spec: &TaskSpec) -> anyhow::Result<()> {
    for name in spec
        .inputs
        .iter()
        .map(|i| &i.name)
        .chain(spec.outputs.iter().map(|o| &o.name))
    {
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            anyhow::bail!(
                "the buffer name '{name}' must be non-empty and without spaces (it is used as a word in \
                 `mesh-cli result ID --name NAME`)"
            );
        }
    }
    let mut names: Vec<&str> = spec
        .inputs
        .iter()
        .map(|i| i.name.as_str())
        .chain(spec.outputs.iter().map(|o| o.name.as_str()))
        .collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        anyhow::bail!(
            "the buffer name '{}' is used twice; inputs and outputs need distinct names",
            w[0]
        );
    }
    if spec.max_attempts == 0 {
        anyhow::bail!("max attempts must be at least 1");
    }
    if spec.timeout < Duration::from_millis(1) {
        anyhow::bail!("the timeout must be at least 1ms");
    }
    if let Some(k) = &spec.idempotency_key {
        if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            anyhow::bail!(
                "the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes long"
            );
        }
    }
    mesh_core::kernel::plan(&spec.kernel, &spec.inputs, &spec.outputs)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    check_shards(spec)
}

/// `shards` of a spec that plans: 1, or a split the kernel supports (`shard_units`,
/// the node's own rule). 0, which the node would read as 1, is refused as a slip.
fn check_shards(spec: &TaskSpec) -> anyhow::Result<()> {
    match (&spec.kernel, spec.shards) {
        (_, 0) => anyhow::bail!(
            "shards must be at least 1 (1 runs the task whole); got 0"
        ),
        (_, NOT_SHARDED) => Ok(()),
        (KernelSpec::Wgsl { .. }, n) => anyhow::bail!(
            "WGSL kernels cannot be sharded ({n} shards asked); shardable built-in kernels are: {}; \
             leave out --shards (or `shards` in the task file) to run the shader whole",
            SHARDABLE.join(", ")
        ),
        (KernelSpec::Builtin { name, params }, n) => {
            shard_units(name, params, &spec.inputs, n).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
        }
    }
}

/// Requirements or preferences from their text form; the error names `key` (where
/// they were written) and the expression.
pub fn parse_requirements(key: &str, exprs: &[String]) -> anyhow::Result<Vec<Requirement>> {
    exprs
        .iter()
        .map(|e| Requirement::parse(e).map_err(|err| anyhow::anyhow!("{key}: {err}")))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser as _;

    fn submit_args(args: &[&str]) -> SubmitArgs {
        let mut argv = vec!["mesh-cli", "submit"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Submit(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    fn f32_file(dir: &Path, name: &str, values: &[f32]) -> String {
        let path = dir.join(name);
        std::fs::write(&path, mesh_core::builtin::f32_bytes(values)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn builtin_flags_become_a_spec() {
        let dir = tempfile::tempdir().unwrap();
        let x = f32_file(dir.path(), "x.bin", &[1.0, 2.0]);
        let y = f32_file(dir.path(), "y.bin", &[10.0, 20.0]);
        let args = submit_args(&[
            "--kernel",
            "saxpy",
            "--param",
            "a=2",
            "--input",
            &format!("x=@{x}"),
            "--input",
            &format!("y=@{y}"),
            "--timeout",
            "1m30s",
            "--max-attempts",
            "5",
            "--priority",
            "-2",
            "--require",
            "device=cpu",
            "--idempotency-key",
            "demo-1",
            "--wait",
        ]);
        assert!(args.wait);
        let spec = from_flags(&args).unwrap();
        assert_eq!(
            spec.kernel,
            KernelSpec::Builtin {
                name: "saxpy".into(),
                params: BTreeMap::from([("a".into(), "2".into())])
            }
        );
        assert_eq!(
            spec.inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["x", "y"]
        );
        assert_eq!(spec.inputs[1].data.len(), 8);
        assert_eq!(spec.timeout, Duration::from_secs(90));
        assert_eq!((spec.max_attempts, spec.priority), (5, -2));
        assert_eq!(
            spec.requirements,
            vec![Requirement::parse("device=cpu").unwrap()]
        );
        assert_eq!(spec.idempotency_key.as_deref(), Some("demo-1"));
        check_locally(&spec).unwrap();
    }

    #[test]
    fn wgsl_flags_become_a_spec_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let shader = dir.path().join("double.wgsl");
        std::fs::write(&shader, DOUBLE_WGSL).unwrap();
        let x = f32_file(dir.path(), "x.bin", &[1.0; 4]);
        let args = submit_args(&[
            "--wgsl",
            &shader.display().to_string(),
            "--workgroups",
            "1",
            "--input",
            &format!("x=@{x}"),
            "--output",
            "y=16",
        ]);
        let spec = from_flags(&args).unwrap();
        let KernelSpec::Wgsl {
            entry,
            workgroups,
            source,
        } = &spec.kernel
        else {
            panic!()
        };
        assert_eq!((entry.as_str(), *workgroups), ("main", [1, 1, 1]));
        assert!(source.contains("@compute"));
        assert_eq!(
            spec.outputs,
            vec![OutputDecl {
                name: "y".into(),
                size: 16
            }]
        );
        assert_eq!(
            (spec.timeout, spec.max_attempts, spec.priority),
            (DEFAULT_TIMEOUT, DEFAULT_MAX_ATTEMPTS, 0)
        );
        check_locally(&spec).unwrap();
    }

    #[test]
    fn mistakes_are_caught_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        let x = f32_file(dir.path(), "x.bin", &[1.0; 4]);
        let args = submit_args(&["--kernel", "saxpy", "--input", &format!("x=@{x}")]);
        let e = check_locally(&from_flags(&args).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameter 'a' is missing"), "{e}");
        let args = submit_args(&["--kernel", "saxpy", "--input", "x=@/no/such/file"]);
        let e = format!("{:#}", from_flags(&args).unwrap_err());
        assert!(e.starts_with("input x: cannot read /no/such/file"), "{e}");
        let args = submit_args(&["--kernel", "saxpy", "--input", &format!("x y=@{x}")]);
        let e = check_locally(&from_flags(&args).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the buffer name 'x y' must be non-empty and without spaces"),
            "{e}"
        );
        let args = submit_args(&[
            "--kernel",
            "saxpy",
            "--input",
            &format!("x=@{x}"),
            "--input",
            &format!("x=@{x}"),
        ]);
        let e = check_locally(&from_flags(&args).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("the buffer name 'x' is used twice"), "{e}");
        let args = submit_args(&["--kernel", "saxpy", "--param", "a=1", "--param", "a=2"]);
        assert!(from_flags(&args)
            .unwrap_err()
            .to_string()
            .contains("given twice"));
        let shader = dir.path().join("s.wgsl");
        std::fs::write(&shader, DOUBLE_WGSL).unwrap();
        let args = submit_args(&["--wgsl", &shader.display().to_string()]);
        assert!(from_flags(&args)
            .unwrap_err()
            .to_string()
            .contains("needs --workgroups"));
    }

    #[test]
    fn shards_and_preferences_from_flags() {
        let dir = tempfile::tempdir().unwrap();
        let x = f32_file(dir.path(), "x.bin", &[1.0; 10]);
        let y = f32_file(dir.path(), "y.bin", &[2.0; 10]);
        let (xa, ya) = (format!("x=@{x}"), format!("y=@{y}"));
        let saxpy = |extra: &[&str]| {
            let mut argv = vec![
                "--kernel", "saxpy", "--param", "a=2", "--input", &xa, "--input", &ya,
            ];
            argv.extend_from_slice(extra);
            from_flags(&submit_args(&argv)).unwrap()
        };
        let spec = saxpy(&[]);
        assert_eq!(
            (spec.shards, spec.prefer.len()),
            (1, 0),
            "not sharded by default"
        );
        let spec = saxpy(&[
            "--shards",
            "3",
            "--require",
            "label:zone in a,b",
            "--prefer",
            "device=discrete",
            "--prefer",
            "label:zone=a",
        ]);
        assert_eq!(spec.shards, 3);
        assert_eq!(
            spec.requirements,
            vec![Requirement::parse("label:zone in a,b").unwrap()]
        );
        assert_eq!(
            spec.prefer,
            vec![
                Requirement::parse("device=discrete").unwrap(),
                Requirement::parse("label:zone=a").unwrap()
            ]
        );
        check_locally(&spec).unwrap();
        // One shard per element at most.
        check_locally(&saxpy(&["--shards", "10"])).unwrap();
        let e = check_locally(&saxpy(&["--shards", "11"]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("11 shards for 10 elements: shards must be between 1 and 10"),
            "{e}"
        );
    }

    #[test]
    fn unshardable_kernels_are_refused_before_sending() {
        let dir = tempfile::tempdir().unwrap();
        let x = f32_file(dir.path(), "x.bin", &[1.0; 64]);
        let shader = dir.path().join("double.wgsl");
        std::fs::write(&shader, DOUBLE_WGSL).unwrap();
        let args = submit_args(&[
            "--wgsl",
            &shader.display().to_string(),
            "--workgroups",
            "1",
            "--input",
            &format!("x=@{x}"),
            "--output",
            "y=256",
            "--shards",
            "4",
        ]);
        let e = check_locally(&from_flags(&args).unwrap())
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "WGSL kernels cannot be sharded (4 shards asked); shardable built-in kernels are: \
             saxpy, vector-add, matmul, mandelbrot; leave out --shards (or `shards` in the task \
             file) to run the shader whole"
        );
        // --shards 1 is the default, not a request to shard.
        let mut spec = from_flags(&args).unwrap();
        spec.shards = 1;
        check_locally(&spec).unwrap();
        spec.shards = 0;
        let e = check_locally(&spec).unwrap_err().to_string();
        assert!(e.starts_with("shards must be at least 1"), "{e}");

        let args = submit_args(&[
            "--kernel",
            "reduce-sum",
            "--input",
            &format!("x=@{x}"),
            "--shards",
            "2",
        ]);
        let e = check_locally(&from_flags(&args).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("kernel reduce-sum cannot be sharded; shardable kernels are: saxpy"),
            "{e}"
        );
        // The kernel must plan first: its own mistakes come before the sharding ones.
        let args = submit_args(&["--kernel", "matmul", "--shards", "2"]);
        let e = check_locally(&from_flags(&args).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("parameter"), "{e}");
        let args = submit_args(&[
            "--kernel",
            "mandelbrot",
            "--param",
            "width=8",
            "--param",
            "height=4",
            "--param",
            "max_iter=10",
            "--shards",
            "5",
        ]);
        let e = check_locally(&from_flags(&args).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 shards for 4 rows"), "{e}");
    }

    #[test]
    fn pieces_parse_strictly() {
        assert_eq!(parse_param("a = 2").unwrap(), ("a".into(), "2".into()));
        assert!(parse_param("=2").is_err());
        assert_eq!(
            parse_input("x=@dir/x.bin").unwrap(),
            InputArg {
                name: "x".into(),
                path: "dir/x.bin".into()
            }
        );
        assert!(parse_input("x=x.bin")
            .unwrap_err()
            .contains("expected @FILE"));
        assert_eq!(
            parse_output("y=1024").unwrap(),
            OutputDecl {
                name: "y".into(),
                size: 1024
            }
        );
        assert!(parse_output("y=0").is_err());
        assert!(parse_output("y=1k").is_err());
        assert_eq!(parse_workgroups("4,2").unwrap(), [4, 2, 1]);
        assert!(parse_workgroups("4,0,1").is_err());
        assert!(parse_workgroups("1,1,1,1").is_err());
    }

    pub(crate) const DOUBLE_WGSL: &str = "
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&x)) { y[id.x] = 2.0 * x[id.x]; }
}
";
}
