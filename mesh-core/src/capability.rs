//! What a node can run: its GPU adapters as probed through wgpu, plus operator labels.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// The kind of device behind an adapter, in order of preference for placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceType {
    /// A discrete GPU.
    Discrete,
    /// A GPU integrated with the CPU.
    Integrated,
    /// A virtualised GPU.
    Virtual,
    /// A CPU driver such as Mesa's lavapipe.
    Cpu,
    /// Anything else the driver reports.
    Other,
}

impl DeviceType {
    /// Parse the names used in task files and `--require device=...`.
    pub fn parse(s: &str) -> Option<DeviceType> {
        Some(match s {
            "discrete" => DeviceType::Discrete,
            "integrated" => DeviceType::Integrated,
            "virtual" => DeviceType::Virtual,
            "cpu" => DeviceType::Cpu,
            "other" => DeviceType::Other,
            _ => return None,
        })
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceType::Discrete => "discrete",
            DeviceType::Integrated => "integrated",
            DeviceType::Virtual => "virtual",
            DeviceType::Cpu => "cpu",
            DeviceType::Other => "other",
        })
    }
}

/// The adapter limits that decide whether a kernel fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterLimits {
    /// Largest buffer, bytes.
    pub max_buffer_size: u64,
    /// Largest storage buffer binding, bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Storage buffers one shader stage may bind.
    pub max_storage_buffers_per_shader_stage: u32,
    /// Workgroups per dispatch dimension.
    pub max_compute_workgroups_per_dimension: u32,
    /// Invocations in one workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Workgroup size along x.
    pub max_compute_workgroup_size_x: u32,
}

/// One wgpu adapter of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterInfo {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// PCI vendor id (0x10de NVIDIA, 0x1002 AMD, 0x8086 Intel, 0x10005 Mesa).
    pub vendor_id: u32,
    /// Vendor name derived from the id.
    pub vendor: String,
    /// Backend: vulkan, metal, dx12, gl.
    pub backend: String,
    /// Device type.
    pub device_type: DeviceType,
    /// Driver name and version.
    pub driver: String,
    /// wgpu feature names in kebab case, e.g. `shader-f16`.
    pub features: Vec<String>,
    /// Limits.
    pub limits: AdapterLimits,
}

/// Everything a node publishes about itself for placement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapabilities {
    /// Adapters, best first. The executor runs on the first.
    pub adapters: Vec<AdapterInfo>,
    /// Operator labels from the node's config.
    pub labels: BTreeMap<String, String>,
    /// How many tasks the node runs at once.
    pub slots: u32,
}

impl NodeCapabilities {
    /// The adapter tasks run on, if the node has one.
    pub fn primary(&self) -> Option<&AdapterInfo> {
        self.adapters.first()
    }
}

/// A readable vendor name for a PCI vendor id.
pub fn vendor_name(id: u32) -> &'static str {
    match id {
        0x10de => "nvidia",
        0x1002 | 0x1022 => "amd",
        0x8086 => "intel",
        0x106b => "apple",
        0x5143 => "qualcomm",
        0x13b5 => "arm",
        0x10005 => "mesa",
        _ => "unknown",
    }
}
