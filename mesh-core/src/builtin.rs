//! Built-in kernels with a fixed meaning, so anyone can check a result on the CPU.
//!
//! | name | inputs | params | output |
//! |---|---|---|---|
//! | `saxpy` | `x`, `y`: f32 | `a` | `out[i] = a*x[i] + y[i]` |
//! | `vector-add` | `x`, `y`: f32 | | `out[i] = x[i] + y[i]` |
//! | `matmul` | `a` (m×k), `b` (k×n): f32 row-major | `m`, `n`, `k` | `out` (m×n) |
//! | `reduce-sum` | `x`: f32 | | `out`: one f32 |
//! | `mandelbrot` | | `width`, `height`, `max_iter` | `out`: u32 iteration counts |
//!
//! Every buffer is little-endian. Each kernel's CPU reference performs the same f32
//! operations in the same order as the shader, each rounded on its own, so results
//! compare bit for bit and a task computes the same bytes on every adapter: a resumed
//! sharded task equals a clean run whichever nodes ran its shards. For that the
//! shaders leave a driver nothing to choose. naga emits no SPIR-V `NoContraction`, so
//! a driver may fuse `a*b + c` into one multiply-add (NVIDIA's does; lavapipe does not,
//! and rounds even WGSL's `fma()` twice) or reassociate a chain of additions (lavapipe
//! turns `a*a - b*b + c` into `(a*a + c) - b*b`). So every product that feeds an
//! addition passes through [`UNFUSED`]'s `unfused()`, which no compiler can see
//! through; no sum has three terms (Mandelbrot's real part is `(zx - zy) * (zx + zy) +
//! cx`); and nothing divides, since Vulkan lets a division be off by 2.5 ulp
//! (Mandelbrot's pixel step comes in its parameters, divided on the CPU).
//! `mesh-node/tests/gpu.rs` checks each of these shapes on the adapter it runs on and
//! names the form a driver computed instead.

use crate::kernel::{BindingPlan, Dispatch, KernelPlan, SpecError, MAX_WORKGROUPS_PER_DIMENSION};
use crate::task::{NamedBytes, OutputDecl};
use std::collections::BTreeMap;

/// The names of all built-in kernels.
pub const NAMES: &[&str] = &["saxpy", "vector-add", "matmul", "reduce-sum", "mandelbrot"];

/// Invocations per workgroup of the 1-D kernels.
const WORKGROUP: u32 = 256;
/// Most f32 elements of a 1-D kernel: it must fit the 2-D dispatch grid.
const MAX_ELEMENTS: u64 =
    WORKGROUP as u64 * MAX_WORKGROUPS_PER_DIMENSION as u64 * MAX_WORKGROUPS_PER_DIMENSION as u64;

/// WGSL: `unfused(p)` is `p`, with its bits passed through an OR with `params.zero`, a
/// uniform the plan sets to 0. A compiler cannot know that value, so it cannot fuse
/// the multiplication that made `p` into the addition that uses it: the product is
/// rounded on its own on every driver, as on the CPU. Kernels that use it declare a
/// `zero: u32` in their `params`.
pub const UNFUSED: &str = r#"
fn unfused(p: f32) -> f32 { return bitcast<f32>(bitcast<u32>(p) | params.zero); }
"#;

/// A kernel's WGSL with [`UNFUSED`] before it where it calls `unfused()`.
fn with_helpers(src: &str) -> String {
    if src.contains("unfused(") {
        format!("{UNFUSED}{src}")
    } else {
        src.to_string()
    }
}

/// The 2-D dispatch of 1-D kernels: index = (wg.y * num_wg.x + wg.x) * 256 + local.
const INDEX_1D: &str = r#"
fn flat_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * 256u + lid;
}
"#;

const SAXPY: &str = r#"
struct Params { a: f32, n: u32, zero: u32, _p0: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wg, nwg, lid);
    if (i < params.n) { out[i] = unfused(params.a * x[i]) + y[i]; }
}
"#;

const VECTOR_ADD: &str = r#"
struct Params { n: u32, _p0: u32, _p1: u32, _p2: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> y: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_index(wg, nwg, lid);
    if (i < params.n) { out[i] = x[i] + y[i]; }
}
"#;

const MATMUL: &str = r#"
struct Params { m: u32, n: u32, k: u32, zero: u32 }
@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let row = id.y;
    let col = id.x;
    if (row >= params.m || col >= params.n) { return; }
    var acc = 0.0;
    for (var i = 0u; i < params.k; i = i + 1u) {
        acc = acc + unfused(a[row * params.k + i] * b[i * params.n + col]);
    }
    out[row * params.n + col] = acc;
}
"#;

/// Lanes per row when a [`REDUCE_SUM`] workgroup sums its [`WORKGROUP`] lanes.
const REDUCE_ROW: usize = 16;
/// Most workgroups of reduce-sum's first step, each leaving one partial sum: enough
/// to fill a large GPU (a thousand workgroups of 256), few enough that the second
/// step's single workgroup adds the partials in a few steps per invocation.
const REDUCE_MAX_GROUPS: u64 = 1024;
/// Fewest elements one invocation of reduce-sum's first step adds on its own before
/// the workgroup combines its lanes: below it, small inputs get fewer workgroups
/// rather than workgroups that mostly wait at barriers.
const REDUCE_MIN_PER_INVOCATION: u64 = 8;

/// The workgroups of reduce-sum's first step for `n` elements: a function of `n`
/// alone, so that the order of the additions, and so the sum's bits, are the same on
/// every adapter.
fn reduce_groups(n: u64) -> u32 {
    n.div_ceil(u64::from(WORKGROUP) * REDUCE_MIN_PER_INVOCATION)
        .clamp(1, REDUCE_MAX_GROUPS) as u32
}

// Two steps, since workgroups cannot wait for each other within one dispatch: the
// first has `groups` workgroups, workgroup g's invocation l adding the elements
// g*256 + l, then every groups*256 after it, and the workgroup summing its 256 lanes
// into partials[g]; the second, one workgroup, adds the partials the same way into
// out[0]. [`cpu_reference`] adds in exactly this order.
const REDUCE_SUM: &str = r#"
struct Params { n: u32, groups: u32, _p0: u32, _p1: u32 }
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> partials: array<f32>;
var<workgroup> lanes: array<f32, 256>;
var<workgroup> rows: array<f32, 16>;
// Every invocation brings its `acc` and gets the workgroup's sum: the lanes in rows
// of 16, each row added in order, then the rows in order. Two barriers, where
// halving the lanes pairwise takes eight: on a CPU driver (lavapipe) each barrier
// switches between all of the workgroup's invocations, and with a thousand
// workgroups the barriers cost more than reading the input.
fn sum_lanes(lid: u32, acc: f32) -> f32 {
    lanes[lid] = acc;
    workgroupBarrier();
    if (lid < 16u) {
        var row = 0.0;
        for (var j = 0u; j < 16u; j = j + 1u) { row = row + lanes[lid * 16u + j]; }
        rows[lid] = row;
    }
    workgroupBarrier();
    var sum = 0.0;
    for (var r = 0u; r < 16u; r = r + 1u) { sum = sum + rows[r]; }
    return sum;
}
@compute @workgroup_size(256)
fn partial_sums(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = wg.x * 256u + lid; i < params.n; i = i + params.groups * 256u) { acc = acc + x[i]; }
    let sum = sum_lanes(lid, acc);
    if (lid == 0u) { partials[wg.x] = sum; }
}
@compute @workgroup_size(256)
fn total(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < params.groups; i = i + 256u) { acc = acc + partials[i]; }
    let sum = sum_lanes(lid, acc);
    if (lid == 0u) { out[0] = sum; }
}
"#;

// `row0` is the first image row this dispatch computes (non-zero for shards); the
// rows it computes are as many as `out` holds. `step_x` = 3.5 / width and `step_y` =
// 2.5 / height, divided on the CPU ([`mandelbrot_steps`]).
const MANDELBROT: &str = r#"
struct Params {
    width: u32, height: u32, max_iter: u32, row0: u32,
    step_x: f32, step_y: f32, zero: u32, _p0: u32,
}
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= params.width || id.y >= arrayLength(&out) / params.width) { return; }
    let py = id.y + params.row0;
    let cx = unfused((f32(id.x) + 0.5) * params.step_x) - 2.5;
    let cy = unfused((f32(py) + 0.5) * params.step_y) - 1.25;
    var zx = 0.0;
    var zy = 0.0;
    var i = 0u;
    loop {
        if (i >= params.max_iter || unfused(zx * zx) + unfused(zy * zy) > 4.0) { break; }
        let t = unfused((zx - zy) * (zx + zy)) + cx;
        zy = unfused(2.0 * zx * zy) + cy;
        zx = t;
        i = i + 1u;
    }
    out[id.y * params.width + id.x] = i;
}
"#;

/// Build the plan of a built-in kernel.
pub fn plan(
    name: &str,
    params: &BTreeMap<String, String>,
    inputs: &[NamedBytes],
) -> Result<KernelPlan, SpecError> {
    let k = Builtin {
        name,
        params,
        inputs,
    };
    match name {
        "saxpy" => {
            k.allow_params(&["a"])?;
            let a = k.f32_param("a")?;
            let n = k.same_length_f32(&["x", "y"])?;
            k.one_d(SAXPY, &["x", "y"], &[a.to_bits(), n as u32, 0, 0], n)
        }
        "vector-add" => {
            k.allow_params(&[])?;
            let n = k.same_length_f32(&["x", "y"])?;
            k.one_d(VECTOR_ADD, &["x", "y"], &[n as u32, 0, 0, 0], n)
        }
        "matmul" => {
            k.allow_params(&["m", "n", "k"])?;
            let (m, n, kk) = (k.u32_param("m")?, k.u32_param("n")?, k.u32_param("k")?);
            k.expect_inputs(&["a", "b"])?;
            k.expect_len("a", m as u64 * kk as u64 * 4, "m*k f32")?;
            k.expect_len("b", kk as u64 * n as u64 * 4, "k*n f32")?;
            k.two_d(
                MATMUL,
                &["a", "b"],
                &[m, n, kk, 0],
                n,
                m,
                m as u64 * n as u64 * 4,
            )
        }
        "reduce-sum" => {
            k.allow_params(&[])?;
            let n = k.same_length_f32(&["x"])?;
            let groups = reduce_groups(n);
            let mut bindings = k.bindings(&["x"], &[n as u32, groups, 0, 0]);
            bindings.push(BindingPlan::Scratch(u64::from(groups) * 4));
            Ok(KernelPlan {
                source: REDUCE_SUM.into(),
                steps: vec![
                    Dispatch::new("partial_sums", [groups, 1, 1]),
                    Dispatch::new("total", [1, 1, 1]),
                ],
                bindings,
                outputs: vec![OutputDecl {
                    name: "out".into(),
                    size: 4,
                }],
            })
        }
        "mandelbrot" => {
            k.allow_params(&["width", "height", "max_iter"])?;
            let (w, h, it) = (
                k.u32_param("width")?,
                k.u32_param("height")?,
                k.u32_param("max_iter")?,
            );
            k.expect_inputs(&[])?;
            let (step_x, step_y) = mandelbrot_steps(w, h);
            k.two_d(
                MANDELBROT,
                &[],
                &[w, h, it, 0, step_x.to_bits(), step_y.to_bits(), 0, 0],
                w,
                h,
                w as u64 * h as u64 * 4,
            )
        }
        _ => Err(SpecError::UnknownKernel { name: name.into() }),
    }
}

struct Builtin<'a> {
    name: &'a str,
    params: &'a BTreeMap<String, String>,
    inputs: &'a [NamedBytes],
}

impl Builtin<'_> {
    fn bad_param(&self, param: &str, why: impl Into<String>) -> SpecError {
        SpecError::BadParam {
            kernel: self.name.into(),
            param: param.into(),
            why: why.into(),
        }
    }

    fn bad_inputs(&self, why: impl Into<String>) -> SpecError {
        SpecError::BadInputs {
            kernel: self.name.into(),
            why: why.into(),
        }
    }

    fn allow_params(&self, allowed: &[&str]) -> Result<(), SpecError> {
        match self.params.keys().find(|p| !allowed.contains(&p.as_str())) {
            Some(p) => Err(self.bad_param(
                p,
                format!("is unknown; {} takes: {}", self.name, allowed.join(", ")),
            )),
            None => Ok(()),
        }
    }

    fn raw_param(&self, p: &str) -> Result<&str, SpecError> {
        self.params
            .get(p)
            .map(String::as_str)
            .ok_or_else(|| self.bad_param(p, format!("is missing; pass --param {p}=VALUE")))
    }

    fn f32_param(&self, p: &str) -> Result<f32, SpecError> {
        let v = self.raw_param(p)?;
        v.parse::<f32>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.bad_param(p, format!("must be a finite number, got '{v}'")))
    }

    fn u32_param(&self, p: &str) -> Result<u32, SpecError> {
        let v = self.raw_param(p)?;
        v.parse::<u32>()
            .ok()
            .filter(|x| *x > 0)
            .ok_or_else(|| self.bad_param(p, format!("must be a positive whole number, got '{v}'")))
    }

    fn input(&self, name: &str) -> Option<&NamedBytes> {
        self.inputs.iter().find(|i| i.name == name)
    }

    fn expect_inputs(&self, names: &[&str]) -> Result<(), SpecError> {
        let mut given: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        given.sort();
        let mut want = names.to_vec();
        want.sort();
        if given != want {
            return Err(self.bad_inputs(format!(
                "needs inputs [{}], got [{}]",
                want.join(", "),
                given.join(", ")
            )));
        }
        Ok(())
    }

    fn expect_len(&self, name: &str, bytes: u64, what: &str) -> Result<(), SpecError> {
        let got = self.input(name).map_or(0, |i| i.data.len() as u64);
        if got != bytes {
            return Err(self.bad_inputs(format!(
                "input {name} must be {bytes} bytes ({what}), got {got}"
            )));
        }
        Ok(())
    }

    /// Inputs that are f32 arrays of one common, non-zero length; returns it.
    fn same_length_f32(&self, names: &[&str]) -> Result<u64, SpecError> {
        self.expect_inputs(names)?;
        let lens: Vec<u64> = names
            .iter()
            .map(|n| self.input(n).map_or(0, |i| i.data.len() as u64))
            .collect();
        if lens[0] == 0 || !lens[0].is_multiple_of(4) {
            return Err(self.bad_inputs(format!(
                "input {} is {} bytes; it must hold one or more little-endian f32 (a multiple of 4 bytes)",
                names[0], lens[0]
            )));
        }
        if let Some((i, l)) = lens.iter().enumerate().find(|(_, l)| **l != lens[0]) {
            return Err(self.bad_inputs(format!(
                "inputs must have the same length: {} is {} bytes, {} is {l} bytes",
                names[0], lens[0], names[i]
            )));
        }
        let n = lens[0] / 4;
        if n > MAX_ELEMENTS || n > u32::MAX as u64 {
            return Err(
                self.bad_inputs(format!("{n} elements is more than one dispatch can cover"))
            );
        }
        Ok(n)
    }

    /// The inputs named, in order, then the uniform of `params`: whole 16-byte rows,
    /// and every `zero` field 0 (see [`UNFUSED`]).
    fn bindings(&self, names: &[&str], params: &[u32]) -> Vec<BindingPlan> {
        debug_assert_eq!(params.len() % 4, 0, "a uniform of whole 16-byte rows");
        let mut b: Vec<BindingPlan> = names
            .iter()
            .map(|n| {
                BindingPlan::Input(
                    self.inputs
                        .iter()
                        .position(|i| i.name == *n)
                        .expect("checked"),
                )
            })
            .collect();
        b.push(BindingPlan::Uniform(
            params.iter().flat_map(|p| p.to_le_bytes()).collect(),
        ));
        b.push(BindingPlan::Output(0));
        b
    }

    fn one_d(
        &self,
        src: &str,
        names: &[&str],
        params: &[u32],
        n: u64,
    ) -> Result<KernelPlan, SpecError> {
        let groups = n.div_ceil(WORKGROUP as u64);
        let x = groups.min(MAX_WORKGROUPS_PER_DIMENSION as u64) as u32;
        let y = groups.div_ceil(x as u64) as u32;
        Ok(KernelPlan {
            source: format!("{INDEX_1D}{}", with_helpers(src)),
            steps: vec![Dispatch::new("main", [x, y, 1])],
            bindings: self.bindings(names, params),
            outputs: vec![OutputDecl {
                name: "out".into(),
                size: n * 4,
            }],
        })
    }

    fn two_d(
        &self,
        src: &str,
        names: &[&str],
        params: &[u32],
        width: u32,
        height: u32,
        out_bytes: u64,
    ) -> Result<KernelPlan, SpecError> {
        Ok(KernelPlan {
            source: with_helpers(src),
            steps: vec![Dispatch::new(
                "main",
                [width.div_ceil(16), height.div_ceil(16), 1],
            )],
            bindings: self.bindings(names, params),
            outputs: vec![OutputDecl {
                name: "out".into(),
                size: out_bytes,
            }],
        })
    }
}

/// Most shards a task may have.
pub const MAX_SHARDS: u32 = 1024;

/// The kernels whose work splits into shards whose outputs, concatenated, equal the
/// unsharded output bit for bit.
pub const SHARDABLE: &[&str] = &["saxpy", "vector-add", "matmul", "mandelbrot"];

/// How many units (elements or rows) a built-in's work splits over, after checking the
/// kernel can be sharded `shards` ways. The spec must already have planned.
pub fn shard_units(
    name: &str,
    params: &BTreeMap<String, String>,
    inputs: &[NamedBytes],
    shards: u32,
) -> Result<u64, SpecError> {
    let units = match name {
        "saxpy" | "vector-add" => inputs.first().map_or(0, |i| i.data.len() as u64 / 4),
        "matmul" => params.get("m").and_then(|v| v.parse().ok()).unwrap_or(0),
        "mandelbrot" => params
            .get("height")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        _ => {
            return Err(SpecError::Invalid(format!(
                "kernel {name} cannot be sharded; shardable kernels are: {}",
                SHARDABLE.join(", ")
            )))
        }
    };
    if shards == 0 || shards > MAX_SHARDS || u64::from(shards) > units {
        return Err(SpecError::Invalid(format!(
            "{shards} shards for {units} {}: shards must be between 1 and {}",
            if name == "saxpy" || name == "vector-add" {
                "elements"
            } else {
                "rows"
            },
            units.min(u64::from(MAX_SHARDS))
        )));
    }
    Ok(units)
}

/// The units `[start, end)` of shard `i` of `shards` (an even split, the first shards
/// one unit larger when it does not divide).
pub fn shard_range(units: u64, shards: u32, i: u32) -> (u64, u64) {
    let (s, i) = (u64::from(shards), u64::from(i));
    let (base, extra) = (units / s, units % s);
    let start = i * base + i.min(extra);
    (start, start + base + u64::from(i < extra))
}

/// The plan and input bytes of shard `i` of a sharded built-in task. Its output is
/// the shard's slice of the whole output.
pub fn plan_shard(
    name: &str,
    params: &BTreeMap<String, String>,
    inputs: &[NamedBytes],
    shards: u32,
    i: u32,
) -> Result<(KernelPlan, Vec<crate::data::Bytes>), SpecError> {
    let units = shard_units(name, params, inputs, shards)?;
    let (start, end) = shard_range(units, shards, i);
    let slice = |input: &NamedBytes, from: u64, to: u64| NamedBytes {
        name: input.name.clone(),
        data: crate::data::Bytes::from(&input.data[from as usize..to as usize]),
    };
    let (plan, used): (KernelPlan, Vec<NamedBytes>) = match name {
        "saxpy" | "vector-add" => {
            let sliced: Vec<NamedBytes> = inputs
                .iter()
                .map(|x| slice(x, start * 4, end * 4))
                .collect();
            (plan(name, params, &sliced)?, sliced)
        }
        "matmul" => {
            let k: u64 = params.get("k").and_then(|v| v.parse().ok()).unwrap_or(0);
            let sliced: Vec<NamedBytes> = inputs
                .iter()
                .map(|x| {
                    if x.name == "a" {
                        slice(x, start * k * 4, end * k * 4)
                    } else {
                        x.clone()
                    }
                })
                .collect();
            let mut p = params.clone();
            p.insert("m".into(), (end - start).to_string());
            (plan(name, &p, &sliced)?, sliced)
        }
        "mandelbrot" => {
            let mut p = plan(name, params, inputs)?;
            let width: u64 = params
                .get("width")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let rows = end - start;
            for b in &mut p.bindings {
                if let BindingPlan::Uniform(bytes) = b {
                    bytes[12..16].copy_from_slice(&(start as u32).to_le_bytes());
                }
            }
            p.steps[0].workgroups[1] = (rows as u32).div_ceil(16);
            p.outputs[0].size = width * rows * 4;
            (p, inputs.to_vec())
        }
        _ => unreachable!("shard_units refused it"),
    };
    Ok((plan, used.into_iter().map(|i| i.data).collect()))
}

/// `v[start] + v[start + step] + ...` in that order, from 0: one invocation's share
/// of [`REDUCE_SUM`].
fn strided_sum(v: &[f32], start: usize, step: usize) -> f32 {
    v.iter()
        .skip(start)
        .step_by(step)
        .fold(0.0, |acc, x| acc + x)
}

/// What [`REDUCE_SUM`]'s `sum_lanes` returns for a workgroup whose invocation `lid`
/// brings `lane(lid)`: each row of 16 lanes summed in order, then the 16 rows in order.
fn sum_lanes(lane: impl Fn(usize) -> f32) -> f32 {
    let lanes: [f32; WORKGROUP as usize] = std::array::from_fn(lane);
    lanes
        .chunks(REDUCE_ROW)
        .map(|row| row.iter().fold(0.0, |acc, x| acc + x))
        .fold(0.0, |acc, row| acc + row)
}

/// Mandelbrot's pixel steps (3.5 / width, 2.5 / height): the image spans
/// [-2.5, 1] x [-1.25, 1.25]. Divided here, correctly rounded, for the shader and the
/// CPU reference alike.
fn mandelbrot_steps(width: u32, height: u32) -> (f32, f32) {
    (3.5 / width as f32, 2.5 / height as f32)
}

/// Little-endian f32s from bytes.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Little-endian bytes of f32s.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The output a built-in kernel must produce, computed on the CPU with the same f32
/// operations in the same order as its shader. The spec must already have planned.
pub fn cpu_reference(
    name: &str,
    params: &BTreeMap<String, String>,
    inputs: &[NamedBytes],
) -> Vec<u8> {
    let input = |n: &str| f32s(&inputs.iter().find(|i| i.name == n).expect("planned").data);
    let p = |n: &str| params.get(n).expect("planned");
    let u = |n: &str| p(n).parse::<u32>().expect("planned");
    match name {
        "saxpy" => {
            let a: f32 = p("a").parse().expect("planned");
            let out: Vec<f32> = input("x")
                .iter()
                .zip(input("y"))
                .map(|(x, y)| a * x + y)
                .collect();
            f32_bytes(&out)
        }
        "vector-add" => f32_bytes(
            &input("x")
                .iter()
                .zip(input("y"))
                .map(|(x, y)| x + y)
                .collect::<Vec<_>>(),
        ),
        "matmul" => {
            let (m, n, k) = (u("m") as usize, u("n") as usize, u("k") as usize);
            let (a, b) = (input("a"), input("b"));
            let mut out = vec![0f32; m * n];
            for row in 0..m {
                for col in 0..n {
                    let mut acc = 0f32;
                    for i in 0..k {
                        acc += a[row * k + i] * b[i * n + col];
                    }
                    out[row * n + col] = acc;
                }
            }
            f32_bytes(&out)
        }
        "reduce-sum" => {
            let x = input("x");
            let groups = reduce_groups(x.len() as u64) as usize;
            let lanes = WORKGROUP as usize;
            let partials: Vec<f32> = (0..groups)
                .map(|g| sum_lanes(|lid| strided_sum(&x, g * lanes + lid, groups * lanes)))
                .collect();
            f32_bytes(&[sum_lanes(|lid| strided_sum(&partials, lid, lanes))])
        }
        "mandelbrot" => {
            let (w, h, max_iter) = (u("width"), u("height"), u("max_iter"));
            let (step_x, step_y) = mandelbrot_steps(w, h);
            let mut out = Vec::with_capacity((w * h) as usize * 4);
            for py in 0..h {
                for px in 0..w {
                    let cx = (px as f32 + 0.5) * step_x - 2.5;
                    let cy = (py as f32 + 0.5) * step_y - 1.25;
                    let (mut zx, mut zy, mut i) = (0f32, 0f32, 0u32);
                    while i < max_iter && zx * zx + zy * zy <= 4.0 {
                        let t = (zx - zy) * (zx + zy) + cx;
                        zy = 2.0 * zx * zy + cy;
                        zx = t;
                        i += 1;
                    }
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
            out
        }
        other => panic!("cpu_reference: {other} is not a built-in kernel"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Bytes;
    use crate::kernel;
    use crate::task::KernelSpec;

    fn spec(name: &str, params: &[(&str, &str)]) -> KernelSpec {
        KernelSpec::Builtin {
            name: name.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn inp(name: &str, v: &[f32]) -> NamedBytes {
        NamedBytes {
            name: name.into(),
            data: Bytes::from(f32_bytes(v)),
        }
    }

    #[test]
    fn every_builtin_plans_and_validates_with_naga() {
        let cases = vec![
            (
                spec("saxpy", &[("a", "2")]),
                vec![inp("x", &[1.0; 300]), inp("y", &[1.0; 300])],
                1200,
            ),
            (
                spec("vector-add", &[]),
                vec![inp("x", &[1.0; 8]), inp("y", &[1.0; 8])],
                32,
            ),
            (
                spec("matmul", &[("m", "2"), ("n", "3"), ("k", "4")]),
                vec![inp("a", &[1.0; 8]), inp("b", &[1.0; 12])],
                24,
            ),
            (spec("reduce-sum", &[]), vec![inp("x", &[1.0; 1000])], 4),
            (
                spec(
                    "mandelbrot",
                    &[("width", "64"), ("height", "32"), ("max_iter", "50")],
                ),
                vec![],
                64 * 32 * 4,
            ),
        ];
        for (k, inputs, out) in cases {
            let p = kernel::plan(&k, &inputs, &[]).unwrap_or_else(|e| panic!("{k:?}: {e}"));
            kernel::validate_wgsl(&p.source).unwrap_or_else(|e| panic!("{k:?}: {e}"));
            assert_eq!(p.outputs[0].size, out, "{k:?}");
        }
    }

    #[test]
    fn large_saxpy_uses_a_2d_grid() {
        let n = 20_000_000usize;
        let x = NamedBytes {
            name: "x".into(),
            data: Bytes::from(vec![0u8; n * 4]),
        };
        let k = Builtin {
            name: "saxpy",
            params: &BTreeMap::from([("a".to_string(), "1".to_string())]),
            inputs: &[
                x.clone(),
                NamedBytes {
                    name: "y".into(),
                    ..x
                },
            ],
        };
        let p = k.one_d(SAXPY, &["x", "y"], &[0; 4], n as u64).unwrap();
        let [x, y, _] = p.steps[0].workgroups;
        assert_eq!([x, y], [65535, 2]);
        assert!(x as u64 * y as u64 * 256 >= n as u64);
    }

    #[test]
    fn reduce_sum_adds_partials_of_a_workgroup_count_set_by_the_length_alone() {
        let plan_for = |n: usize| {
            kernel::plan(&spec("reduce-sum", &[]), &[inp("x", &vec![1.0; n])], &[]).unwrap()
        };
        for (n, groups) in [
            (1, 1),
            (2048, 1),
            (2049, 2),
            (1 << 20, 512),
            (1 << 21, 1024),
            (3 << 20, 1024),
        ] {
            let p = plan_for(n);
            assert_eq!(
                p.steps,
                vec![
                    Dispatch::new("partial_sums", [groups, 1, 1]),
                    Dispatch::new("total", [1, 1, 1]),
                ],
                "{n} elements"
            );
            assert_eq!(p.bindings[3], BindingPlan::Scratch(u64::from(groups) * 4));
            let BindingPlan::Uniform(params) = &p.bindings[1] else {
                panic!("{:?}", p.bindings)
            };
            assert_eq!(
                params[..8],
                [(n as u32).to_le_bytes(), groups.to_le_bytes()].concat()
            );
        }
        let module = kernel::validate_wgsl(&plan_for(8).source).unwrap();
        let entries: Vec<&str> = module
            .entry_points
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(entries, ["partial_sums", "total"]);
    }

    #[test]
    fn reduce_sum_reference_adds_in_the_shaders_order() {
        // 1e8's f32 neighbours are 8 apart, so 1e8 + 1 rounds back to 1e8: the order
        // of the additions shows in the sum. 6,144 elements make 3 workgroups of 256
        // lanes, each lane adding 8 elements. Lane 0 of workgroup 0 adds its 7 ones
        // to 1e8 one at a time and loses them; every other lane sums 8 ones apart and
        // the lanes and partials then combine in multiples of 8, which survive.
        let n = 2048 * 3;
        let mut xs = vec![1.0f32; n];
        xs[0] = 1e8;
        let got = f32s(&cpu_reference(
            "reduce-sum",
            &BTreeMap::new(),
            &[inp("x", &xs)],
        ))[0];
        assert_eq!(got, 1e8 + (n - 8) as f32);
        let in_a_row = xs.iter().fold(0.0f32, |acc, x| acc + x);
        assert_eq!(in_a_row, 1e8, "a plain left-to-right sum loses the ones");
    }

    #[test]
    fn bad_builtin_requests_are_explained() {
        let e = kernel::plan(&spec("sgemm", &[]), &[], &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown kernel 'sgemm'; built-in kernels are: saxpy"),
            "{e}"
        );
        let e = kernel::plan(
            &spec("saxpy", &[]),
            &[inp("x", &[1.0]), inp("y", &[1.0])],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("parameter 'a' is missing"), "{e}");
        let e = kernel::plan(
            &spec("saxpy", &[("a", "two")]),
            &[inp("x", &[1.0]), inp("y", &[1.0])],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("must be a finite number, got 'two'"),
            "{e}"
        );
        let e = kernel::plan(
            &spec("saxpy", &[("a", "2")]),
            &[inp("x", &[1.0; 4]), inp("y", &[1.0; 3])],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("same length: x is 16 bytes, y is 12 bytes"),
            "{e}"
        );
        let e = kernel::plan(&spec("saxpy", &[("a", "2")]), &[inp("x", &[1.0])], &[]).unwrap_err();
        assert!(
            e.to_string().contains("needs inputs [x, y], got [x]"),
            "{e}"
        );
        let e = kernel::plan(
            &spec("matmul", &[("m", "2"), ("n", "2"), ("k", "2")]),
            &[inp("a", &[1.0; 4]), inp("b", &[1.0; 3])],
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("input b must be 16 bytes"), "{e}");
        let e = kernel::plan(
            &spec(
                "mandelbrot",
                &[("width", "0"), ("height", "2"), ("max_iter", "2")],
            ),
            &[],
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("'width' must be a positive whole number"),
            "{e}"
        );
    }

    #[test]
    fn shard_ranges_cover_every_unit_once() {
        for (units, shards) in [(10u64, 3u32), (9, 3), (1, 1), (1000, 7)] {
            let mut next = 0;
            for i in 0..shards {
                let (a, b) = shard_range(units, shards, i);
                assert_eq!(a, next);
                assert!(b > a);
                next = b;
            }
            assert_eq!(next, units);
        }
    }

    #[test]
    fn sharding_is_refused_where_it_cannot_work() {
        let p = BTreeMap::new();
        let e = shard_units("reduce-sum", &p, &[inp("x", &[1.0; 8])], 2).unwrap_err();
        assert!(e.to_string().contains("cannot be sharded"), "{e}");
        let e =
            shard_units("saxpy", &p, &[inp("x", &[1.0; 2]), inp("y", &[1.0; 2])], 3).unwrap_err();
        assert!(e.to_string().contains("3 shards for 2 elements"), "{e}");
    }

    #[test]
    fn cpu_references_compute_the_documented_values() {
        let p = BTreeMap::from([("a".to_string(), "2".to_string())]);
        let out = f32s(&cpu_reference(
            "saxpy",
            &p,
            &[inp("x", &[1.0, 2.0]), inp("y", &[10.0, 20.0])],
        ));
        assert_eq!(out, vec![12.0, 24.0]);
        let p = BTreeMap::from(
            [("m", "1"), ("n", "1"), ("k", "2")].map(|(a, b)| (a.to_string(), b.to_string())),
        );
        let out = f32s(&cpu_reference(
            "matmul",
            &p,
            &[inp("a", &[1.0, 2.0]), inp("b", &[3.0, 4.0])],
        ));
        assert_eq!(out, vec![11.0]);
        let xs: Vec<f32> = (1..=1000).map(|i| i as f32).collect();
        assert_eq!(
            f32s(&cpu_reference(
                "reduce-sum",
                &BTreeMap::new(),
                &[inp("x", &xs)]
            )),
            vec![500500.0]
        );
        let p = BTreeMap::from(
            [("width", "4"), ("height", "4"), ("max_iter", "20")]
                .map(|(a, b)| (a.to_string(), b.to_string())),
        );
        let out = cpu_reference("mandelbrot", &p, &[]);
        assert_eq!(out.len(), 64);
    }
}
