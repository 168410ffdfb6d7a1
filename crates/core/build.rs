//! Generates the etcd v3 API and meshd's internal records from `proto/` with a vendored
//! protoc, so building needs nothing from the system.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
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
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
