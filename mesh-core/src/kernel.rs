//! From a submitted kernel to an executable plan: naga validation of WGSL, binding
//! layout, buffer sizes and size limits. The executor in `mesh-node` only runs plans.

use crate::builtin;
use crate::limits::{
    MAX_TASK_BUFFERS, MAX_TASK_INPUT_BYTES, MAX_TASK_OUTPUT_BYTES, MAX_WGSL_SOURCE_BYTES,
};
use crate::task::{KernelSpec, NamedBytes, OutputDecl};
use serde::{Deserialize, Serialize};

/// What one `@group(0) @binding(i)` of a plan holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindingPlan {
    /// A read-only storage buffer filled with the task input at this index.
    Input(usize),
    /// A uniform buffer with these bytes (built-in kernel parameters).
    Uniform(Vec<u8>),
    /// A read-write storage buffer read back as the task output at this index.
    Output(usize),
    /// A read-write storage buffer of this many bytes that one step writes and a later
    /// one reads (a reduction's partial sums): made for each run (zeroed, as wgpu
    /// makes every buffer) and never read back.
    Scratch(u64),
}

/// One compute dispatch of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    /// Entry point in the plan's source.
    pub entry: String,
    /// Workgroup counts.
    pub workgroups: [u32; 3],
}

impl Dispatch {
    /// A dispatch of `entry` over `workgroups`.
    pub fn new(entry: impl Into<String>, workgroups: [u32; 3]) -> Dispatch {
        Dispatch {
            entry: entry.into(),
            workgroups,
        }
    }
}

/// A kernel ready to dispatch: everything the executor needs besides the input bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPlan {
    /// WGSL source.
    pub source: String,
    /// The dispatches, in order, over the same bindings: each sees everything the
    /// ones before it wrote. One for a WGSL task; a built-in that must synchronise
    /// across workgroups (reduce-sum) has two, since WGSL gives workgroups no way to
    /// wait for each other inside one dispatch.
    pub steps: Vec<Dispatch>,
    /// Bindings in order 0, 1, 2, ...
    pub bindings: Vec<BindingPlan>,
    /// Output buffers, indexed by `BindingPlan::Output`.
    pub outputs: Vec<OutputDecl>,
}

/// Why a submitted kernel cannot run. Each message names the fix.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// No built-in of that name.
    #[error("unknown kernel '{name}'; built-in kernels are: {}", builtin::NAMES.join(", "))]
    UnknownKernel {
        /// The name given.
        name: String,
    },
    /// A parameter is missing or malformed.
    #[error("kernel {kernel}: parameter '{param}' {why}")]
    BadParam {
        /// Kernel name.
        kernel: String,
        /// Parameter name.
        param: String,
        /// What is wrong with it.
        why: String,
    },
    /// Inputs do not fit the kernel.
    #[error("kernel {kernel}: {why}")]
    BadInputs {
        /// Kernel name.
        kernel: String,
        /// What is wrong.
        why: String,
    },
    /// The WGSL did not parse or validate; the message is naga's.
    #[error("the WGSL kernel does not compile:\n{0}")]
    InvalidWgsl(String),
    /// The entry point is missing or not a compute shader.
    #[error("the WGSL has no @compute entry point named '{entry}' (found: {found})")]
    NoEntryPoint {
        /// The requested entry point.
        entry: String,
        /// Compute entry points that exist.
        found: String,
    },
    /// The shader's bindings do not match the task's buffers.
    #[error("{0}")]
    BindingMismatch(String),
    /// Workgroup counts are zero or too large.
    #[error("workgroups {0:?}: each count must be between 1 and 65535")]
    BadWorkgroups([u32; 3]),
    /// Input bytes over the limit.
    #[error("task inputs total {total} bytes, over the limit of {limit} bytes; split the work into smaller tasks")]
    InputsTooLarge {
        /// Bytes given.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// Output bytes over the limit.
    #[error("task outputs total {total} bytes, over the limit of {limit} bytes; split the work into smaller tasks")]
    OutputsTooLarge {
        /// Bytes declared.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// Something else about the spec is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// Largest workgroup count per dimension that every adapter supports.
pub const MAX_WORKGROUPS_PER_DIMENSION: u32 = 65_535;

/// Check a kernel with its inputs and build the plan. Pure: the same spec always
/// gives the same plan or the same error.
pub fn plan(
    kernel: &KernelSpec,
    inputs: &[NamedBytes],
    outputs: &[OutputDecl],
) -> Result<KernelPlan, SpecError> {
    let total_in: u64 = inputs.iter().map(|i| i.data.len() as u64).sum();
    if total_in > MAX_TASK_INPUT_BYTES {
        return Err(SpecError::InputsTooLarge {
            total: total_in,
            limit: MAX_TASK_INPUT_BYTES,
        });
    }
    let plan = match kernel {
        KernelSpec::Builtin { name, params } => {
            if !outputs.is_empty() {
                return Err(SpecError::Invalid(format!(
                    "built-in kernel {name} derives its outputs; do not declare any"
                )));
            }
            builtin::plan(name, params, inputs)?
        }
        KernelSpec::Wgsl {
            source,
            entry,
            workgroups,
        } => plan_wgsl(source, entry, *workgroups, inputs, outputs)?,
    };
    let total_out: u64 = plan.outputs.iter().map(|o| o.size).sum();
    if total_out > MAX_TASK_OUTPUT_BYTES {
        return Err(SpecError::OutputsTooLarge {
            total: total_out,
            limit: MAX_TASK_OUTPUT_BYTES,
        });
    }
    if let Some(step) = plan.steps.iter().find(|step| {
        step.workgroups
            .iter()
            .any(|&w| w == 0 || w > MAX_WORKGROUPS_PER_DIMENSION)
    }) {
        return Err(SpecError::BadWorkgroups(step.workgroups));
    }
    Ok(plan)
}

/// Parse and validate WGSL with naga, returning the module or naga's own message.
pub fn validate_wgsl(source: &str) -> Result<naga::Module, SpecError> {
    if source.len() > MAX_WGSL_SOURCE_BYTES {
        return Err(SpecError::Invalid(format!(
            "WGSL source is {} bytes, over the limit of {MAX_WGSL_SOURCE_BYTES}",
            source.len()
        )));
    }
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| SpecError::InvalidWgsl(e.emit_to_string(source)))?;
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| SpecError::InvalidWgsl(e.emit_to_string(source)))?;
    Ok(module)
}

fn plan_wgsl(
    source: &str,
    entry: &str,
    workgroups: [u32; 3],
    inputs: &[NamedBytes],
    outputs: &[OutputDecl],
) -> Result<KernelPlan, SpecError> {
    let module = validate_wgsl(source)?;
    let computes: Vec<&str> = module
        .entry_points
        .iter()
        .filter(|e| e.stage == naga::ShaderStage::Compute)
        .map(|e| e.name.as_str())
        .collect();
    if !computes.contains(&entry) {
        return Err(SpecError::NoEntryPoint {
            entry: entry.into(),
            found: computes.join(", "),
        });
    }
    if outputs.is_empty() {
        return Err(SpecError::Invalid(
            "a WGSL task needs at least one output (--output NAME=BYTES)".into(),
        ));
    }
    if inputs.len() + outputs.len() > MAX_TASK_BUFFERS {
        return Err(SpecError::Invalid(format!(
            "a task has at most {MAX_TASK_BUFFERS} buffers; this one has {}",
            inputs.len() + outputs.len()
        )));
    }
    for o in outputs {
        if o.size == 0 || !o.size.is_multiple_of(4) {
            return Err(SpecError::Invalid(format!(
                "output {} is {} bytes; output sizes must be a positive multiple of 4",
                o.name, o.size
            )));
        }
    }
    for i in inputs {
        if i.data.is_empty() || !i.data.len().is_multiple_of(4) {
            return Err(SpecError::Invalid(format!(
                "input {} is {} bytes; input sizes must be a positive multiple of 4",
                i.name,
                i.data.len()
            )));
        }
    }
    // The shader's storage bindings must be exactly: inputs read-only, then outputs read-write.
    let mut declared: Vec<(u32, bool)> = module
        .global_variables
        .iter()
        .filter_map(|(_, g)| match (&g.binding, g.space) {
            (Some(b), naga::AddressSpace::Storage { access }) if b.group == 0 => {
                Some((b.binding, access.contains(naga::StorageAccess::STORE)))
            }
            _ => None,
        })
        .collect();
    declared.sort();
    let expected: Vec<(u32, bool)> = (0..inputs.len())
        .map(|i| (i as u32, false))
        .chain((0..outputs.len()).map(|o| ((inputs.len() + o) as u32, true)))
        .collect();
    if declared != expected {
        let describe = |v: &[(u32, bool)]| {
            v.iter()
                .map(|(b, w)| format!("@binding({b}) {}", if *w { "read_write" } else { "read" }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(SpecError::BindingMismatch(format!(
            "the kernel's storage buffers at @group(0) are [{}], but {} input(s) and {} output(s) need [{}]: inputs bind first as var<storage, read>, outputs after them as var<storage, read_write>",
            describe(&declared),
            inputs.len(),
            outputs.len(),
            describe(&expected)
        )));
    }
    check_static_sizes(&module, inputs, outputs)?;
    let bindings = (0..inputs.len())
        .map(BindingPlan::Input)
        .chain((0..outputs.len()).map(BindingPlan::Output))
        .collect();
    Ok(KernelPlan {
        source: source.into(),
        steps: vec![Dispatch::new(entry, workgroups)],
        bindings,
        outputs: outputs.to_vec(),
    })
}

/// A kernel whose binding is declared larger than the buffer the task gives it would
/// address beyond that buffer: refuse it at submit rather than fail at dispatch.
fn check_static_sizes(
    module: &naga::Module,
    inputs: &[NamedBytes],
    outputs: &[OutputDecl],
) -> Result<(), SpecError> {
    let mut layouter = naga::proc::Layouter::default();
    layouter
        .update(module.to_ctx())
        .map_err(|e| SpecError::InvalidWgsl(format!("cannot lay out the kernel's types: {e}")))?;
    for (_, g) in module.global_variables.iter() {
        let (Some(b), naga::AddressSpace::Storage { .. }) = (&g.binding, g.space) else {
            continue;
        };
        let i = b.binding as usize;
        let (name, given) = if i < inputs.len() {
            (inputs[i].name.as_str(), inputs[i].data.len() as u64)
        } else if let Some(o) = outputs.get(i - inputs.len()) {
            (o.name.as_str(), o.size)
        } else {
            continue;
        };
        let ty = &module.types[g.ty];
        let dynamic = matches!(
            ty.inner,
            naga::TypeInner::Array {
                size: naga::ArraySize::Dynamic,
                ..
            }
        );
        let needed = u64::from(layouter[g.ty].size);
        if !dynamic && needed > given {
            return Err(SpecError::BindingMismatch(format!(
                "@binding({i}) ({}) is declared as {needed} bytes in the kernel but the task's buffer {name} has {given} bytes; the kernel would address beyond its buffer: declare a runtime-sized array (array<T>) or give a larger buffer",
                g.name.as_deref().unwrap_or("unnamed")
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Bytes;

    const DOUBLE: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&x)) { y[id.x] = 2.0 * x[id.x]; }
}
"#;

    fn wgsl(src: &str, entry: &str) -> KernelSpec {
        KernelSpec::Wgsl {
            source: src.into(),
            entry: entry.into(),
            workgroups: [1, 1, 1],
        }
    }

    fn input(n: usize) -> Vec<NamedBytes> {
        vec![NamedBytes {
            name: "x".into(),
            data: Bytes::from(vec![0u8; n]),
        }]
    }

    fn out(n: u64) -> Vec<OutputDecl> {
        vec![OutputDecl {
            name: "y".into(),
            size: n,
        }]
    }

    #[test]
    fn valid_wgsl_plans_inputs_then_outputs() {
        let p = plan(&wgsl(DOUBLE, "main"), &input(256), &out(256)).unwrap();
        assert_eq!(
            p.bindings,
            vec![BindingPlan::Input(0), BindingPlan::Output(0)]
        );
    }

    #[test]
    fn invalid_wgsl_is_refused_with_naga_message() {
        let err = plan(&wgsl("fn main( {", "main"), &input(4), &out(4)).unwrap_err();
        let SpecError::InvalidWgsl(msg) = err else {
            panic!("{err:?}")
        };
        assert!(msg.contains("error"), "{msg}");
        let undefined = DOUBLE.replace("2.0 * x[id.x]", "2.0 * z[id.x]");
        let err = plan(&wgsl(&undefined, "main"), &input(4), &out(4)).unwrap_err();
        assert!(
            err.to_string()
                .contains("no definition in scope for identifier: `z`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_entry_point_and_bindings() {
        let err = plan(&wgsl(DOUBLE, "nope"), &input(4), &out(4)).unwrap_err();
        assert_eq!(
            err,
            SpecError::NoEntryPoint {
                entry: "nope".into(),
                found: "main".into()
            }
        );
        let two_inputs = [input(4), input(4)].concat();
        let err = plan(&wgsl(DOUBLE, "main"), &two_inputs, &out(4)).unwrap_err();
        assert!(matches!(err, SpecError::BindingMismatch(_)), "{err}");
    }

    #[test]
    fn fixed_arrays_larger_than_the_buffer_are_refused() {
        let fixed = DOUBLE.replace(
            "read_write> y: array<f32>",
            "read_write> y: array<f32, 1024>",
        );
        let err = plan(&wgsl(&fixed, "main"), &input(256), &out(256)).unwrap_err();
        assert!(err.to_string().contains("declared as 4096 bytes"), "{err}");
        assert!(plan(&wgsl(&fixed, "main"), &input(256), &out(4096)).is_ok());
    }

    #[test]
    fn size_limits() {
        let big = (MAX_TASK_INPUT_BYTES + 4) as usize;
        assert!(matches!(
            plan(&wgsl(DOUBLE, "main"), &input(big), &out(4)),
            Err(SpecError::InputsTooLarge { .. })
        ));
        assert!(matches!(
            plan(
                &wgsl(DOUBLE, "main"),
                &input(4),
                &out(MAX_TASK_OUTPUT_BYTES + 4)
            ),
            Err(SpecError::OutputsTooLarge { .. })
        ));
        assert!(matches!(
            plan(&wgsl(DOUBLE, "main"), &input(4), &out(6)),
            Err(SpecError::Invalid(_))
        ));
    }
}
