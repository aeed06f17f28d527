//! Adapter discovery: every adapter wgpu can see, ranked best first and described
//! with mesh-core's capability types.

use mesh_core::capability::{vendor_name, AdapterInfo, AdapterLimits, DeviceType};

/// Every adapter wgpu can see on this machine, best first (discrete > integrated >
/// virtual > cpu > other; within a kind Vulkan > Metal > DX12 > GL), as mesh-core
/// types.
///
/// An empty list means no driver is installed; see [`super::GpuError::NoAdapter`].
/// `WGPU_BACKEND` (e.g. `vulkan`) restricts the backends searched.
pub fn probe() -> Vec<AdapterInfo> {
    let instance = new_instance();
    ranked_adapters(&instance)
        .into_iter()
        .map(|(_, info)| info)
        .collect()
}

/// A wgpu instance with no display, honouring wgpu's environment variables
/// (`WGPU_BACKEND`, `WGPU_DEBUG`, ...). Without `WGPU_BACKEND` it uses the primary
/// backends (Vulkan, Metal, DX12): GL offers compute on nothing those lack, and probing
/// EGL on a headless machine only logs driver errors.
pub(super) fn new_instance() -> wgpu::Instance {
    let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle();
    descriptor.backends = wgpu::Backends::PRIMARY;
    wgpu::Instance::new(descriptor.with_env())
}

/// The instance's adapters with their descriptions, best first.
pub(super) fn ranked_adapters(instance: &wgpu::Instance) -> Vec<(wgpu::Adapter, AdapterInfo)> {
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let mut ranked: Vec<(wgpu::Adapter, AdapterInfo)> = adapters
        .into_iter()
        .map(|adapter| {
            let info = describe(&adapter);
            (adapter, info)
        })
        .collect();
    // Stable sort: adapters of the same kind and backend keep wgpu's order.
    ranked.sort_by_key(|(adapter, info)| {
        (info.device_type, backend_rank(adapter.get_info().backend))
    });
    tracing::debug!(
        adapters = ?ranked.iter().map(|(_, i)| format!("{} ({}, {})", i.name, i.backend, i.device_type)).collect::<Vec<_>>(),
        "probed GPU adapters"
    );
    ranked
}

/// Preference among backends for the same device: native compute APIs before GL.
fn backend_rank(backend: wgpu::Backend) -> u8 {
    match backend {
        wgpu::Backend::Vulkan => 0,
        wgpu::Backend::Metal => 1,
        wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 3,
        wgpu::Backend::BrowserWebGpu => 4,
        wgpu::Backend::Noop => 5,
    }
}

/// One adapter as mesh-core describes it.
pub(super) fn describe(adapter: &wgpu::Adapter) -> AdapterInfo {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let driver = format!("{} {}", info.driver, info.driver_info)
        .trim()
        .to_string();
    AdapterInfo {
        name: info.name,
        vendor_id: info.vendor,
        vendor: vendor_name(info.vendor).to_string(),
        backend: info.backend.to_str().to_string(),
        device_type: device_type(info.device_type),
        driver,
        features: feature_names(adapter.features()),
        limits: AdapterLimits {
            max_buffer_size: limits.max_buffer_size,
            max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
            max_storage_buffers_per_shader_stage: limits.max_storage_buffers_per_shader_stage,
            max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
            max_compute_workgroup_size_x: limits.max_compute_workgroup_size_x,
        },
    }
}

fn device_type(t: wgpu::DeviceType) -> DeviceType {
    match t {
        wgpu::DeviceType::DiscreteGpu => DeviceType::Discrete,
        wgpu::DeviceType::IntegratedGpu => DeviceType::Integrated,
        wgpu::DeviceType::VirtualGpu => DeviceType::Virtual,
        wgpu::DeviceType::Cpu => DeviceType::Cpu,
        wgpu::DeviceType::Other => DeviceType::Other,
    }
}

/// wgpu feature flag names in kebab case (`SHADER_F16` -> `shader-f16`), sorted, so
/// task requirements can name them the same way on every platform.
pub(super) fn feature_names(features: wgpu::Features) -> Vec<String> {
    let mut names: Vec<String> = features
        .iter_names()
        .map(|(name, _)| name.to_ascii_lowercase().replace('_', "-"))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_names_are_kebab_case_flag_names() {
        let names = feature_names(wgpu::Features::SHADER_F16 | wgpu::Features::TIMESTAMP_QUERY);
        assert_eq!(
            names,
            vec!["shader-f16".to_string(), "timestamp-query".to_string()]
        );
    }

    #[test]
    fn device_kinds_rank_discrete_first() {
        let mut kinds = vec![
            device_type(wgpu::DeviceType::Cpu),
            device_type(wgpu::DeviceType::Other),
            device_type(wgpu::DeviceType::DiscreteGpu),
            device_type(wgpu::DeviceType::VirtualGpu),
            device_type(wgpu::DeviceType::IntegratedGpu),
        ];
        kinds.sort();
        assert_eq!(
            kinds,
            vec![
                DeviceType::Discrete,
                DeviceType::Integrated,
                DeviceType::Virtual,
                DeviceType::Cpu,
                DeviceType::Other
            ]
        );
    }
}
