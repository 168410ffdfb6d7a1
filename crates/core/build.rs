//! Generates the etcd v3 API and meshd's internal records from `proto/` with a vendored
//! protoc, so building needs nothing from the system, and the proto3 JSON mapping of
//! the etcd messages for the HTTP gateway (field names as in the .proto files, as
//! etcd's gateway writes them).
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = out.join("descriptors.bin");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(&descriptors)
        // Reserves a message's encoded length before writing it (src/codec.rs).
        .codec_path("crate::codec::PresizedCodec")
        // Topology entries are kept as the bytes they arrived as (see mesh.proto).
        .bytes(".meshpb.MeshTopologyIn.peers")
        .compile_protos(
            &[
                "proto/mvccpb/kv.proto",
                "proto/authpb/auth.proto",
                "proto/etcdserverpb/rpc.proto",
                "proto/meshpb/internal.proto",
                "proto/meshpb/api.proto",
                "proto/meshpb/mesh.proto",
                "proto/meshpb/fault.proto",
                "proto/v3lockpb/v3lock.proto",
                "proto/v3electionpb/v3election.proto",
            ],
            &["proto"],
        )?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        // Clients written for newer etcd versions send fields this server does not
        // know; etcd's gateway skips them too.
        .ignore_unknown_fields()
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
