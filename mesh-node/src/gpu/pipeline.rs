//! A plan's compiled form: its shader module, one bind group layout for its bindings
//! and a compute pipeline per step, made with plain wgpu calls. The executor makes
//! them inside its error scopes and keeps them by [`PipelineKey`]; the GPU bench's
//! bare wgpu path makes them the same way.

use mesh_core::kernel::{BindingPlan, KernelPlan};
use std::borrow::Cow;

/// What [`Pipelines::build`] makes of a plan.
#[derive(Debug, Clone)]
pub struct Pipelines {
    /// The layout of the plan's bindings, shared by every step.
    pub layout: wgpu::BindGroupLayout,
    /// One per step of the plan, in step order.
    pub steps: Vec<wgpu::ComputePipeline>,
}

impl Pipelines {
    /// Compile `plan` on `device`, labelling every object `label`. wgpu reports what
    /// does not compile through the device's error scopes, not here.
    pub fn build(device: &wgpu::Device, plan: &KernelPlan, label: &str) -> Pipelines {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(Cow::Borrowed(&plan.source)),
        });
        // An explicit layout, not the shader's derived one: a derived layout leaves
        // out bindings the entry point never touches, and the bind group would then
        // not match.
        let entries: Vec<wgpu::BindGroupLayoutEntry> = plan
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: binding_type(b),
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let steps = plan
            .steps
            .iter()
            .map(|step| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(label),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(&step.entry),
                    compilation_options: wgpu::PipelineCompilationOptions::default(),
                    cache: None,
                })
            })
            .collect();
        Pipelines { layout, steps }
    }

    /// Record every step of `plan` (the plan these were built for) in `pass`, in
    /// order, over `bind_group`. wgpu puts a barrier between dispatches that share a
    /// writable buffer, so each step sees what the ones before it wrote.
    pub fn dispatch(
        &self,
        plan: &KernelPlan,
        pass: &mut wgpu::ComputePass<'_>,
        bind_group: &wgpu::BindGroup,
    ) {
        pass.set_bind_group(0, bind_group, &[]);
        for (step, pipeline) in plan.steps.iter().zip(&self.steps) {
            pass.set_pipeline(pipeline);
            let [x, y, z] = step.workgroups;
            pass.dispatch_workgroups(x, y, z);
        }
    }
}

/// What makes two plans share their [`Pipelines`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    source: String,
    /// The entry point of each step, in order.
    entries: Vec<String>,
    /// Per binding, the kind of buffer it binds.
    bindings: Vec<wgpu::BufferBindingType>,
}

impl PipelineKey {
    /// The key of `plan`.
    pub fn of(plan: &KernelPlan) -> PipelineKey {
        PipelineKey {
            source: plan.source.clone(),
            entries: plan.steps.iter().map(|step| step.entry.clone()).collect(),
            bindings: plan.bindings.iter().map(binding_type).collect(),
        }
    }
}

/// The kind of buffer a binding of a plan is.
fn binding_type(binding: &BindingPlan) -> wgpu::BufferBindingType {
    match binding {
        BindingPlan::Input(_) => wgpu::BufferBindingType::Storage { read_only: true },
        BindingPlan::Uniform(_) => wgpu::BufferBindingType::Uniform,
        BindingPlan::Output(_) | BindingPlan::Scratch(_) => {
            wgpu::BufferBindingType::Storage { read_only: false }
        }
    }
}
