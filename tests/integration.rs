//! Cross-process integration tests: real `mesh-node` and `mesh-cli` processes talking
//! SSH over loopback TCP, real sled files, real wgpu dispatches on the local adapter
//! (Mesa's lavapipe on machines without a GPU). One test binary; files by theme.

mod support;
mod t10_single_node;
mod t15_durability;
mod t20_bad_input;
mod t30_cluster;
mod t35_cluster_security;
mod t40_execution;
mod t45_placement;
mod t50_operations;
mod t60_deploy;
mod t70_chaos;
mod t80_bench;
