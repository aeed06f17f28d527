//! GPU kernel throughput of the built-in kernels, measured three ways to show what
//! Mesh's execution path costs on top of the GPU work itself:
//!
//! 1. **bare wgpu**: the kernel plan's WGSL, bindings and workgroups dispatched with
//!    wgpu directly in this process. The device and the pipeline are made once; every
//!    run creates its buffers, uploads the inputs, dispatches, copies the output to a
//!    staging buffer, maps and reads it: the least any executor has to do.
//! 2. **executor**: [`Executor::run`] in this process (on every run it also checks the
//!    plan against the adapter's limits, compiles the pipeline and wraps each stage in
//!    error scopes).
//! 3. **worker**: a [`Supervisor`] running the job in a `mesh-node gpu-worker` child
//!    process, as a node does: the daemon copies the inputs straight into the worker's
//!    mapped staging buffer and the outputs straight out of its mapped read-back
//!    buffer (`process_vm_writev`/`readv`,
//!    `mesh_node::gpu::direct`) for jobs of a megabyte or more (matmul's 0.8 MB, like
//!    any smaller job, crosses the pipe).
//! 4. **worker, pipe**: the same, on the route a node falls back to where the kernel
//!    refuses those copies: inputs and outputs through the pipe (a supervisor whose
//!    worker gives unreachable addresses, `MESH_GPU_WORKER_UNREACHABLE=inputs`, so that
//!    its warm-up falls back for good).
//!
//! Each path gets one warm-up run, then `MESH_BENCH_GPU_RUNS` timed runs (wall clock
//! per run), interleaved: each round runs every path once. The first table gives each
//! path's median (min-max) ms, the bare path's effective bandwidth, (input + output
//! bytes) / median, and the overhead of paths 2-4 over path 1; the target is Mesh's
//! path within 10 % of bare wgpu, checked for the executor and for the worker. The
//! second table explains the difference: what creating the pipeline costs alone and
//! within a run (the bare path making a new pipeline every run, as the executor does;
//! some drivers, llvmpipe among them, compile at the first dispatch), and sets the
//! kernel alone (resident buffers, no upload or read-back) against the adapter's
//! memory bandwidth, which wgpu does not report: a copy kernel's (and
//! `copy_buffer_to_buffer`'s, a copy engine on discrete GPUs). Both are timed as many
//! times over in one submission as fill about 20 ms and given per operation, so that
//! on a fast GPU the submission's own cost does not hide the work. The third sets the
//! worker path's extra time against what moving each kernel's bytes (inputs and
//! outputs) costs on this machine without any GPU work: by the direct route (`direct::write_to` of the
//! bytes into memory of this process, the same system call), through a pipe (a
//! widened pipe between two threads, the bytes lent to it as the daemon and the worker
//! lend them, `wire::splice_all`, and read a chunk at a time as the worker reads them),
//! and by one `memcpy` (what a single process pays).
//!
//! Every path's output must equal the CPU reference bit for bit (the built-ins
//! compute the same bytes on every adapter, `mesh_core::builtin`); a mismatch panics.
//! Without a usable adapter the bench exits 1: it never passes silently.
//!
//! Run: `cargo bench -p mesh-node --bench gpu`. Settings (environment):
//! - `MESH_BENCH_GPU_ELEMENTS`: f32 elements per input of the vector kernels (default
//!   2097152, the most a two-input task may carry; larger values are lowered to fit);
//! - `MESH_BENCH_GPU_RUNS`: timed runs per path (default 5);
//! - `MESH_BENCH_GPU_MATMUL`: the side of the square matmul (default 256).
//!
//! The worker column needs `target/<profile>/mesh-node`, which cargo builds with the
//! bench. Without cargo bench's `--bench` argument (`cargo test --benches`) the bench
//! runs once on tiny sizes, as a smoke test.

use mesh_core::builtin::{cpu_reference, f32_bytes, f32s};
use mesh_core::kernel::{self, BindingPlan, Dispatch, KernelPlan};
use mesh_core::limits::{MAX_TASK_INPUT_BYTES, MAX_TASK_OUTPUT_BYTES};
use mesh_core::task::{KernelSpec, NamedBytes, OutputDecl};
use mesh_core::{AdapterInfo, Bytes};
use mesh_node::gpu::direct::{self, Region};
use mesh_node::gpu::{Executor, Pipelines, Supervisor, WorkerCommand, DIRECT_MIN_BYTES};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wgpu::util::DeviceExt as _;

/// f32 elements per input of the vector kernels unless `MESH_BENCH_GPU_ELEMENTS`.
const DEFAULT_ELEMENTS: u64 = 1 << 21;
/// Timed runs per path unless `MESH_BENCH_GPU_RUNS`.
const DEFAULT_RUNS: u64 = 5;
/// Side of the square matmul unless `MESH_BENCH_GPU_MATMUL`.
const DEFAULT_MATMUL_SIDE: u64 = 256;
/// Sizes of the smoke run (no `--bench` argument).
const SMOKE: Settings = Settings {
    elements: 4096,
    runs: 1,
    matmul_side: 32,
    smoke: true,
};
/// Bytes copied to measure the adapter's memory bandwidth.
const COPY_BYTES: u64 = 64 << 20;
/// What one timed submission of [`measure_repeated`] aims to last.
const REPEATED_SPAN: Duration = Duration::from_millis(20);
/// Most operations in one submission of [`measure_repeated`].
const MAX_REPEATS: u32 = 256;
/// Bound on one worker job; lavapipe on two cores is slow, but not this slow.
const WORKER_TIMEOUT: Duration = Duration::from_secs(300);
/// The executor's overhead over bare wgpu that the issue aims for, percent.
const TARGET_OVERHEAD_PCT: f64 = 10.0;

fn main() {
    let settings = Settings::from_env();
    let executor = match Executor::open_best() {
        Ok(executor) => executor,
        Err(e) => {
            eprintln!("error: the GPU bench needs a wgpu adapter and found none usable: {e}");
            std::process::exit(1);
        }
    };
    let info = executor.info().clone();
    let bare = Bare::open(&info);
    let workers = Worker::start(None).map(|direct| {
        let pipe = Worker::start(Some("inputs")).expect("the same binary starts twice");
        [direct, pipe]
    });
    print_header(&info, &settings);
    let copy = bare.copy_bandwidth(settings.runs);
    let rows: Vec<Row> = cases(&settings)
        .iter()
        .map(|case| bench_case(case, settings.runs, &bare, &executor, workers.as_ref()))
        .collect();
    print_throughput(&rows);
    print_breakdown(&rows, &copy);
    if let Some([direct, pipe]) = workers {
        // Smaller jobs take the pipe on either route (the smoke run's are all small).
        let large = rows.iter().any(|r| r.bytes >= DIRECT_MIN_BYTES);
        assert!(
            !large || !pipe.supervisor.copies_directly(),
            "the pipe column took the pipe"
        );
        match direct.supervisor.direct_refusal() {
            None if large => {
                println!("the worker column took the direct route, the pipe column the pipe\n")
            }
            None => println!("every job was under the direct route's floor: both took the pipe\n"),
            Some(why) => println!(
                "the kernel refused the worker column's direct copies on this machine ({why}): \
                 both worker columns took the pipe\n"
            ),
        }
        print_transfer_floor(&rows, settings.runs);
        direct.stop();
        pipe.stop();
    }
}

/// What to run, from the environment.
struct Settings {
    elements: u64,
    runs: usize,
    matmul_side: u64,
    smoke: bool,
}

impl Settings {
    fn from_env() -> Settings {
        if !std::env::args().any(|a| a == "--bench") {
            return SMOKE;
        }
        Settings {
            elements: env_or("MESH_BENCH_GPU_ELEMENTS", DEFAULT_ELEMENTS),
            runs: env_or("MESH_BENCH_GPU_RUNS", DEFAULT_RUNS) as usize,
            matmul_side: env_or("MESH_BENCH_GPU_MATMUL", DEFAULT_MATMUL_SIDE),
            smoke: false,
        }
    }
}

/// A positive whole number from the environment, or `default` when unset.
fn env_or(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or_else(|| panic!("{name}={v}: expected a positive whole number")),
    }
}

/// One built-in kernel with its inputs, plan and expected output.
struct Case {
    name: &'static str,
    /// The "elements" column.
    size: String,
    inputs: Vec<NamedBytes>,
    plan: KernelPlan,
    /// The CPU reference output.
    reference: Vec<u8>,
    /// Input plus output bytes of one run.
    bytes: u64,
}

impl Case {
    fn new(
        name: &'static str,
        size: String,
        params: &[(&str, String)],
        inputs: Vec<NamedBytes>,
    ) -> Case {
        let params: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let spec = KernelSpec::Builtin {
            name: name.into(),
            params: params.clone(),
        };
        let plan = kernel::plan(&spec, &inputs, &[])
            .unwrap_or_else(|e| panic!("{name} ({size}) does not plan: {e}"));
        let reference = cpu_reference(name, &params, &inputs);
        let bytes = inputs.iter().map(|i| i.data.len() as u64).sum::<u64>()
            + plan.outputs.iter().map(|o| o.size).sum::<u64>();
        Case {
            name,
            size,
            inputs,
            plan,
            reference,
            bytes,
        }
    }

    /// The input bytes in the plan's input order.
    fn input_bytes(&self) -> Vec<Bytes> {
        self.inputs.iter().map(|i| i.data.clone()).collect()
    }

    /// A path's output must be exactly the CPU reference's bytes.
    fn check(&self, path: &str, outputs: &[Vec<u8>]) {
        let want = &self.reference;
        let got = one_output(self.name, path, outputs);
        if got == want {
            return;
        }
        let (got, want) = (f32s(got), f32s(want));
        match got
            .iter()
            .zip(&want)
            .position(|(g, w)| g.to_bits() != w.to_bits())
        {
            Some(i) => panic!(
                "{} via {path}: output differs at element {i}: got {}, expected {}",
                self.name, got[i], want[i]
            ),
            None => panic!(
                "{} via {path}: {} output elements, expected {}",
                self.name,
                got.len(),
                want.len()
            ),
        }
    }
}

/// The single output of a built-in kernel.
fn one_output<'a>(name: &str, path: &str, outputs: &'a [Vec<u8>]) -> &'a [u8] {
    match outputs {
        [one] => one,
        _ => panic!("{name} via {path}: {} outputs, expected 1", outputs.len()),
    }
}

/// The benchmarked kernels at the configured sizes.
fn cases(settings: &Settings) -> Vec<Case> {
    let pair = task_elements(settings.elements, 2);
    let single = task_elements(settings.elements, 1);
    let side = settings.matmul_side;
    let square = (side * side) as usize;
    vec![
        Case::new(
            "saxpy",
            pair.to_string(),
            &[("a", "1.5".into())],
            vec![input("x", 1, pair as usize), input("y", 2, pair as usize)],
        ),
        Case::new(
            "vector-add",
            pair.to_string(),
            &[],
            vec![input("x", 3, pair as usize), input("y", 4, pair as usize)],
        ),
        Case::new(
            "reduce-sum",
            single.to_string(),
            &[],
            vec![input("x", 5, single as usize)],
        ),
        Case::new(
            "matmul",
            format!("{side}x{side}x{side}"),
            &[
                ("m", side.to_string()),
                ("n", side.to_string()),
                ("k", side.to_string()),
            ],
            vec![input("a", 6, square), input("b", 7, square)],
        ),
    ]
}

/// `requested` f32 elements per input, lowered (with a note) to what one task may
/// carry with `buffers` such inputs and an output of that length.
fn task_elements(requested: u64, buffers: u64) -> u64 {
    let most = (MAX_TASK_INPUT_BYTES / 4 / buffers).min(MAX_TASK_OUTPUT_BYTES / 4);
    if requested > most {
        eprintln!(
            "note: {requested} elements x {buffers} input(s) is over a task's {MAX_TASK_INPUT_BYTES}-byte input limit; using {most}"
        );
    }
    requested.min(most)
}

/// A named input of `n` deterministic pseudo-random f32s in [-1, 1) (Knuth's MMIX
/// LCG, top 24 bits).
fn input(name: &str, seed: u64, n: usize) -> NamedBytes {
    let mut state = seed;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    NamedBytes {
        name: name.into(),
        data: Bytes::from(f32_bytes(&values)),
    }
}

/// Wall time of the timed runs, milliseconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

impl Stats {
    /// Median (min-max) ms with four decimals, for times of microseconds.
    fn fine(&self) -> String {
        format!("{:.4} ({:.4}-{:.4})", self.median, self.min, self.max)
    }

    fn of(mut times: Vec<Duration>) -> Stats {
        assert!(!times.is_empty(), "at least one timed run");
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mid = times.len() / 2;
        let median = if times.len() % 2 == 1 {
            ms(times[mid])
        } else {
            (ms(times[mid - 1]) + ms(times[mid])) / 2.0
        };
        Stats {
            min: ms(times[0]),
            median,
            max: ms(times[times.len() - 1]),
        }
    }

    /// `bytes` per median run, in GB/s.
    fn gb_per_s(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.median / 1e3) / 1e9
    }

    /// How much slower than `base` this is, percent of `base`'s median.
    fn overhead_pct(&self, base: &Stats) -> f64 {
        (self.median / base.median - 1.0) * 100.0
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} ({:.2}-{:.2})", self.median, self.min, self.max)
    }
}

/// One warm-up run, then `runs` timed ones; returns their times and the last output.
fn measure<T>(runs: usize, mut run: impl FnMut() -> T) -> (Stats, T) {
    let mut last = run();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let output = run();
        times.push(started.elapsed());
        last = output;
    }
    (Stats::of(times), last)
}

/// Time one GPU operation that `run(times)` submits `times` times in one submission:
/// as many as fill about [`REPEATED_SPAN`] (at most [`MAX_REPEATS`]), so that on a fast
/// GPU the submission's fixed cost (tens of microseconds) does not hide the operation.
/// The stats are per operation (each run's time / `times`).
fn measure_repeated(runs: usize, mut run: impl FnMut(u32)) -> Stats {
    let started = Instant::now();
    run(1);
    let one = started.elapsed().max(Duration::from_micros(1));
    let times = (REPEATED_SPAN.as_secs_f64() / one.as_secs_f64()).ceil() as u32;
    let times = times.clamp(1, MAX_REPEATS);
    let samples = (0..runs)
        .map(|_| {
            let started = Instant::now();
            run(times);
            started.elapsed() / times
        })
        .collect();
    Stats::of(samples)
}

/// One full run of a kernel by one path, returning its outputs.
type PathRun<'a> = &'a mut dyn FnMut() -> PathOutputs;

/// A path's outputs as the path produced them: turned into `Vec`s to be checked only
/// after the run is timed, so that no path pays for a copy it would not make.
enum PathOutputs {
    /// The executor's and bare wgpu's.
    Vecs(Vec<Vec<u8>>),
    /// The worker process's, which the node keeps as they arrive.
    Shared(Vec<Bytes>),
}

impl PathOutputs {
    fn into_vecs(self) -> Vec<Vec<u8>> {
        match self {
            PathOutputs::Vecs(v) => v,
            PathOutputs::Shared(b) => b.iter().map(|b| b.to_vec()).collect(),
        }
    }
}

/// One warm-up run of each path, then `runs` rounds that run every path once in turn,
/// so that a change in the machine's speed (lavapipe's timings drift and jump) hits
/// every path alike. Returns each path's times and last output.
fn measure_paths(runs: usize, paths: &mut [PathRun<'_>]) -> Vec<(Stats, Vec<Vec<u8>>)> {
    let mut last: Vec<Vec<Vec<u8>>> = paths.iter_mut().map(|run| run().into_vecs()).collect();
    let mut times = vec![Vec::with_capacity(runs); paths.len()];
    for _ in 0..runs {
        for (i, run) in paths.iter_mut().enumerate() {
            let started = Instant::now();
            let output = run();
            times[i].push(started.elapsed());
            last[i] = output.into_vecs();
        }
    }
    times.into_iter().map(Stats::of).zip(last).collect()
}

/// The least a dispatch needs: a wgpu device of its own on the executor's adapter.
struct Bare {
    // Field order is drop order: the device goes before its adapter and instance.
    device: wgpu::Device,
    queue: wgpu::Queue,
    _adapter: wgpu::Adapter,
    _instance: wgpu::Instance,
}

/// The result of a buffer-to-buffer copy measurement.
struct CopyBandwidth {
    bytes: u64,
    /// A compute kernel copying `src` to `dst` (what kernels can stream).
    kernel: Stats,
    /// `copy_buffer_to_buffer` (a copy engine on discrete GPUs, slower than the SMs).
    transfer: Stats,
}

/// The copy kernel of [`Bare::copy_bandwidth`]: 16 bytes per invocation, 2-D grid.
const COPY_WGSL: &str = r#"
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * 256u + lid;
    if (i < arrayLength(&dst)) { dst[i] = src[i]; }
}
"#;

impl Bare {
    /// Open the adapter the executor opened (same name and backend), with its limits.
    fn open(info: &AdapterInfo) -> Bare {
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
        descriptor.backends = wgpu::Backends::PRIMARY;
        let instance = wgpu::Instance::new(descriptor.with_env());
        let adapter = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
            .into_iter()
            .find(|a| {
                let i = a.get_info();
                i.name == info.name && i.backend.to_str() == info.backend
            })
            .unwrap_or_else(|| panic!("wgpu does not list the executor's adapter {}", info.name));
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("bench bare wgpu"),
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .unwrap_or_else(|e| panic!("cannot open a device on {}: {e}", info.name));
        Bare {
            device,
            queue,
            _adapter: adapter,
            _instance: instance,
        }
    }

    /// Shader module, bind group layout and a pipeline per step, by the same wgpu
    /// calls as the executor's (without its error scopes and cache).
    fn compile(&self, plan: &KernelPlan) -> Pipelines {
        Pipelines::build(&self.device, plan, "bench kernel")
    }

    /// One buffer per binding, inputs and uniforms uploaded, and their bind group.
    fn bind(
        &self,
        plan: &KernelPlan,
        pipeline: &Pipelines,
        inputs: &[Bytes],
    ) -> (Vec<wgpu::Buffer>, wgpu::BindGroup) {
        let buffers: Vec<wgpu::Buffer> = plan
            .bindings
            .iter()
            .map(|b| match b {
                BindingPlan::Input(i) => self.upload(&inputs[*i], wgpu::BufferUsages::STORAGE),
                BindingPlan::Uniform(bytes) => self.upload(bytes, wgpu::BufferUsages::UNIFORM),
                BindingPlan::Output(o) => self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench output"),
                    size: plan.outputs[*o].size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                }),
                BindingPlan::Scratch(bytes) => self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench scratch"),
                    size: *bytes,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                }),
            })
            .collect();
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("bench kernel"),
            layout: &pipeline.layout,
            entries: &entries,
        });
        (buffers, group)
    }

    fn upload(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("bench input"),
                contents: bytes,
                usage,
            })
    }

    /// A command encoder with the plan's dispatch recorded `times` times in one pass.
    fn encode_dispatch(
        &self,
        plan: &KernelPlan,
        pipeline: &Pipelines,
        group: &wgpu::BindGroup,
        times: u32,
    ) -> wgpu::CommandEncoder {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bench kernel"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench kernel"),
                timestamp_writes: None,
            });
            for _ in 0..times {
                pipeline.dispatch(plan, &mut pass, group);
            }
        }
        encoder
    }

    /// One full run: buffers, upload, dispatch, copy back, map, read.
    fn run(&self, plan: &KernelPlan, pipeline: &Pipelines, inputs: &[Bytes]) -> Vec<Vec<u8>> {
        let (buffers, group) = self.bind(plan, pipeline, inputs);
        let mut encoder = self.encode_dispatch(plan, pipeline, &group, 1);
        let mut staged: Vec<(usize, wgpu::Buffer)> = plan
            .bindings
            .iter()
            .zip(&buffers)
            .filter_map(|(b, buffer)| match b {
                BindingPlan::Output(o) => Some((*o, buffer)),
                _ => None,
            })
            .map(|(o, buffer)| {
                let size = plan.outputs[o].size;
                let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench readback"),
                    size,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
                (o, staging)
            })
            .collect();
        staged.sort_by_key(|(o, _)| *o);
        let submission = self.queue.submit(Some(encoder.finish()));
        self.read_back(&staged, submission)
    }

    /// Map the staging buffers once `submission` is done and copy them out.
    fn read_back(
        &self,
        staged: &[(usize, wgpu::Buffer)],
        submission: wgpu::SubmissionIndex,
    ) -> Vec<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        for (_, staging) in staged {
            let tx = tx.clone();
            staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                let _ = tx.send(r);
            });
        }
        self.wait(submission);
        for _ in staged {
            rx.recv()
                .expect("map callback")
                .unwrap_or_else(|e| panic!("mapping an output: {e}"));
        }
        staged
            .iter()
            .map(|(_, staging)| {
                let out = staging
                    .slice(..)
                    .get_mapped_range()
                    .unwrap_or_else(|e| panic!("reading an output: {e}"))
                    .to_vec();
                staging.unmap();
                out
            })
            .collect()
    }

    fn wait(&self, submission: wgpu::SubmissionIndex) {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: None,
            })
            .unwrap_or_else(|e| panic!("waiting for the GPU: {e}"));
    }

    /// The dispatch alone, on buffers uploaded once and never read back.
    fn kernel_only(
        &self,
        plan: &KernelPlan,
        pipeline: &Pipelines,
        inputs: &[Bytes],
        runs: usize,
    ) -> Stats {
        let (_buffers, group) = self.bind(plan, pipeline, inputs);
        measure_repeated(runs, |times| {
            let encoder = self.encode_dispatch(plan, pipeline, &group, times);
            self.wait(self.queue.submit(Some(encoder.finish())));
        })
    }

    /// Copy a large resident buffer to another: the adapter's memory bandwidth.
    fn copy_bandwidth(&self, runs: usize) -> CopyBandwidth {
        let bytes = COPY_BYTES.min(self.device.limits().max_buffer_size) / 4 * 4;
        let buffer = |usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("bench copy"),
                size: bytes,
                usage,
                mapped_at_creation: false,
            })
        };
        let src = buffer(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC);
        let dst = buffer(wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST);
        let transfer = measure_repeated(runs, |times| {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("bench copy"),
                });
            for _ in 0..times {
                encoder.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
            }
            self.wait(self.queue.submit(Some(encoder.finish())));
        });
        let groups = (bytes / 16).div_ceil(256);
        let x = groups.min(u64::from(kernel::MAX_WORKGROUPS_PER_DIMENSION));
        let plan = KernelPlan {
            source: COPY_WGSL.into(),
            steps: vec![Dispatch::new(
                "main",
                [x as u32, groups.div_ceil(x) as u32, 1],
            )],
            bindings: vec![BindingPlan::Input(0), BindingPlan::Output(0)],
            outputs: vec![OutputDecl {
                name: "dst".into(),
                size: bytes,
            }],
        };
        let pipeline = self.compile(&plan);
        let kernel = self.kernel_only(
            &plan,
            &pipeline,
            &[Bytes::from(vec![0u8; bytes as usize])],
            runs,
        );
        CopyBandwidth {
            bytes,
            kernel,
            transfer,
        }
    }
}

/// A one-slot supervisor with a `mesh-node gpu-worker` process, and its runtime.
struct Worker {
    runtime: tokio::runtime::Runtime,
    supervisor: Supervisor,
}

impl Worker {
    /// `None`, with a note, when the `mesh-node` binary is missing. `unreachable`: the
    /// worker's `direct::UNREACHABLE_ENV` hook, for the pipe route.
    fn start(unreachable: Option<&str>) -> Option<Worker> {
        let Some(program) = worker_program() else {
            eprintln!(
                "note: no mesh-node binary beside this bench; the worker column is n/a. \
                 Run `cargo build --release -p mesh-node` first."
            );
            return None;
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut command = WorkerCommand::new(&program);
        if let Some(side) = unreachable {
            command = command.env(direct::UNREACHABLE_ENV, side);
        }
        let supervisor = runtime
            .block_on(Supervisor::start(command, 1))
            .unwrap_or_else(|e| panic!("the GPU worker {} did not start: {e}", program.display()));
        Some(Worker {
            runtime,
            supervisor,
        })
    }

    fn run(&self, plan: &KernelPlan, inputs: Vec<Bytes>) -> Vec<Bytes> {
        self.runtime
            .block_on(self.supervisor.run(
                plan.clone(),
                inputs,
                WORKER_TIMEOUT,
                CancellationToken::new(),
            ))
            .unwrap_or_else(|e| panic!("the GPU worker failed: {e}"))
    }

    fn stop(self) {
        self.runtime.block_on(self.supervisor.shutdown());
    }
}

/// The `mesh-node` binary cargo built with this bench, else the one in the bench's
/// target directory (`target/<profile>/deps/gpu-*` -> `target/<profile>/mesh-node`).
fn worker_program() -> Option<PathBuf> {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mesh-node"));
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("mesh-node")));
    [Some(built), beside]
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
}

/// One kernel's measurements.
struct Row {
    name: &'static str,
    size: String,
    bytes: u64,
    bare: Stats,
    /// The bare path with a new pipeline every run, as the executor makes.
    fresh: Stats,
    executor: Stats,
    worker: Option<Stats>,
    /// The worker on the pipe route.
    worker_pipe: Option<Stats>,
    compile: Stats,
    kernel: Stats,
}

/// Run one kernel on every path, checking every path's output.
fn bench_case(
    case: &Case,
    runs: usize,
    bare: &Bare,
    executor: &Executor,
    workers: Option<&[Worker; 2]>,
) -> Row {
    eprintln!("{} ({}): {runs} rounds", case.name, case.size);
    let inputs = &case.input_bytes();
    let (compile, pipeline) = measure(runs, || bare.compile(&case.plan));
    let kernel = bare.kernel_only(&case.plan, &pipeline, inputs, runs);

    let mut bare_run = || PathOutputs::Vecs(bare.run(&case.plan, &pipeline, inputs));
    let mut fresh_run =
        || PathOutputs::Vecs(bare.run(&case.plan, &bare.compile(&case.plan), inputs));
    let mut executor_run = || {
        PathOutputs::Vecs(
            executor
                .run(&case.plan, inputs)
                .unwrap_or_else(|e| panic!("{} via the executor: {e}", case.name)),
        )
    };
    let mut paths: Vec<PathRun<'_>> = vec![&mut bare_run, &mut fresh_run, &mut executor_run];
    // The worker on the direct route, then on the pipe.
    let mut worker_runs: Vec<_> = workers
        .into_iter()
        .flatten()
        .map(|w| move || PathOutputs::Shared(w.run(&case.plan, inputs.clone())))
        .collect();
    for run in worker_runs.iter_mut() {
        paths.push(run);
    }
    let mut measured = measure_paths(runs, &mut paths).into_iter();

    let (bare_stats, bare_out) = measured.next().expect("the bare path ran");
    case.check("bare wgpu", &bare_out);
    let (fresh, out) = measured
        .next()
        .expect("the bare path with new pipelines ran");
    case.check("bare wgpu, new pipeline", &out);
    let (executor_stats, out) = measured.next().expect("the executor ran");
    case.check("executor", &out);
    let worker = measured.next().map(|(stats, out)| {
        case.check("worker", &out);
        stats
    });
    let worker_pipe = measured.next().map(|(stats, out)| {
        case.check("worker, pipe route", &out);
        stats
    });
    Row {
        name: case.name,
        size: case.size.clone(),
        bytes: case.bytes,
        bare: bare_stats,
        fresh,
        executor: executor_stats,
        worker,
        worker_pipe,
        compile,
        kernel,
    }
}

fn print_header(info: &AdapterInfo, settings: &Settings) {
    println!("# GPU kernel throughput (mesh-node/benches/gpu.rs)\n");
    println!(
        "adapter: {} | backend: {} | type: {} | driver: {}",
        info.name, info.backend, info.device_type, info.driver
    );
    println!(
        "runs: {} rounds (each path in turn) after 1 warm-up each; times are wall ms per run, median (min-max){}\n",
        settings.runs,
        if settings.smoke {
            "; SMOKE RUN (no --bench argument): tiny sizes, numbers mean nothing"
        } else {
            ""
        }
    );
}

/// One path's times in a row, where it ran.
type PathStats = fn(&Row) -> Option<&Stats>;

fn print_throughput(rows: &[Row]) {
    println!("| kernel | elements | bare wgpu ms | executor ms | worker ms | worker, pipe ms | GB/s bare | overhead executor % | overhead worker % | overhead worker, pipe % |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let against = |stats: &Option<Stats>, bare: &Stats| match stats {
        Some(s) => (s.to_string(), format!("{:+.1}", s.overhead_pct(bare))),
        None => ("n/a".into(), "n/a".into()),
    };
    for r in rows {
        let (worker_ms, worker_pct) = against(&r.worker, &r.bare);
        let (pipe_ms, pipe_pct) = against(&r.worker_pipe, &r.bare);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:+.1} | {} | {} |",
            r.name,
            r.size,
            r.bare,
            r.executor,
            worker_ms,
            pipe_ms,
            r.bare.gb_per_s(r.bytes),
            r.executor.overhead_pct(&r.bare),
            worker_pct,
            pipe_pct
        );
    }
    println!();
    let paths: [(&str, PathStats); 2] = [
        ("executor (in this process)", |r| Some(&r.executor)),
        ("worker (a node's path)", |r| r.worker.as_ref()),
    ];
    for (path, stats) in paths {
        if rows.iter().all(|r| stats(r).is_none()) {
            continue;
        }
        let over: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                let pct = stats(r)?.overhead_pct(&r.bare);
                (pct > TARGET_OVERHEAD_PCT).then(|| format!("{} {pct:+.1}%", r.name))
            })
            .collect();
        if over.is_empty() {
            println!(
                "target met: {path} within {TARGET_OVERHEAD_PCT}% of bare wgpu for every kernel"
            );
        } else {
            println!(
                "target NOT met: {path} over {TARGET_OVERHEAD_PCT}% of bare wgpu for {}",
                over.join(", ")
            );
        }
    }
    println!();
}

/// Move `bytes` through a widened pipe from one thread to another, lent as the daemon
/// and the worker lend them (`wire::splice_all`) and read as the worker reads an input
/// (`wire::read_input`, a `wire::READ_CHUNK` at a time, each chunk copied on): the
/// least the worker path's two pipe crossings can cost, without a GPU.
fn pipe_crossing(bytes: usize, runs: usize) -> Stats {
    use mesh_node::gpu::wire;
    let data = vec![7u8; bytes];
    let mut dest = vec![0u8; bytes];
    let mut chunk = vec![0u8; wire::READ_CHUNK];
    let (stats, ()) = measure(runs, || {
        let (mut reader, mut writer) = std::io::pipe().expect("a pipe");
        wire::widen_pipe(&writer);
        std::thread::scope(|scope| {
            scope.spawn(|| wire::splice_all(&mut writer, &data).expect("pipe write"));
            wire::read_input(&mut reader, bytes, &mut chunk, |at, piece| {
                dest[at..at + piece.len()].copy_from_slice(piece)
            })
            .expect("pipe read");
        });
    });
    assert!(dest.iter().all(|&b| b == 7), "the bytes crossed intact");
    stats
}

/// One `memcpy` of `bytes` between resident buffers.
fn memcpy(bytes: usize, runs: usize) -> Stats {
    let data = vec![7u8; bytes];
    let mut dest = vec![0u8; bytes];
    let (stats, ()) = measure(runs, || {
        dest.copy_from_slice(&data);
        std::hint::black_box(&dest);
    });
    stats
}

fn print_transfer_floor(rows: &[Row], runs: usize) {
    println!("\n| kernel | bytes in + out | worker - bare ms | worker, pipe - bare ms | direct copy ms | pipe crossing ms | memcpy ms |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let (Some(worker), Some(pipe)) = (&r.worker, &r.worker_pipe) else {
            continue;
        };
        println!(
            "| {} | {} | {:.2} | {:.2} | {} | {} | {} |",
            r.name,
            r.bytes,
            worker.median - r.bare.median,
            pipe.median - r.bare.median,
            direct_copy(r.bytes as usize, runs),
            pipe_crossing(r.bytes as usize, runs),
            memcpy(r.bytes as usize, runs)
        );
    }
}

/// Copy `bytes` with `direct::write_to` (`process_vm_writev`), the call the daemon
/// makes into its worker, here into resident memory of this same process.
fn direct_copy(bytes: usize, runs: usize) -> Stats {
    let data = [Bytes::from(vec![7u8; bytes])];
    let mut dest = vec![0u8; bytes];
    dest.fill(1); // resident: the floor leaves page faults out
                  // A mutable pointer: the call writes through it.
    let at = [Region::of(dest.as_mut_ptr(), bytes)];
    let me = std::process::id();
    let (stats, ()) = measure(runs, || {
        direct::write_to(me, &data, &at).expect("process_vm_writev into this process")
    });
    assert!(dest.iter().all(|&b| b == 7), "the bytes arrived intact");
    stats
}

fn print_breakdown(rows: &[Row], copy: &CopyBandwidth) {
    let copy_gbs = copy.kernel.gb_per_s(2 * copy.bytes);
    println!(
        "adapter memory bandwidth: {copy_gbs:.2} GB/s (a copy kernel over {} MiB, read + write, {} ms); \
         copy_buffer_to_buffer {:.2} GB/s ({} ms)\n",
        copy.bytes >> 20,
        copy.kernel,
        copy.transfer.gb_per_s(2 * copy.bytes),
        copy.transfer,
    );
    println!("| kernel | pipeline create ms | bare, new pipeline per run ms | overhead new pipeline % | kernel only ms | GB/s kernel only | % of copy bandwidth |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let gbs = r.kernel.gb_per_s(r.bytes);
        println!(
            "| {} | {} | {} | {:+.1} | {} | {:.2} | {:.0} |",
            r.name,
            r.compile,
            r.fresh,
            r.fresh.overhead_pct(&r.bare),
            r.kernel.fine(),
            gbs,
            gbs / copy_gbs * 100.0
        );
    }
}
