//! What a task asks of the node that runs it, and how that is matched.

use crate::capability::{AdapterInfo, DeviceType, NodeCapabilities};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One requirement of a task, as written after `--require`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Requirement {
    /// `device=discrete|integrated|cpu`.
    Device(DeviceType),
    /// `backend=vulkan`.
    Backend(String),
    /// `vendor=nvidia`.
    Vendor(String),
    /// `feature=shader-f16`.
    Feature(String),
    /// A minimum adapter limit: `max_buffer_size>=N`, `max_storage_buffer_binding_size>=N`,
    /// `max_compute_invocations_per_workgroup>=N`, `max_compute_workgroup_size_x>=N`.
    MinLimit(Limit, u64),
    /// `label:KEY=VALUE`.
    LabelEq(String, String),
    /// `label:KEY!=VALUE`.
    LabelNe(String, String),
    /// `label:KEY in V1,V2`.
    LabelIn(String, Vec<String>),
}

/// An adapter limit a task can ask a minimum of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// Largest buffer.
    MaxBufferSize,
    /// Largest storage buffer binding.
    MaxStorageBufferBindingSize,
    /// Invocations in one workgroup.
    MaxComputeInvocationsPerWorkgroup,
    /// Workgroup size along x.
    MaxComputeWorkgroupSizeX,
}

impl Limit {
    const ALL: [(&'static str, Limit); 4] = [
        ("max_buffer_size", Limit::MaxBufferSize),
        (
            "max_storage_buffer_binding_size",
            Limit::MaxStorageBufferBindingSize,
        ),
        (
            "max_compute_invocations_per_workgroup",
            Limit::MaxComputeInvocationsPerWorkgroup,
        ),
        (
            "max_compute_workgroup_size_x",
            Limit::MaxComputeWorkgroupSizeX,
        ),
    ];

    fn name(self) -> &'static str {
        Limit::ALL
            .iter()
            .find(|(_, l)| *l == self)
            .map(|(n, _)| *n)
            .expect("every limit is named")
    }

    fn of(self, a: &AdapterInfo) -> u64 {
        match self {
            Limit::MaxBufferSize => a.limits.max_buffer_size,
            Limit::MaxStorageBufferBindingSize => a.limits.max_storage_buffer_binding_size,
            Limit::MaxComputeInvocationsPerWorkgroup => {
                a.limits.max_compute_invocations_per_workgroup as u64
            }
            Limit::MaxComputeWorkgroupSizeX => a.limits.max_compute_workgroup_size_x as u64,
        }
    }
}

/// A `--require` expression that could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot read requirement '{expr}': {why}; examples: device=cpu, backend=vulkan, vendor=nvidia, feature=shader-f16, max_buffer_size>=1048576, max_compute_invocations_per_workgroup>=256, label:zone=a, label:zone!=b, 'label:zone in a,b'")]
pub struct BadRequirement {
    /// The expression.
    pub expr: String,
    /// What is wrong.
    pub why: String,
}

impl Requirement {
    /// Parse one expression.
    pub fn parse(expr: &str) -> Result<Requirement, BadRequirement> {
        let bad = |why: &str| BadRequirement {
            expr: expr.into(),
            why: why.into(),
        };
        if let Some(rest) = expr.strip_prefix("label:") {
            if let Some((k, vs)) = rest.split_once(" in ") {
                let values: Vec<String> = vs
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                if values.is_empty() {
                    return Err(bad("expected label:KEY in V1,V2"));
                }
                return Ok(Requirement::LabelIn(k.trim().into(), values));
            }
            if let Some((k, v)) = rest.split_once("!=") {
                return Ok(Requirement::LabelNe(k.into(), v.into()));
            }
            let (k, v) = rest
                .split_once('=')
                .ok_or_else(|| bad("expected label:KEY=VALUE"))?;
            return Ok(Requirement::LabelEq(k.into(), v.into()));
        }
        if let Some((k, v)) = expr.split_once(">=") {
            let limit = Limit::ALL
                .iter()
                .find(|(n, _)| *n == k.trim())
                .map(|(_, l)| *l)
                .ok_or_else(|| bad(&format!("unknown limit '{}'", k.trim())))?;
            let n = v
                .trim()
                .parse()
                .map_err(|_| bad("the limit must be a whole number"))?;
            return Ok(Requirement::MinLimit(limit, n));
        }
        let (k, v) = expr
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE"))?;
        let v = v.trim();
        Ok(match k.trim() {
            "device" => match v {
                "any" => return Err(bad("device=any needs no requirement; leave it out")),
                _ => Requirement::Device(
                    DeviceType::parse(v)
                        .ok_or_else(|| bad("device is discrete, integrated, virtual or cpu"))?,
                ),
            },
            "backend" => Requirement::Backend(v.to_lowercase()),
            "vendor" => Requirement::Vendor(v.to_lowercase()),
            "feature" => Requirement::Feature(v.to_lowercase()),
            other => return Err(bad(&format!("unknown key '{other}'"))),
        })
    }

    /// Whether a node's capabilities satisfy this requirement.
    pub fn satisfied_by(&self, caps: &NodeCapabilities) -> bool {
        let adapter = caps.primary();
        let on_adapter = |f: &dyn Fn(&AdapterInfo) -> bool| adapter.is_some_and(f);
        match self {
            Requirement::Device(t) => on_adapter(&|a| a.device_type == *t),
            Requirement::Backend(b) => on_adapter(&|a| a.backend == *b),
            Requirement::Vendor(v) => on_adapter(&|a| a.vendor == *v),
            Requirement::Feature(f) => on_adapter(&|a| a.features.iter().any(|x| x == f)),
            Requirement::MinLimit(l, n) => on_adapter(&|a| l.of(a) >= *n),
            Requirement::LabelEq(k, v) => caps.labels.get(k) == Some(v),
            Requirement::LabelNe(k, v) => caps.labels.get(k) != Some(v),
            Requirement::LabelIn(k, vs) => caps.labels.get(k).is_some_and(|v| vs.contains(v)),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Device(t) => write!(f, "device={t}"),
            Requirement::Backend(b) => write!(f, "backend={b}"),
            Requirement::Vendor(v) => write!(f, "vendor={v}"),
            Requirement::Feature(x) => write!(f, "feature={x}"),
            Requirement::MinLimit(l, n) => write!(f, "{}>={n}", l.name()),
            Requirement::LabelEq(k, v) => write!(f, "label:{k}={v}"),
            Requirement::LabelNe(k, v) => write!(f, "label:{k}!={v}"),
            Requirement::LabelIn(k, vs) => write!(f, "label:{k} in {}", vs.join(",")),
        }
    }
}

/// The first requirement a node does not meet (it has no adapter counts as unmet).
pub fn first_unmet<'a>(
    reqs: &'a [Requirement],
    caps: &NodeCapabilities,
) -> Option<&'a Requirement> {
    reqs.iter().find(|r| !r.satisfied_by(caps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for e in [
            "device=cpu",
            "backend=vulkan",
            "vendor=nvidia",
            "feature=shader-f16",
            "max_buffer_size>=1024",
            "max_compute_invocations_per_workgroup>=256",
            "label:zone=a",
            "label:zone!=b",
            "label:zone in a,b",
        ] {
            assert_eq!(Requirement::parse(e).unwrap().to_string(), e);
        }
        assert!(Requirement::parse("device=gpu").is_err());
        assert!(Requirement::parse("colour=red").is_err());
        assert!(Requirement::parse("nonsense").is_err());
    }
}
