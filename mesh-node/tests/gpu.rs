//! Proves that the wgpu executor runs every built-in kernel bit-for-bit equal to its
//! CPU reference, runs custom WGSL, refuses oversized buffers and broken kernels with
//! typed errors instead of panics, and that `probe()` describes real adapters.
//!
//! Method: one `Executor` on the best adapter (lavapipe in CI) is shared by all tests;
//! inputs come from a fixed-seed LCG, so every run computes the same bytes. Built-in
//! outputs are compared byte for byte, never with a tolerance; when one differs,
//! `the_adapter_rounds_builtin_f32_expressions_as_written` names the f32 expression
//! the driver fused or reassociated. Without an adapter the tests FAIL (they never
//! skip): CI must install mesa-vulkan-drivers.

use mesh_core::builtin::{self, cpu_reference, f32_bytes, f32s};
use mesh_core::kernel::{self, BindingPlan, Dispatch, KernelPlan};
use mesh_core::task::{KernelSpec, NamedBytes, OutputDecl};
use mesh_core::Bytes;
use mesh_node::gpu::{probe, Executor, GpuError};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// The executor every test shares: opening a device costs more than most kernels.
fn executor() -> &'static Executor {
    static EXECUTOR: OnceLock<Executor> = OnceLock::new();
    EXECUTOR.get_or_init(|| match Executor::open_best() {
        Ok(executor) => executor,
        Err(e) => panic!(
            "the GPU tests need a wgpu adapter and found none usable: {e}\n\
             On a machine without a GPU run `apt-get update && apt-get install -y mesa-vulkan-drivers` \
             (Mesa's lavapipe CPU Vulkan driver). These tests never skip."
        ),
    })
}

/// Deterministic pseudo-random f32s in [-1, 1) (Knuth's MMIX LCG, top 24 bits).
fn lcg_f32s(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn input(name: &str, values: &[f32]) -> NamedBytes {
    NamedBytes {
        name: name.into(),
        data: Bytes::from(f32_bytes(values)),
    }
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Plan a built-in kernel, run it on the GPU and require the CPU reference's bytes.
fn check_builtin(name: &str, params: BTreeMap<String, String>, inputs: Vec<NamedBytes>) {
    let spec = KernelSpec::Builtin {
        name: name.into(),
        params: params.clone(),
    };
    let plan =
        kernel::plan(&spec, &inputs, &[]).unwrap_or_else(|e| panic!("{name} does not plan: {e}"));
    let data: Vec<Bytes> = inputs.iter().map(|i| i.data.clone()).collect();
    let outputs = executor()
        .run(&plan, &data)
        .unwrap_or_else(|e| panic!("{name} failed on the GPU: {e}"));
    assert_eq!(outputs.len(), 1, "{name}: one output");
    let expected = cpu_reference(name, &params, &inputs);
    assert_same_bytes(name, &outputs[0], &expected);
}

/// Byte equality with a readable report of the first differences (the buffers are
/// megabytes; `assert_eq!` would print all of them).
fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: output length");
    if got == want {
        return;
    }
    let words = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<_>>()
    };
    let (g, w) = (words(got), words(want));
    let diffs: Vec<usize> = (0..g.len()).filter(|&i| g[i] != w[i]).collect();
    // Mandelbrot writes u32 iteration counts; every other built-in writes f32.
    let show = |x: u32| {
        if what == "mandelbrot" {
            x.to_string()
        } else {
            format!("{:e}", f32::from_bits(x))
        }
    };
    let shown: Vec<String> = diffs
        .iter()
        .take(5)
        .map(|&i| {
            format!(
                "[{i}] gpu {} ({:#010x}) cpu {} ({:#010x})",
                show(g[i]),
                g[i],
                show(w[i]),
                w[i]
            )
        })
        .collect();
    panic!(
        "{what}: GPU output differs from the CPU reference in {} of {} words (adapter {}):\n{}",
        diffs.len(),
        g.len(),
        executor().info().name,
        shown.join("\n")
    );
}

#[test]
fn saxpy_over_a_million_elements_matches_the_cpu_reference() {
    let n = 1 << 20;
    check_builtin(
        "saxpy",
        params(&[("a", "1.7320508")]),
        vec![input("x", &lcg_f32s(1, n)), input("y", &lcg_f32s(2, n))],
    );
}

#[test]
fn vector_add_matches_the_cpu_reference() {
    let n = 100_003;
    check_builtin(
        "vector-add",
        params(&[]),
        vec![input("x", &lcg_f32s(3, n)), input("y", &lcg_f32s(4, n))],
    );
}

#[test]
fn matmul_with_odd_shapes_matches_the_cpu_reference() {
    let (m, n, k) = (33, 17, 65);
    check_builtin(
        "matmul",
        params(&[("m", "33"), ("n", "17"), ("k", "65")]),
        vec![
            input("a", &lcg_f32s(5, m * k)),
            input("b", &lcg_f32s(6, k * n)),
        ],
    );
}

#[test]
fn reduce_sum_over_a_million_elements_matches_the_cpu_reference() {
    check_builtin(
        "reduce-sum",
        params(&[]),
        vec![input("x", &lcg_f32s(7, 1 << 20))],
    );
}

/// reduce-sum's two steps at the edges of its workgroup count: one workgroup (and a
/// single element), lengths that end inside a workgroup, and the most elements a
/// task may carry, where the count stops growing and each invocation adds more.
#[test]
fn reduce_sum_at_the_edges_of_its_workgroup_count_matches_the_cpu_reference() {
    let most = (mesh_core::limits::MAX_TASK_INPUT_BYTES / 4) as usize;
    for (seed, n) in [(8, 1), (9, 257), (10, 2049), (11, most - 3)] {
        // Magnitudes spread over 2^-8..2^8 with full mantissas, so that adding in
        // another order than the reference's changes the sum's bits.
        let xs: Vec<f32> = lcg_f32s(seed, n)
            .iter()
            .enumerate()
            .map(|(i, x)| x * 1.37 * (2.0f32).powi((i % 17) as i32 - 8))
            .collect();
        check_builtin("reduce-sum", params(&[]), vec![input("x", &xs)]);
    }
}

#[test]
fn mandelbrot_matches_the_cpu_reference() {
    check_builtin(
        "mandelbrot",
        params(&[("width", "256"), ("height", "128"), ("max_iter", "200")]),
        vec![],
    );
}

const SQUARE_PLUS_INDEX: &str = r#"
@group(0) @binding(0) var<storage, read> x: array<u32>;
@group(0) @binding(1) var<storage, read_write> y: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x < arrayLength(&x)) { y[id.x] = x[id.x] * x[id.x] + id.x; }
}
"#;

fn custom_plan(source: &str, n: u64) -> KernelPlan {
    KernelPlan {
        source: source.into(),
        steps: vec![Dispatch::new("main", [n.div_ceil(64) as u32, 1, 1])],
        bindings: vec![BindingPlan::Input(0), BindingPlan::Output(0)],
        outputs: vec![OutputDecl {
            name: "y".into(),
            size: n * 4,
        }],
    }
}

#[test]
fn a_custom_wgsl_kernel_runs() {
    let n = 1000u32;
    let x: Vec<u8> = (0..n).flat_map(|i| (i * 3).to_le_bytes()).collect();
    let inputs = [NamedBytes {
        name: "x".into(),
        data: Bytes::from(x),
    }];
    let spec = KernelSpec::Wgsl {
        source: SQUARE_PLUS_INDEX.into(),
        entry: "main".into(),
        workgroups: [16, 1, 1],
    };
    let plan = kernel::plan(
        &spec,
        &inputs,
        &[OutputDecl {
            name: "y".into(),
            size: n as u64 * 4,
        }],
    )
    .unwrap_or_else(|e| panic!("the custom kernel does not plan: {e}"));
    let out = executor()
        .run(&plan, &[inputs[0].data.clone()])
        .unwrap_or_else(|e| panic!("custom kernel failed: {e}"));
    let got: Vec<u32> = out[0]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let want: Vec<u32> = (0..n).map(|i| (i * 3) * (i * 3) + i).collect();
    assert_eq!(got, want);
}

#[test]
fn an_output_over_the_storage_binding_limit_is_refused_before_dispatch() {
    let limit = executor().info().limits.max_storage_buffer_binding_size;
    let mut plan = custom_plan(SQUARE_PLUS_INDEX, 4);
    plan.outputs[0].size = limit + 4;
    let err = executor()
        .run(&plan, &[Bytes::from(vec![0u8; 16])])
        .expect_err("an oversized output must be refused");
    match &err {
        GpuError::BufferTooLarge {
            binding: 1,
            bytes,
            limit: l,
            ..
        } => {
            assert_eq!((*bytes, *l), (limit + 4, limit), "{err}");
        }
        other => panic!("expected BufferTooLarge for binding 1, got {other:?}"),
    }
    assert!(
        !err.retryable(),
        "a too-large buffer fails everywhere: {err}"
    );
    // Nothing was dispatched or lost: the executor still works.
    let out = executor().run(
        &custom_plan(SQUARE_PLUS_INDEX, 4),
        &[Bytes::from(f32_bytes(&[0.0; 4]))],
    );
    assert!(out.is_ok(), "{out:?}");
}

#[test]
fn broken_kernels_are_compile_errors_not_panics() {
    // Fails wgpu's (naga's) validation: `z` is undefined.
    let undefined = SQUARE_PLUS_INDEX.replace("x[id.x] * x[id.x]", "z[id.x]");
    let err = executor()
        .run(&custom_plan(&undefined, 4), &[Bytes::from(vec![0u8; 16])])
        .expect_err("undefined name");
    assert!(matches!(err, GpuError::Compile(_)), "{err:?}");
    assert!(!err.retryable());
    // Valid WGSL whose binding contradicts the plan: the shader writes binding 0,
    // which the plan binds as a read-only input. Fails at pipeline creation.
    let writes_input =
        SQUARE_PLUS_INDEX.replace("var<storage, read> x", "var<storage, read_write> x");
    let err = executor()
        .run(
            &custom_plan(&writes_input, 4),
            &[Bytes::from(vec![0u8; 16])],
        )
        .expect_err("mismatch");
    assert!(matches!(err, GpuError::Compile(_)), "{err:?}");
    // A missing input is the planner's bug, reported as such.
    let err = executor()
        .run(&custom_plan(SQUARE_PLUS_INDEX, 4), &[])
        .expect_err("no inputs");
    assert!(matches!(err, GpuError::InvalidPlan(_)), "{err:?}");
    // So is an input no binding reads: each input has exactly one device buffer.
    let input = Bytes::from(vec![0u8; 16]);
    let err = executor()
        .run(&custom_plan(SQUARE_PLUS_INDEX, 4), &[input.clone(), input])
        .expect_err("an unbound input");
    assert!(
        matches!(&err, GpuError::InvalidPlan(m) if m.contains("input 1 is bound 0 times")),
        "{err:?}"
    );
}

/// What the GPU worker does with a job: upload the inputs through `fill` (the daemon
/// writes them, or the worker reads them from its pipe), launch, and read the outputs
/// where the device put them.
#[test]
fn upload_then_launch_reads_outputs_in_place_and_a_failed_fill_is_its_error() {
    let n = 100u64;
    let plan = custom_plan(SQUARE_PLUS_INDEX, n);
    let x: Vec<u8> = (0..n as u32).flat_map(|i| i.to_le_bytes()).collect();
    // Filled in two pieces, as the worker fills an input chunk by chunk.
    let uploaded = executor()
        .upload(&plan, &[x.len() as u64], |dests| {
            let [mut dest] = <[_; 1]>::try_from(dests).expect("one input, one buffer");
            assert_eq!(dest.len(), x.len());
            let half = x.len() / 2;
            dest.slice(..half).copy_from_slice(&x[..half]);
            dest.slice(half..).copy_from_slice(&x[half..]);
            Ok::<(), GpuError>(())
        })
        .expect("upload");
    let outputs = executor().launch(&plan, uploaded).expect("launch");
    let views = outputs.views().expect("mapped outputs");
    let expected: Vec<u8> = (0..n as u32)
        .flat_map(|i| (i * i + i).to_le_bytes())
        .collect();
    assert_eq!(views.len(), 1);
    assert_eq!(&*views[0], expected.as_slice());

    // A fill that fails (the worker's pipe broke) ends the upload with its own error.
    #[derive(Debug)]
    enum Failed {
        Pipe,
        Gpu(GpuError),
    }
    impl From<GpuError> for Failed {
        fn from(e: GpuError) -> Failed {
            Failed::Gpu(e)
        }
    }
    let failed = executor().upload(&plan, &[x.len() as u64], |_| Err(Failed::Pipe));
    assert!(matches!(failed, Err(Failed::Pipe)), "{failed:?}");
    // A plan the adapter refuses is refused before `fill` is called.
    let mut zero = plan.clone();
    zero.steps[0].workgroups = [0, 1, 1];
    let refused = executor().upload(&zero, &[x.len() as u64], |_| -> Result<(), Failed> {
        panic!("fill called for a refused plan")
    });
    assert!(
        matches!(refused, Err(Failed::Gpu(GpuError::InvalidPlan(_)))),
        "{refused:?}"
    );
    let mut stepless = plan.clone();
    stepless.steps.clear();
    let refused = executor().upload(&stepless, &[x.len() as u64], |_| -> Result<(), Failed> {
        panic!("fill called for a plan with nothing to dispatch")
    });
    assert!(
        matches!(&refused, Err(Failed::Gpu(GpuError::InvalidPlan(why))) if why.contains("no steps")),
        "{refused:?}"
    );
    // The executor is unharmed.
    let again = executor()
        .run(&plan, &[Bytes::from(x)])
        .expect("a run after");
    assert_eq!(again, vec![expected]);
}

/// `out` = the words of `a` then those of `b`; `lens` = how many words each holds.
const CONCAT_WITH_LENGTHS: &str = r#"
@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@group(0) @binding(3) var<storage, read_write> lens: array<u32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x;
    let na = arrayLength(&a);
    if (i < na) {
        out[i] = a[i];
    } else if (i - na < arrayLength(&b)) {
        out[i] = b[i - na];
    }
    if (i == 0u) {
        lens[0] = na;
        lens[1] = arrayLength(&b);
    }
}
"#;

/// One run of [`CONCAT_WITH_LENGTHS`]: the plan for inputs of these byte lengths.
fn concat_plan(a_len: usize, b_len: usize) -> KernelPlan {
    let words = a_len.div_ceil(4) + b_len.div_ceil(4);
    KernelPlan {
        source: CONCAT_WITH_LENGTHS.into(),
        steps: vec![Dispatch::new("main", [(words as u32).div_ceil(64), 1, 1])],
        bindings: vec![
            BindingPlan::Input(0),
            BindingPlan::Input(1),
            BindingPlan::Output(0),
            BindingPlan::Output(1),
        ],
        outputs: vec![
            OutputDecl {
                name: "out".into(),
                size: words as u64 * 4,
            },
            OutputDecl {
                name: "lens".into(),
                size: 8,
            },
        ],
    }
}

/// What [`CONCAT_WITH_LENGTHS`] must give: each input zero-padded to whole words.
fn concat_expected(a: &[u8], b: &[u8]) -> Vec<Vec<u8>> {
    let padded = |bytes: &[u8]| {
        let mut v = bytes.to_vec();
        v.resize(bytes.len().div_ceil(4) * 4, 0);
        v
    };
    let words = |bytes: &[u8]| (bytes.len().div_ceil(4) as u32).to_le_bytes();
    vec![
        [padded(a), padded(b)].concat(),
        [words(a), words(b)].concat(),
    ]
}

#[test]
fn runs_on_one_executor_see_only_their_own_bytes_in_its_kept_buffers() {
    // An executor of its own, so that its kept staging buffers hold exactly what
    // this test ran (the shared one serves other tests at the same time).
    let executor = Executor::open_best().expect("an adapter (see executor())");
    let run = |a: &[u8], b: &[u8]| {
        let plan = concat_plan(a.len(), b.len());
        let inputs = [Bytes::from(a.to_vec()), Bytes::from(b.to_vec())];
        let lens = [a.len() as u64, b.len() as u64];
        let uploaded = executor
            .upload(&plan, &lens, |dests| {
                for (mut dest, input) in dests.into_iter().zip(&inputs) {
                    dest.copy_from_slice(input);
                }
                Ok::<(), GpuError>(())
            })
            .expect("upload");
        executor.launch(&plan, uploaded).expect("launch")
    };
    let big_a = vec![0xff; 4004];
    let big_b = vec![0xee; 2004];
    let big = run(&big_a, &big_b);
    // Views of a run's outputs, still held while later runs go on; the `Outputs` they
    // came from is gone, so only the views keep its read-back buffer off the shelf.
    let held = big.views().expect("mapped outputs");
    drop(big);
    let want_big = concat_expected(&big_a, &big_b);
    assert_eq!(
        held.iter().map(|v| v.to_vec()).collect::<Vec<_>>(),
        want_big
    );

    // Smaller inputs into the staging buffer the big run left: the padding of `a`'s
    // second word is zero, not the big run's 0xff, and the kernel sees its own
    // lengths.
    let small_a = [1u8, 2, 3, 4, 5];
    let small_b: Vec<u8> = [7u32, 8, 9].iter().flat_map(|w| w.to_le_bytes()).collect();
    let small = run(&small_a, &small_b);
    let small_views = small.views().expect("mapped outputs");
    let got: Vec<Vec<u8>> = small_views.iter().map(|v| v.to_vec()).collect();
    assert_eq!(got, concat_expected(&small_a, &small_b));
    assert_eq!(
        got[0][..8],
        [1, 2, 3, 4, 5, 0, 0, 0],
        "the padding after a 5-byte input must be zero"
    );
    drop(small_views);
    drop(small);

    // The held views were not overwritten by the later run's read-back.
    assert_eq!(
        held.iter().map(|v| v.to_vec()).collect::<Vec<_>>(),
        want_big
    );
    drop(held);

    // With every buffer back on the shelves, the runs still get their own bytes.
    for (a, b) in [(&big_a[..100], &small_b[..]), (&small_a[..], &big_b[..])] {
        let outputs = run(a, b);
        let got: Vec<Vec<u8>> = outputs
            .views()
            .expect("mapped outputs")
            .iter()
            .map(|v| v.to_vec())
            .collect();
        assert_eq!(got, concat_expected(a, b));
    }
}

#[test]
fn probe_describes_at_least_one_adapter() {
    let adapters = probe();
    assert!(
        !adapters.is_empty(),
        "probe() found no adapter; install mesa-vulkan-drivers (lavapipe) or a GPU driver"
    );
    for a in &adapters {
        assert!(!a.name.is_empty(), "{a:?}");
        assert!(!a.backend.is_empty(), "{a:?}");
        assert!(a.limits.max_buffer_size > 0, "{a:?}");
        assert!(a.limits.max_storage_buffer_binding_size > 0, "{a:?}");
        assert!(a.limits.max_storage_buffers_per_shader_stage > 0, "{a:?}");
        assert!(a.limits.max_compute_workgroups_per_dimension > 0, "{a:?}");
        assert!(a.limits.max_compute_invocations_per_workgroup > 0, "{a:?}");
        assert!(a.limits.max_compute_workgroup_size_x > 0, "{a:?}");
        for f in &a.features {
            assert!(
                !f.is_empty()
                    && f.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "feature name {f:?} is not kebab-case"
            );
            assert!(
                wgpu::Features::from_name(&f.to_ascii_uppercase().replace('-', "_")).is_some(),
                "feature {f:?} is not a wgpu flag name"
            );
        }
    }
    // Best first: the list is sorted by device kind, and the executor opens index 0.
    assert!(
        adapters
            .windows(2)
            .all(|w| w[0].device_type <= w[1].device_type),
        "{adapters:?}"
    );
    assert_eq!(executor().info().name, adapters[0].name);
    assert_eq!(executor().info().backend, adapters[0].backend);
    println!("adapters: {adapters:#?}");
}

/// The readable round trip of the helpers above, so a failing comparison is trusted.
#[test]
fn f32_helpers_round_trip() {
    let v = lcg_f32s(9, 1000);
    assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
    assert_eq!(f32s(&f32_bytes(&v)), v);
}

/// An f32 expression of (a, b, c) evaluated on the CPU.
type Eval = fn(f32, f32, f32) -> f32;

/// One f32 expression shape: how the built-in kernels spell it, its value as their
/// CPU references compute it, and what a driver may compute instead.
struct Form {
    /// The expression over `a`, `b`, `c`; also its WGSL in [`FORMS_WGSL`].
    expr: &'static str,
    /// How the built-in kernels' WGSL spells it; the form fails the test only while
    /// some built-in still contains one of these (else it is reported, as what this
    /// driver does with such an expression).
    in_builtin: &'static [&'static str],
    /// Every operation rounded on its own, in the order written (the CPU reference).
    as_written: Eval,
    /// Fused (FMA) or reassociated evaluations, to name what the adapter did.
    alternatives: &'static [(&'static str, Eval)],
}

const FORMS: &[Form] = &[
    Form {
        expr: "unfused(a * b) + c",
        in_builtin: &[
            "unfused(params.a * x[i]) + y[i]",
            "acc + unfused(a[row * params.k + i] * b[i * params.n + col])",
        ],
        as_written: |a, b, c| a * b + c,
        alternatives: &[("fma(a, b, c)", |a, b, c| a.mul_add(b, c))],
    },
    Form {
        expr: "unfused(a * a) + unfused(b * b)",
        in_builtin: &["unfused(zx * zx) + unfused(zy * zy)"],
        as_written: |a, b, _| a * a + b * b,
        alternatives: &[
            ("fma(a, a, b * b)", |a, b, _| a.mul_add(a, b * b)),
            ("fma(b, b, a * a)", |a, b, _| b.mul_add(b, a * a)),
        ],
    },
    Form {
        expr: "unfused((a - b) * (a + b)) + c",
        in_builtin: &["unfused((zx - zy) * (zx + zy)) + cx"],
        as_written: |a, b, c| (a - b) * (a + b) + c,
        alternatives: &[("fma(a - b, a + b, c)", |a, b, c| (a - b).mul_add(a + b, c))],
    },
    Form {
        expr: "unfused(2.0 * a * b) + c",
        in_builtin: &["unfused(2.0 * zx * zy) + cy"],
        as_written: |a, b, c| 2.0 * a * b + c,
        alternatives: &[("fma(2.0 * a, b, c)", |a, b, c| (2.0 * a).mul_add(b, c))],
    },
    Form {
        expr: "unfused((a + 0.5) * b) - c",
        in_builtin: &[
            "unfused((f32(id.x) + 0.5) * params.step_x) - 2.5",
            "unfused((f32(py) + 0.5) * params.step_y) - 1.25",
        ],
        as_written: |a, b, c| (a + 0.5) * b - c,
        alternatives: &[("fma(a + 0.5, b, -c)", |a, b, c| (a + 0.5).mul_add(b, -c))],
    },
    // What the driver does with the spellings the built-ins avoid (reported, not
    // failed): NVIDIA's fuses the first, lavapipe rounds even `fma` twice.
    Form {
        expr: "a * b + c",
        in_builtin: &[],
        as_written: |a, b, c| a * b + c,
        alternatives: &[("fma(a, b, c)", |a, b, c| a.mul_add(b, c))],
    },
    Form {
        expr: "a * a - b * b + c",
        in_builtin: &[],
        as_written: |a, b, c| a * a - b * b + c,
        alternatives: &[
            ("(a * a + c) - b * b", |a, b, c| (a * a + c) - b * b),
            ("fma(a, a, -(b * b)) + c", |a, b, c| {
                a.mul_add(a, -(b * b)) + c
            }),
            ("fma(-b, b, a * a) + c", |a, b, c| {
                (-b).mul_add(b, a * a) + c
            }),
        ],
    },
    Form {
        expr: "fma(a, b, c) (WGSL's)",
        in_builtin: &[],
        as_written: |a, b, c| a.mul_add(b, c),
        alternatives: &[("a * b + c, rounded twice", |a, b, c| a * b + c)],
    },
];

/// Evaluates [`FORMS`], in order, over (a, b, c) triples: one word per form per triple.
/// `unfused` is the built-ins' own (`builtin::UNFUSED`, prepended), with the `zero` it
/// reads from the uniform.
const FORMS_WGSL: &str = r#"
struct Params { zero: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<storage, read> v: array<f32>;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= arrayLength(&v) / 3u) { return; }
    let a = v[3u * id.x];
    let b = v[3u * id.x + 1u];
    let c = v[3u * id.x + 2u];
    let k = 8u * id.x;
    o[k] = unfused(a * b) + c;
    o[k + 1u] = unfused(a * a) + unfused(b * b);
    o[k + 2u] = unfused((a - b) * (a + b)) + c;
    o[k + 3u] = unfused(2.0 * a * b) + c;
    o[k + 4u] = unfused((a + 0.5) * b) - c;
    o[k + 5u] = a * b + c;
    o[k + 6u] = a * a - b * b + c;
    o[k + 7u] = fma(a, b, c);
}
"#;

/// The WGSL of every built-in kernel, planned with small inputs.
fn builtin_sources() -> String {
    let tiny = |names: &[&str], n: usize| {
        names
            .iter()
            .map(|name| input(name, &vec![1.0; n]))
            .collect::<Vec<_>>()
    };
    let cases = [
        ("saxpy", params(&[("a", "2")]), tiny(&["x", "y"], 4)),
        ("vector-add", params(&[]), tiny(&["x", "y"], 4)),
        (
            "matmul",
            params(&[("m", "2"), ("n", "2"), ("k", "2")]),
            tiny(&["a", "b"], 4),
        ),
        ("reduce-sum", params(&[]), tiny(&["x"], 4)),
        (
            "mandelbrot",
            params(&[("width", "2"), ("height", "2"), ("max_iter", "2")]),
            vec![],
        ),
    ];
    cases
        .into_iter()
        .map(|(name, params, inputs)| {
            let spec = KernelSpec::Builtin {
                name: name.into(),
                params,
            };
            kernel::plan(&spec, &inputs, &[])
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .source
        })
        .collect()
}

/// The built-in kernels' CPU references assume every f32 operation is rounded on its
/// own, in the order written. Vulkan lets a driver fuse or reassociate operations
/// that SPIR-V does not mark `NoContraction`, and naga never marks them, so the
/// built-ins pass products through `unfused()` (`builtin::UNFUSED`); this checks each
/// expression shape the built-ins use and, when the adapter computes it differently,
/// names the form it computed instead: a built-in mismatch above then has a precise
/// cause. It also reports, without failing, what the driver does with the plain
/// spellings the built-ins avoid.
#[test]
fn the_adapter_rounds_builtin_f32_expressions_as_written() {
    let n = 4096;
    let v: Vec<f32> = lcg_f32s(11, 3 * n).iter().map(|x| x * 2.0).collect();
    let plan = KernelPlan {
        source: format!("{}{FORMS_WGSL}", builtin::UNFUSED),
        steps: vec![Dispatch::new("main", [(n / 64) as u32, 1, 1])],
        bindings: vec![
            BindingPlan::Input(0),
            BindingPlan::Uniform(vec![0; 16]),
            BindingPlan::Output(0),
        ],
        outputs: vec![OutputDecl {
            name: "o".into(),
            size: (FORMS.len() * n * 4) as u64,
        }],
    };
    let out = executor()
        .run(&plan, &[Bytes::from(f32_bytes(&v))])
        .unwrap_or_else(|e| panic!("{e}"));
    let out = f32s(&out[0]);
    let sources = builtin_sources();
    let args = |i: usize| (v[3 * i], v[3 * i + 1], v[3 * i + 2]);
    let mut failures = Vec::new();
    for (k, form) in FORMS.iter().enumerate() {
        let gpu = |i: usize| out[FORMS.len() * i + k];
        let differs: Vec<usize> = (0..n)
            .filter(|&i| {
                let (a, b, c) = args(i);
                gpu(i).to_bits() != (form.as_written)(a, b, c).to_bits()
            })
            .collect();
        let used = form.in_builtin.iter().any(|text| sources.contains(text));
        println!(
            "`{}` ({}): {} of {n} differ from the as-written rounding",
            form.expr,
            if used {
                "used by a built-in"
            } else {
                "not used by any built-in"
            },
            differs.len()
        );
        let Some(&i) = differs.first() else { continue };
        let computed: Vec<&str> = form
            .alternatives
            .iter()
            .filter(|(_, f)| {
                (0..n).all(|i| {
                    let (a, b, c) = args(i);
                    f(a, b, c).to_bits() == gpu(i).to_bits()
                })
            })
            .map(|(name, _)| *name)
            .collect();
        let (a, b, c) = args(i);
        let want = (form.as_written)(a, b, c);
        let spelled = if used {
            format!(" (built-in WGSL `{}`)", form.in_builtin.join("`, `"))
        } else {
            String::new()
        };
        let message = format!(
            "`{}`{spelled} differs in {} of {n} cases; the adapter computes {}; \
             e.g. a={a:e} b={b:e} c={c:e}: gpu {:e} ({:#010x}), as written {want:e} ({:#010x})",
            form.expr,
            differs.len(),
            if computed.is_empty() {
                "no known fused or reassociated form".into()
            } else {
                computed.join(" / ")
            },
            gpu(i),
            gpu(i).to_bits(),
            want.to_bits(),
        );
        if used {
            failures.push(message);
        } else {
            println!("  (not used by a built-in, not a failure) {message}");
        }
    }
    assert!(
        failures.is_empty(),
        "adapter {} does not round these built-in f32 expressions as written, so the built-in \
         kernels cannot match their CPU references bit for bit; rewrite the kernel and its \
         reference in mesh-core to a form the driver leaves alone:\n{}",
        executor().info().name,
        failures.join("\n")
    );
}

/// Shards of a built-in, run one by one and concatenated, equal the unsharded CPU
/// reference byte for byte: what makes a resumed sharded task identical to a clean run.
#[test]
fn shards_concatenated_equal_the_whole_output() {
    let cases = vec![
        (
            "saxpy",
            params(&[("a", "1.5")]),
            vec![
                input("x", &lcg_f32s(5, 10_001)),
                input("y", &lcg_f32s(6, 10_001)),
            ],
        ),
        (
            "vector-add",
            params(&[]),
            vec![input("x", &lcg_f32s(7, 777)), input("y", &lcg_f32s(8, 777))],
        ),
        (
            "matmul",
            params(&[("m", "37"), ("n", "19"), ("k", "23")]),
            vec![
                input("a", &lcg_f32s(9, 37 * 23)),
                input("b", &lcg_f32s(10, 23 * 19)),
            ],
        ),
        (
            "mandelbrot",
            params(&[("width", "96"), ("height", "70"), ("max_iter", "300")]),
            vec![],
        ),
    ];
    for (name, p, inputs) in cases {
        let shards = 7;
        let mut whole = Vec::new();
        for i in 0..shards {
            let (plan, bytes) =
                mesh_core::builtin::plan_shard(name, &p, &inputs, shards, i).expect("shard plan");
            let mut out = executor()
                .run(&plan, &bytes)
                .unwrap_or_else(|e| panic!("{name} shard {i}: {e}"));
            whole.append(&mut out[0]);
        }
        assert_same_bytes(
            &format!("{name} in {shards} shards"),
            &whole,
            &cpu_reference(name, &p, &inputs),
        );
    }
}
