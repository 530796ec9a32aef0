//! Compiles the .proto files with protox (pure Rust, no protoc) and generates prost types and
//! tonic services, plus the encoded descriptor set that the admin port's gRPC reflection serves.
use protox::prost::Message as _;

fn main() -> anyhow::Result<()> {
    let protos = [
        "proto/mermin/flow/v1/flow.proto",
        "proto/mermin/agent/v1/agent.proto",
        "proto/mermin/admin/v1/admin.proto",
        "proto/mermin/replica/v1/raft.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("descriptors.bin"), descriptors.encode_to_vec())?;
    tonic_prost_build::configure()
        .message_attribute(".mermin.flow.v1", "#[derive(serde::Serialize)]")
        .field_attribute(
            ".mermin.flow.v1.ConnectionEndpoint.address",
            "#[serde(serialize_with = \"crate::json::ip_address\")]",
        )
        .field_attribute(
            ".mermin.flow.v1.FlowRecord.source_address",
            "#[serde(serialize_with = \"crate::json::ip_address\")]",
        )
        .field_attribute(
            ".mermin.flow.v1.FlowRecord.destination_address",
            "#[serde(serialize_with = \"crate::json::ip_address\")]",
        )
        .field_attribute(
            ".mermin.flow.v1.FlowRecord.direction",
            "#[serde(serialize_with = \"crate::json::direction\")]",
        )
        .field_attribute(
            ".mermin.flow.v1.FlowRecord.end_reason",
            "#[serde(serialize_with = \"crate::json::end_reason\")]",
        )
        // What `mermin --output json|yaml` prints: the admin API's answers.
        .message_attribute(".mermin.admin.v1", "#[derive(serde::Serialize)]")
        .field_attribute(
            ".mermin.admin.v1.Endpoint.address",
            "#[serde(serialize_with = \"crate::json::ip_address\")]",
        )
        .field_attribute(
            ".mermin.admin.v1.ObservedFlow.end_reason",
            "#[serde(serialize_with = \"crate::json::end_reason\")]",
        )
        .field_attribute(
            ".mermin.admin.v1.ShardReplica.role",
            "#[serde(serialize_with = \"crate::json::role\")]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
