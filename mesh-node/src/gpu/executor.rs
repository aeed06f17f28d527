//! The executor: one wgpu device on the best adapter, running kernel plans to output
//! bytes with every wgpu error turned into a [`GpuError`] instead of a panic.

use super::error::{panic_message, GpuError};
use super::pipeline::{PipelineKey, Pipelines};
use super::probe;
use super::staging::{Mapped, Packing, Shelf};
use mesh_core::capability::AdapterInfo;
use mesh_core::kernel::{BindingPlan, KernelPlan};
use mesh_core::Bytes;
use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use wgpu::util::DeviceExt as _;

/// Storage buffers must be a non-zero multiple of this many bytes.
const STORAGE_ALIGNMENT: u64 = 4;
/// Uniform buffers are padded to this many bytes: WGSL uniform structs have 16-byte
/// alignment, so their size is a multiple of 16 and a shorter buffer fails binding.
const UNIFORM_ALIGNMENT: u64 = 16;

/// Pipelines kept per executor (the cache is emptied when full: user WGSL kernels
/// are many and distinct, the built-ins few and hot).
const PIPELINE_CACHE_ENTRIES: usize = 64;

/// How long to wait for map callbacks once our submission is done. They normally
/// fire inside our own poll; a concurrent run's poll on another thread may have taken
/// them and fire them moments later, so allow a generous margin before giving up.
const MAP_CALLBACK_GRACE: Duration = Duration::from_secs(10);

/// How often a mapping that waits for its callback polls the device again: short,
/// since the callback normally comes with the first poll.
const MAP_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The buffers of a checked plan.
#[derive(Debug)]
struct BufferLayout {
    /// Size of each binding, in binding order.
    sizes: Vec<BindingSize>,
    /// The binding of each input, in input order.
    input_bindings: Vec<usize>,
    /// The binding of each output, in `plan.outputs` order.
    output_bindings: Vec<usize>,
}

/// A plan checked against the adapter, with its inputs written into a staging
/// buffer and device buffers made for them: what [`Executor::launch`] runs (its
/// first command copies the inputs into those buffers). Made by [`Executor::upload`].
#[derive(Debug)]
pub struct Uploaded {
    layout: BufferLayout,
    /// One buffer per input, in input order: what the kernel binds.
    inputs: Vec<wgpu::Buffer>,
    /// The inputs' bytes, unmapped, at `offsets` in the upload staging buffer; `None`
    /// when the plan has no inputs.
    staged: Option<(wgpu::Buffer, Packing)>,
}

/// The outputs of a finished run, still in the mapped buffer the device copied them
/// into: read them with [`Outputs::views`] where they lie, without a copy.
#[derive(Debug)]
pub struct Outputs {
    /// The read-back buffer, mapped; `None` when the plan has no outputs.
    mapped: Option<Arc<Mapped>>,
    /// Per output, in `plan.outputs` order: where it lies in the read-back buffer.
    ranges: Vec<OutputRange>,
}

/// Where one output lies in the read-back buffer.
#[derive(Debug, Clone, Copy)]
struct OutputRange {
    offset: u64,
    /// Bytes copied there: the output's buffer, padded.
    padded: u64,
    /// Bytes of the output itself.
    bytes: u64,
}

/// One output's bytes, read in place from the mapped read-back buffer.
pub struct OutputView {
    // Field order is drop order: the view goes before the buffer may be unmapped.
    view: wgpu::BufferView,
    len: usize,
    _mapped: Arc<Mapped>,
}

impl std::ops::Deref for OutputView {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // `len` <= the padded size, so this never overruns the view.
        &self.view[..self.len]
    }
}

impl AsRef<[u8]> for OutputView {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Outputs {
    /// Each output's bytes, exactly `plan.outputs[i].size` long, in order.
    pub fn views(&self) -> Result<Vec<OutputView>, GpuError> {
        let Some(mapped) = &self.mapped else {
            return Ok(Vec::new());
        };
        self.ranges
            .iter()
            .enumerate()
            .map(|(i, range)| {
                let view = mapped
                    .buffer()
                    .slice(range.offset..range.offset + range.padded)
                    .get_mapped_range()
                    .map_err(|e| GpuError::Readback(format!("output {i}: {e}")))?;
                Ok(OutputView {
                    view,
                    len: range.bytes as usize,
                    _mapped: Arc::clone(mapped),
                })
            })
            .collect()
    }
}

/// The outputs of a dispatched run, on their way into the read-back buffer.
struct Readback {
    buffer: wgpu::Buffer,
    /// Per output, in `plan.outputs` order; never empty.
    ranges: Vec<OutputRange>,
}

impl Readback {
    /// Bytes to map: up to the end of the last output.
    fn total(&self) -> u64 {
        self.ranges
            .last()
            .map_or(0, |last| last.offset + last.padded)
    }
}

/// The size of one binding's buffer.
#[derive(Debug, Clone, Copy)]
struct BindingSize {
    /// Bytes the plan asks for.
    bytes: u64,
    /// Bytes allocated: `bytes` rounded up to the alignment, never zero.
    padded: u64,
}

/// Owns a wgpu instance, adapter, device and queue for one adapter and runs
/// [`KernelPlan`]s on it. `Send + Sync`: runs from several threads may overlap.
pub struct Executor {
    // Field order is drop order: the device goes before its adapter and instance.
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    info: AdapterInfo,
    /// Set by the device-lost callback; once set, every run fails with `DeviceLost`.
    lost: Arc<Mutex<Option<String>>>,
    /// Compiled pipelines by kernel: a worker runs the same built-ins again and again,
    /// and building a pipeline costs as much as a small kernel's whole run.
    pipelines: Mutex<HashMap<PipelineKey, Pipelines>>,
    /// The staging buffers kept between runs ([`super::staging`]).
    uploads: Shelf,
    readbacks: Arc<Shelf>,
    _adapter: wgpu::Adapter,
    _instance: wgpu::Instance,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish()
    }
}

impl Executor {
    /// Open the best adapter (index 0 of [`probe`](super::probe) order), requesting
    /// the adapter's own limits (not wgpu's defaults, so large buffers work) and all
    /// its non-experimental features but `MAPPABLE_PRIMARY_BUFFERS`.
    pub fn open_best() -> Result<Executor, GpuError> {
        let instance = probe::new_instance();
        let (adapter, info) = probe::ranked_adapters(&instance)
            .into_iter()
            .next()
            .ok_or(GpuError::NoAdapter)?;
        let limits = adapter.limits();
        // Experimental features need an unsafe opt-in and are never used by tasks.
        // MAPPABLE_PRIMARY_BUFFERS only lets a buffer be mapped and bound at once, which
        // nothing here does; wgpu warns on every worker start where it is enabled on a
        // discrete GPU, since such buffers then live in host memory.
        let features = adapter.features()
            - wgpu::Features::all_experimental_mask()
            - wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        let device_for = |required_features: wgpu::Features| {
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("mesh executor"),
                required_features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            }))
        };
        let (device, queue) = match device_for(features) {
            Ok(pair) => pair,
            Err(e) => {
                // Some drivers advertise features they then fail to enable; the
                // adapter's limits matter more than its optional features.
                tracing::warn!(adapter = %info.name, error = %e, "request_device with all features failed; retrying with none");
                device_for(wgpu::Features::empty()).map_err(|e| GpuError::RequestDevice {
                    adapter: info.name.clone(),
                    reason: e.to_string(),
                })?
            }
        };

        // Publish what the device really enables, which is less than the adapter
        // offers when the retry above dropped the optional features.
        let mut info = info;
        info.features = probe::feature_names(device.features());

        // wgpu's default handler panics; errors we do not capture in a scope are logged.
        device.on_uncaptured_error(Arc::new(|error: wgpu::Error| {
            tracing::error!(%error, "uncaptured wgpu error");
        }));
        let lost = Arc::new(Mutex::new(None));
        let lost_slot = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            let what = format!("{reason:?}: {message}");
            if reason == wgpu::DeviceLostReason::Destroyed {
                tracing::debug!(reason = %what, "GPU device closed");
            } else {
                tracing::error!(reason = %what, "GPU device lost");
            }
            if let Ok(mut slot) = lost_slot.lock() {
                slot.get_or_insert(what);
            }
        });
        tracing::info!(
            adapter = %info.name, backend = %info.backend, device_type = %info.device_type, driver = %info.driver,
            max_buffer_size = limits.max_buffer_size,
            max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size,
            "GPU executor opened"
        );
        Ok(Executor {
            device,
            queue,
            limits,
            info,
            lost,
            pipelines: Mutex::default(),
            uploads: Shelf::uploads(),
            readbacks: Arc::new(Shelf::readbacks()),
            _adapter: adapter,
            _instance: instance,
        })
    }

    /// The adapter this executor runs on, with the features its device enabled
    /// (the adapter's, less wgpu's experimental ones).
    pub fn info(&self) -> &AdapterInfo {
        &self.info
    }

    /// Blocking: run one plan with the task's input bytes (indexed as in
    /// [`BindingPlan::Input`]) and return the output buffers in `plan.outputs` order,
    /// each exactly `plan.outputs[i].size` bytes.
    ///
    /// [`upload`](Self::upload) from the slices, [`launch`](Self::launch), and a copy
    /// of each output. The GPU worker uses the two steps itself, so that inputs go
    /// from the daemon straight into mapped staging memory and outputs from the mapped
    /// read-back buffer straight to the daemon.
    pub fn run(&self, plan: &KernelPlan, inputs: &[Bytes]) -> Result<Vec<Vec<u8>>, GpuError> {
        let lens: Vec<u64> = inputs.iter().map(|input| input.len() as u64).collect();
        let uploaded = self.upload(plan, &lens, |dests| {
            for (mut dest, input) in dests.into_iter().zip(inputs) {
                dest.copy_from_slice(input);
            }
            Ok::<(), GpuError>(())
        })?;
        let outputs = self.launch(plan, uploaded)?;
        let views = outputs.views()?;
        Ok(views.iter().map(|view| view.to_vec()).collect())
    }

    /// Blocking: check `plan` against inputs of `input_lens` bytes and this adapter's
    /// limits, make a device buffer per input, and let `fill(dests)` write every input
    /// straight into mapped staging memory, from where [`launch`](Self::launch) copies
    /// it into its buffer: `dests[i]` is exactly `input_lens[i]` bytes and write-only
    /// (it may be memory the CPU writes through to the device). All of them stay mapped
    /// until `fill` returns. The staging buffer is kept between runs
    /// (`staging.rs`).
    ///
    /// Nothing is allocated when the check fails. Buffers are padded to a non-zero
    /// multiple of 4 bytes; padding is zero and an empty input binds as 4 zero bytes.
    /// An error from `fill` ends the upload with that error.
    pub fn upload<E: From<GpuError>>(
        &self,
        plan: &KernelPlan,
        input_lens: &[u64],
        fill: impl FnOnce(Vec<wgpu::WriteOnly<'_, [u8]>>) -> Result<(), E>,
    ) -> Result<Uploaded, E> {
        self.check_lost()?;
        let layout = self.check(plan, input_lens)?;
        let padded: Vec<u64> = layout
            .input_bindings
            .iter()
            .map(|&binding| layout.sizes[binding].padded)
            .collect();
        let packing = Packing::of(padded.iter().copied());
        let ((inputs, staging), error) = scoped(&self.device, || {
            let inputs: Vec<wgpu::Buffer> = padded
                .iter()
                .map(|&size| {
                    self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("mesh input"),
                        size,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    })
                })
                .collect();
            // A kept buffer is mapped below; a new one is mapped as it is made.
            let staging = (packing.total > 0).then(|| {
                self.uploads
                    .take_or_create(&self.device, packing.total, true)
            });
            (inputs, staging)
        });
        if let Some(e) = error {
            return Err(self.classify(e, GpuError::Dispatch).into());
        }
        if let Some((buffer, false)) = &staging {
            self.map(
                buffer,
                packing.total,
                wgpu::MapMode::Write,
                None,
                "the inputs",
                GpuError::Dispatch,
            )?;
        }
        let mut views = match &staging {
            Some((buffer, _)) => packing
                .offsets
                .iter()
                .zip(&padded)
                .enumerate()
                .map(|(i, (&offset, &size))| {
                    buffer
                        .slice(offset..offset + size)
                        .get_mapped_range_mut()
                        .map_err(|e| GpuError::Dispatch(format!("mapping input {i}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let dests = views
            .iter_mut()
            .zip(input_lens)
            .map(|(view, &len)| {
                // `len` <= the padded size (checked above).
                let (data, mut padding) = view.slice(..).split_at(len as usize);
                padding.fill(0);
                data
            })
            .collect();
        fill(dests)?;
        drop(views);
        let staged = staging.map(|(buffer, _)| (buffer, packing));
        if let Some((buffer, _)) = &staged {
            let ((), error) = scoped(&self.device, || buffer.unmap());
            if let Some(e) = error {
                return Err(self.classify(e, GpuError::Dispatch).into());
            }
        }
        Ok(Uploaded {
            layout,
            inputs,
            staged,
        })
    }

    /// Blocking: run an [`upload`](Self::upload)ed plan (`plan` must be the one it
    /// was uploaded for) and wait for its outputs, left mapped where the device put
    /// them.
    pub fn launch(&self, plan: &KernelPlan, uploaded: Uploaded) -> Result<Outputs, GpuError> {
        debug_assert_eq!(
            uploaded.layout.sizes.len(),
            plan.bindings.len(),
            "launched with another plan than it was uploaded for"
        );
        self.check_lost()?;
        let started = Instant::now();
        let pipelines = self.compile(plan)?;
        let compiled = Instant::now();
        let (readback, submission) = self.dispatch(plan, &uploaded, &pipelines)?;
        let outputs = self.read_back(readback, submission)?;
        // The device is done with the inputs' staging buffer: keep it for the next run.
        if let Some((buffer, _)) = uploaded.staged {
            self.uploads.put(buffer);
        }
        tracing::debug!(
            steps = ?plan.steps,
            compile_ms = compiled.duration_since(started).as_secs_f64() * 1e3,
            run_ms = compiled.elapsed().as_secs_f64() * 1e3,
            "kernel ran"
        );
        Ok(outputs)
    }

    /// The pipelines for `plan`, compiled once per distinct kernel (source, entry
    /// points and binding kinds) and then taken from the cache.
    fn compile(&self, plan: &KernelPlan) -> Result<Pipelines, GpuError> {
        let key = PipelineKey::of(plan);
        if let Some(hit) = self.pipelines.lock().expect("not poisoned").get(&key) {
            return Ok(hit.clone());
        }
        let compiled = self.compile_uncached(plan)?;
        let mut cache = self.pipelines.lock().expect("not poisoned");
        if cache.len() >= PIPELINE_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, compiled.clone());
        Ok(compiled)
    }

    /// The plan's [`Pipelines`], made inside error scopes. Validation errors are
    /// `Compile`.
    fn compile_uncached(&self, plan: &KernelPlan) -> Result<Pipelines, GpuError> {
        let (compiled, error) = scoped(&self.device, || {
            Pipelines::build(&self.device, plan, "mesh kernel")
        });
        match error {
            Some(e) => Err(self.classify(e, GpuError::Compile)),
            None => Ok(compiled),
        }
    }

    /// Copy the staged inputs into their buffers, bind them with new uniform, output
    /// and scratch buffers, dispatch every step in order in one compute pass, and
    /// copy every output into the read-back staging buffer. Validation errors are
    /// `Dispatch`.
    fn dispatch(
        &self,
        plan: &KernelPlan,
        uploaded: &Uploaded,
        pipelines: &Pipelines,
    ) -> Result<(Option<Readback>, wgpu::SubmissionIndex), GpuError> {
        let layout = &uploaded.layout;
        let packing = Packing::of(
            layout
                .output_bindings
                .iter()
                .map(|&binding| layout.sizes[binding].padded),
        );
        let (dispatched, error) = scoped(&self.device, || {
            let buffers: Vec<wgpu::Buffer> = plan
                .bindings
                .iter()
                .zip(&layout.sizes)
                .enumerate()
                .map(|(i, (b, size))| match b {
                    BindingPlan::Input(idx) => uploaded.inputs[*idx].clone(),
                    BindingPlan::Uniform(bytes) => {
                        self.device
                            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                                label: Some(&format!("mesh uniform {i}")),
                                contents: &padded(bytes, size.padded),
                                usage: wgpu::BufferUsages::UNIFORM,
                            })
                    }
                    BindingPlan::Output(idx) => {
                        self.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some(&format!("mesh output {idx}")),
                            size: size.padded,
                            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                            mapped_at_creation: false,
                        })
                    }
                    BindingPlan::Scratch(_) => self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(&format!("mesh scratch {i}")),
                        size: size.padded,
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
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("mesh kernel"),
                layout: &pipelines.layout,
                entries: &entries,
            });
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("mesh kernel"),
                });
            if let Some((staging, inputs)) = &uploaded.staged {
                for (input, &offset) in uploaded.inputs.iter().zip(&inputs.offsets) {
                    encoder.copy_buffer_to_buffer(staging, offset, input, 0, input.size());
                }
            }

            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("mesh kernel"),
                    timestamp_writes: None,
                });
                pipelines.dispatch(plan, &mut pass, &bind_group);
            }
            let readback = (packing.total > 0).then(|| {
                let (buffer, _) = self
                    .readbacks
                    .take_or_create(&self.device, packing.total, false);
                let ranges = layout
                    .output_bindings
                    .iter()
                    .zip(&packing.offsets)
                    .map(|(&binding, &offset)| {
                        let size = layout.sizes[binding];
                        encoder.copy_buffer_to_buffer(
                            &buffers[binding],
                            0,
                            &buffer,
                            offset,
                            size.padded,
                        );
                        OutputRange {
                            offset,
                            padded: size.padded,
                            bytes: size.bytes,
                        }
                    })
                    .collect();
                Readback { buffer, ranges }
            });
            let submission = self.queue.submit(Some(encoder.finish()));
            (readback, submission)
        });
        match error {
            Some(e) => Err(self.classify(e, GpuError::Dispatch)),
            None => Ok(dispatched),
        }
    }

    /// Wait for `submission` and map the read-back buffer it copied the outputs into.
    fn read_back(
        &self,
        readback: Option<Readback>,
        submission: wgpu::SubmissionIndex,
    ) -> Result<Outputs, GpuError> {
        let Some(readback) = readback else {
            self.wait(submission)?;
            return Ok(Outputs {
                mapped: None,
                ranges: Vec::new(),
            });
        };
        self.map(
            &readback.buffer,
            readback.total(),
            wgpu::MapMode::Read,
            Some(submission),
            "the outputs",
            GpuError::Readback,
        )?;
        Ok(Outputs {
            mapped: Some(Arc::new(Mapped::new(
                readback.buffer,
                Arc::clone(&self.readbacks),
            ))),
            ranges: readback.ranges,
        })
    }

    /// Map the first `size` bytes of `buffer` for `mode`, once `submission` is done
    /// (`None`: a buffer no unfinished work uses). Failures are `error`s naming `what`,
    /// or `DeviceLost`.
    ///
    /// Without a submission to wait for, only non-blocking polls drive the mapping, so
    /// that a run never waits behind another run's kernel on the same device.
    fn map(
        &self,
        buffer: &wgpu::Buffer,
        size: u64,
        mode: wgpu::MapMode,
        submission: Option<wgpu::SubmissionIndex>,
        what: &str,
        error: fn(String) -> GpuError,
    ) -> Result<(), GpuError> {
        let (tx, rx) = mpsc::channel();
        let ((), scope_error) = scoped(&self.device, || {
            buffer.slice(..size).map_async(mode, move |r| {
                // A send error only means the run already failed and returned.
                let _ = tx.send(r);
            });
        });
        if let Some(e) = scope_error {
            return Err(self.classify(e, error));
        }
        if let Some(submission) = submission {
            self.wait(submission)?;
        }
        let deadline = Instant::now() + MAP_CALLBACK_GRACE;
        loop {
            // wgpu panics instead of failing on a lost device; `lost_or` polls the
            // same way and reports the loss.
            if std::panic::catch_unwind(AssertUnwindSafe(|| self.device.poll(wgpu::PollType::Poll)))
                .is_err()
            {
                return Err(self.lost_or(error(format!("mapping {what}: wgpu panicked"))));
            }
            match rx.recv_timeout(MAP_POLL_INTERVAL) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => return Err(self.lost_or(error(format!("mapping {what}: {e}")))),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(e) => {
                    return Err(self.lost_or(error(format!(
                        "{what} not mapped after the GPU finished: {e}"
                    ))))
                }
            }
        }
    }

    /// Validate the plan against the inputs and this adapter's limits before
    /// allocating anything.
    fn check(&self, plan: &KernelPlan, input_lens: &[u64]) -> Result<BufferLayout, GpuError> {
        let l = &self.limits;
        let mut sizes = Vec::with_capacity(plan.bindings.len());
        let mut input_bindings: Vec<Vec<usize>> = vec![Vec::new(); input_lens.len()];
        let mut output_bindings: Vec<Vec<usize>> = vec![Vec::new(); plan.outputs.len()];
        let (mut storage, mut uniform) = (0u32, 0u32);
        for (i, b) in plan.bindings.iter().enumerate() {
            let binding = i as u32;
            let (bytes, alignment, binding_limit, binding_limit_name) = match b {
                BindingPlan::Input(idx) => {
                    let len = *input_lens.get(*idx).ok_or_else(|| {
                        GpuError::InvalidPlan(format!(
                            "binding {binding} reads input {idx}, but the task has {} input(s)",
                            input_lens.len()
                        ))
                    })?;
                    input_bindings[*idx].push(i);
                    storage += 1;
                    (
                        len,
                        STORAGE_ALIGNMENT,
                        l.max_storage_buffer_binding_size,
                        "max_storage_buffer_binding_size",
                    )
                }
                BindingPlan::Uniform(bytes) => {
                    uniform += 1;
                    (
                        bytes.len() as u64,
                        UNIFORM_ALIGNMENT,
                        l.max_uniform_buffer_binding_size,
                        "max_uniform_buffer_binding_size",
                    )
                }
                BindingPlan::Scratch(bytes) => {
                    storage += 1;
                    (
                        *bytes,
                        STORAGE_ALIGNMENT,
                        l.max_storage_buffer_binding_size,
                        "max_storage_buffer_binding_size",
                    )
                }
                BindingPlan::Output(idx) => {
                    let decl = plan.outputs.get(*idx).ok_or_else(|| {
                        GpuError::InvalidPlan(format!(
                            "binding {binding} writes output {idx}, but the plan declares {} output(s)",
                            plan.outputs.len()
                        ))
                    })?;
                    output_bindings[*idx].push(i);
                    storage += 1;
                    (
                        decl.size,
                        STORAGE_ALIGNMENT,
                        l.max_storage_buffer_binding_size,
                        "max_storage_buffer_binding_size",
                    )
                }
            };
            let padded = allocated_size(bytes, alignment);
            for (limit, limit_name) in [
                (binding_limit, binding_limit_name),
                (l.max_buffer_size, "max_buffer_size"),
            ] {
                if padded > limit {
                    return Err(GpuError::BufferTooLarge {
                        binding,
                        bytes,
                        limit,
                        limit_name,
                    });
                }
            }
            sizes.push(BindingSize { bytes, padded });
        }
        if let Some(idx) = input_bindings.iter().position(|b| b.len() != 1) {
            return Err(GpuError::InvalidPlan(format!(
                "input {idx} is bound {} times; each input needs exactly one binding",
                input_bindings[idx].len()
            )));
        }
        if let Some(idx) = output_bindings.iter().position(|b| b.len() != 1) {
            return Err(GpuError::InvalidPlan(format!(
                "output {idx} is bound {} times; each output needs exactly one binding",
                output_bindings[idx].len()
            )));
        }
        if storage > l.max_storage_buffers_per_shader_stage {
            return Err(GpuError::TooManyBuffers {
                kind: "storage",
                count: storage,
                limit: l.max_storage_buffers_per_shader_stage,
            });
        }
        if uniform > l.max_uniform_buffers_per_shader_stage {
            return Err(GpuError::TooManyBuffers {
                kind: "uniform",
                count: uniform,
                limit: l.max_uniform_buffers_per_shader_stage,
            });
        }
        if plan.bindings.len() as u64 > u64::from(l.max_bindings_per_bind_group) {
            return Err(GpuError::InvalidPlan(format!(
                "{} bindings, over this adapter's limit of {} per bind group",
                plan.bindings.len(),
                l.max_bindings_per_bind_group
            )));
        }
        if plan.steps.is_empty() {
            return Err(GpuError::InvalidPlan(
                "the plan has no steps: nothing to dispatch".into(),
            ));
        }
        let max_groups = l.max_compute_workgroups_per_dimension;
        if let Some(step) = plan
            .steps
            .iter()
            .find(|step| step.workgroups.iter().any(|&w| w == 0 || w > max_groups))
        {
            return Err(GpuError::InvalidPlan(format!(
                "step {}: workgroups {:?}: each count must be between 1 and this adapter's limit of {max_groups}",
                step.entry, step.workgroups
            )));
        }
        let input_bindings = input_bindings.into_iter().flatten().collect();
        let output_bindings = output_bindings.into_iter().flatten().collect();
        Ok(BufferLayout {
            sizes,
            input_bindings,
            output_bindings,
        })
    }

    /// Block until `submission` has finished on the device.
    fn wait(&self, submission: wgpu::SubmissionIndex) -> Result<(), GpuError> {
        let poll = wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        };
        // wgpu panics (instead of returning an error) when the device is lost
        // during a wait; turn that into DeviceLost so the node survives.
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.device.poll(poll))) {
            Ok(Ok(_)) => self.check_lost(),
            Ok(Err(e)) => {
                Err(self.lost_or(GpuError::Readback(format!("waiting for the GPU: {e}"))))
            }
            Err(panic) => {
                let message = panic_message(&*panic)
                    .unwrap_or_else(|| "wgpu panicked while waiting for the device".into());
                self.mark_lost(&message);
                Err(GpuError::DeviceLost(message))
            }
        }
    }

    fn check_lost(&self) -> Result<(), GpuError> {
        match self.lost.lock() {
            Ok(slot) => slot
                .as_ref()
                .map_or(Ok(()), |why| Err(GpuError::DeviceLost(why.clone()))),
            Err(_) => Err(GpuError::DeviceLost(
                "the device-lost record is poisoned".into(),
            )),
        }
    }

    fn mark_lost(&self, why: &str) {
        if let Ok(mut slot) = self.lost.lock() {
            slot.get_or_insert_with(|| why.to_string());
        }
    }

    /// `DeviceLost` if the device is gone (the real cause of most other failures),
    /// else `error`.
    fn lost_or(&self, error: GpuError) -> GpuError {
        // wgpu reports some losses (e.g. `destroy`) to the callback only from a
        // poll; a non-blocking one lets it fire before we decide. Errors caused by
        // the loss itself are swallowed by wgpu, so the poll's own result is moot.
        let _ =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.device.poll(wgpu::PollType::Poll)));
        self.check_lost().err().unwrap_or(error)
    }

    /// Map an error captured in a scope: validation errors belong to the stage that
    /// raised them, memory and driver errors to the machine.
    fn classify(&self, error: wgpu::Error, validation: fn(String) -> GpuError) -> GpuError {
        let error = match error {
            wgpu::Error::Validation { description, .. } => validation(description),
            wgpu::Error::OutOfMemory { source } => GpuError::OutOfMemory(source.to_string()),
            wgpu::Error::Internal { description, .. } => GpuError::Driver(description),
        };
        self.lost_or(error)
    }
}

/// Run `f` inside validation, internal and out-of-memory error scopes; return its
/// value and the first error captured (validation first).
///
/// Scopes are per thread, so concurrent runs on other threads do not see each
/// other's errors.
fn scoped<T>(device: &wgpu::Device, f: impl FnOnce() -> T) -> (T, Option<wgpu::Error>) {
    let out_of_memory = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let value = f();
    // Scopes pop innermost first.
    let validation = pollster::block_on(validation.pop());
    let internal = pollster::block_on(internal.pop());
    let out_of_memory = pollster::block_on(out_of_memory.pop());
    (value, validation.or(internal).or(out_of_memory))
}

/// Bytes to allocate for a binding of `bytes`: rounded up to `alignment`, never zero
/// (wgpu refuses zero-sized bindings).
fn allocated_size(bytes: u64, alignment: u64) -> u64 {
    bytes.max(1).next_multiple_of(alignment)
}

/// `bytes` zero-extended to `len` (borrowed when already that long).
fn padded(bytes: &[u8], len: u64) -> Cow<'_, [u8]> {
    if bytes.len() as u64 == len {
        Cow::Borrowed(bytes)
    } else {
        let mut v = bytes.to_vec();
        v.resize(len as usize, 0);
        Cow::Owned(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::kernel::Dispatch;

    #[test]
    fn padding_is_zero_and_never_empty() {
        assert_eq!(&*padded(&[1, 2], 4), &[1, 2, 0, 0]);
        assert!(matches!(padded(&[1, 2, 3, 4], 4), Cow::Borrowed(_)));
        assert_eq!(allocated_size(0, STORAGE_ALIGNMENT), 4);
        assert_eq!(allocated_size(6, STORAGE_ALIGNMENT), 8);
        assert_eq!(allocated_size(16, UNIFORM_ALIGNMENT), 16);
        assert_eq!(allocated_size(20, UNIFORM_ALIGNMENT), 32);
    }

    /// Needs an adapter (lavapipe in CI), like `tests/gpu.rs`: destroying the device
    /// stands in for a driver reset, which a test cannot cause.
    #[test]
    fn a_lost_device_fails_runs_with_device_lost_instead_of_panicking() {
        let executor =
            Executor::open_best().unwrap_or_else(|e| panic!("this test needs a GPU adapter: {e}"));
        let plan = KernelPlan {
            source: "@group(0) @binding(0) var<storage, read_write> o: array<u32>;\n\
                     @compute @workgroup_size(1) fn main() { o[0] = 7u; }"
                .into(),
            steps: vec![Dispatch::new("main", [1, 1, 1])],
            bindings: vec![BindingPlan::Output(0)],
            outputs: vec![mesh_core::task::OutputDecl {
                name: "o".into(),
                size: 4,
            }],
        };
        assert_eq!(
            executor.run(&plan, &[]).expect("healthy device"),
            vec![7u32.to_le_bytes().to_vec()]
        );
        executor.device.destroy();
        let err = executor
            .run(&plan, &[])
            .expect_err("a destroyed device cannot run");
        assert!(matches!(err, GpuError::DeviceLost(_)), "{err:?}");
        assert!(err.retryable());
    }

    #[test]
    fn executor_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Executor>();
    }
}
