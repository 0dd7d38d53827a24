//! Compiles the work-order protobuf with protox (pure Rust), so no `protoc` binary is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/hoard/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Messages that carry secrets get a hand-written, redacting Debug (src/lib.rs).
        // Deterministic encoding (order fingerprints hash the encoded order).
        .btree_map(".")
        .skip_debug([
            "hoard.agent.v1.Repository",
            "hoard.agent.v1.S3Credentials",
            "hoard.agent.v1.AzureCredentials",
            "hoard.agent.v1.GcsCredentials",
        ])
        .compile_fds(fds)?;
    Ok(())
}
