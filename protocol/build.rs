//! Compiles the .proto files with protox (pure Rust, no protoc) and generates prost types and
//! tonic services.
fn main() -> anyhow::Result<()> {
    let protos = [
        "proto/mermin/flow/v1/flow.proto",
        "proto/mermin/agent/v1/agent.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .type_attribute(".mermin.flow.v1.FlowRecord", "#[derive(serde::Serialize)]")
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
        .compile_fds(descriptors)?;
    Ok(())
}
