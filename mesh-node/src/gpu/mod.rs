//! The wgpu executor: adapter probing and kernel dispatch.
