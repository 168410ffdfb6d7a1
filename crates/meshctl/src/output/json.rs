//! etcdctl-compatible JSON: protobuf field names, zero values omitted (Go's
//! `omitempty`), keys and values base64, and etcdctl's capitalised wrappers where it
//! prints Go client structs (`{"Endpoint":..,"Status":..}`, watch `{"Header":..}`).
use base64::Engine as _;
use mesh_core::proto::etcdserverpb as pb;
use mesh_core::proto::mvccpb;
use serde::Serialize;

fn zero_i64(v: &i64) -> bool {
    *v == 0
}
fn zero_u64(v: &u64) -> bool {
    *v == 0
}
fn no(v: &bool) -> bool {
    !*v
}

fn b64(bytes: &[u8]) -> Option<String> {
    (!bytes.is_empty()).then(|| base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[derive(Serialize)]
pub struct Header {
    #[serde(skip_serializing_if = "zero_u64")]
    cluster_id: u64,
    #[serde(skip_serializing_if = "zero_u64")]
    member_id: u64,
    #[serde(skip_serializing_if = "zero_i64")]
    revision: i64,
    #[serde(skip_serializing_if = "zero_u64")]
    raft_term: u64,
}

pub fn header(h: &Option<pb::ResponseHeader>) -> Option<Header> {
    h.as_ref().map(|h| Header {
        cluster_id: h.cluster_id,
        member_id: h.member_id,
        revision: h.revision,
        raft_term: h.raft_term,
    })
}

#[derive(Serialize)]
pub struct KeyValue {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "zero_i64")]
    create_revision: i64,
    #[serde(skip_serializing_if = "zero_i64")]
    mod_revision: i64,
    #[serde(skip_serializing_if = "zero_i64")]
    version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "zero_i64")]
    lease: i64,
}

pub fn kv(kv: &mvccpb::KeyValue) -> KeyValue {
    KeyValue {
        key: b64(&kv.key),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: b64(&kv.value),
        lease: kv.lease,
    }
}

fn kvs(list: &[mvccpb::KeyValue]) -> Option<Vec<KeyValue>> {
    (!list.is_empty()).then(|| list.iter().map(kv).collect())
}

#[derive(Serialize)]
pub struct Range {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Header>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kvs: Option<Vec<KeyValue>>,
    #[serde(skip_serializing_if = "no")]
    more: bool,
    #[serde(skip_serializing_if = "zero_i64")]
    count: i64,
}

pub fn range(r: &pb::RangeResponse) -> Range {
    Range {
        header: header(&r.header),
        kvs: kvs(&r.kvs),
        more: r.more,
        count: r.count,
    }
}

#[derive(Serialize)]
pub struct Put {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Header>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_kv: Option<KeyValue>,
}

pub fn put(r: &pb::PutResponse) -> Put {
    Put {
        header: header(&r.header),
        prev_kv: r.prev_kv.as_ref().map(kv),
    }
}

#[derive(Serialize)]
pub struct Delete {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Header>,
    #[serde(skip_serializing_if = "zero_i64")]
    deleted: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_kvs: Option<Vec<KeyValue>>,
}

pub fn delete(r: &pb::DeleteRangeResponse) -> Delete {
    Delete {
        header: header(&r.header),
        deleted: r.deleted,
        prev_kvs: kvs(&r.prev_kvs),
    }
}

/// Go's JSON of a protobuf oneof: `{"Response":{"ResponsePut":{...}}}`.
#[derive(Serialize)]
pub struct ResponseOp {
    #[serde(rename = "Response")]
    response: OneOf,
}

#[derive(Serialize)]
/// Variant names are the JSON keys etcdctl prints.
#[allow(clippy::enum_variant_names)]
pub enum OneOf {
    ResponseRange(Range),
    ResponsePut(Put),
    ResponseDeleteRange(Delete),
    ResponseTxn(Box<Txn>),
}

#[derive(Serialize)]
pub struct Txn {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Header>,
    #[serde(skip_serializing_if = "no")]
    succeeded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    responses: Option<Vec<Option<ResponseOp>>>,
}

pub fn txn(r: &pb::TxnResponse) -> Txn {
    use pb::response_op::Response;
    let responses = r
        .responses
        .iter()
        .map(|op| {
            op.response.as_ref().map(|resp| ResponseOp {
                response: match resp {
                    Response::ResponseRange(x) => OneOf::ResponseRange(range(x)),
                    Response::ResponsePut(x) => OneOf::ResponsePut(put(x)),
                    Response::ResponseDeleteRange(x) => OneOf::ResponseDeleteRange(delete(x)),
                    Response::ResponseTxn(x) => OneOf::ResponseTxn(Box::new(txn(x))),
                },
            })
        })
        .collect::<Vec<_>>();
    Txn {
        header: header(&r.header),
        succeeded: r.succeeded,
        responses: (!responses.is_empty()).then_some(responses),
    }
}

#[derive(Serialize)]
pub struct Event {
    #[serde(rename = "type", skip_serializing_if = "zero_i32")]
    kind: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv: Option<KeyValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_kv: Option<KeyValue>,
}

fn zero_i32(v: &i32) -> bool {
    *v == 0
}

/// etcdctl prints the Go client's `WatchResponse` struct, hence the capitals.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Watch {
    header: Option<Header>,
    events: Vec<Event>,
    compact_revision: i64,
    canceled: bool,
    created: bool,
}

pub fn watch(r: &pb::WatchResponse) -> Watch {
    Watch {
        header: header(&r.header),
        events: r
            .events
            .iter()
            .map(|e| Event {
                kind: e.r#type,
                kv: e.kv.as_ref().map(kv),
                prev_kv: e.prev_kv.as_ref().map(kv),
            })
            .collect(),
        compact_revision: r.compact_revision,
        canceled: r.canceled,
        created: r.created,
    }
}

#[derive(Serialize)]
pub struct Member {
    #[serde(rename = "ID")]
    id: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(rename = "peerURLs", skip_serializing_if = "Vec::is_empty")]
    peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", skip_serializing_if = "Vec::is_empty")]
    client_urls: Vec<String>,
    #[serde(rename = "isLearner", skip_serializing_if = "no")]
    is_learner: bool,
}

#[derive(Serialize)]
pub struct MemberList {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Header>,
    members: Vec<Member>,
}

#[derive(Serialize)]
pub struct MemberAdded {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Header>,
    member: Option<Member>,
    members: Vec<Member>,
}

fn member(m: &pb::Member) -> Member {
    Member {
        id: m.id,
        name: m.name.clone(),
        peer_urls: m.peer_ur_ls.clone(),
        client_urls: m.client_ur_ls.clone(),
        is_learner: m.is_learner,
    }
}

pub fn member_added(r: &pb::MemberAddResponse) -> MemberAdded {
    MemberAdded {
        header: header(&r.header),
        member: r.member.as_ref().map(member),
        members: r.members.iter().map(member).collect(),
    }
}

pub fn member_list(r: &pb::MemberListResponse) -> MemberList {
    MemberList {
        header: header(&r.header),
        members: r.members.iter().map(member).collect(),
    }
}

#[derive(Serialize)]
#[allow(non_snake_case)]
pub struct Status {
    #[serde(skip_serializing_if = "Option::is_none")]
    header: Option<Header>,
    #[serde(skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(skip_serializing_if = "zero_i64")]
    dbSize: i64,
    #[serde(skip_serializing_if = "zero_u64")]
    leader: u64,
    #[serde(skip_serializing_if = "zero_u64")]
    raftIndex: u64,
    #[serde(skip_serializing_if = "zero_u64")]
    raftTerm: u64,
    #[serde(skip_serializing_if = "zero_u64")]
    raftAppliedIndex: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<String>,
    #[serde(skip_serializing_if = "zero_i64")]
    dbSizeInUse: i64,
    #[serde(skip_serializing_if = "no")]
    isLearner: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EndpointStatus {
    endpoint: String,
    status: Status,
}

pub fn endpoint_status(endpoint: &str, s: &pb::StatusResponse) -> EndpointStatus {
    EndpointStatus {
        endpoint: endpoint.to_string(),
        status: Status {
            header: header(&s.header),
            version: s.version.clone(),
            dbSize: s.db_size,
            leader: s.leader,
            raftIndex: s.raft_index,
            raftTerm: s.raft_term,
            raftAppliedIndex: s.raft_applied_index,
            errors: s.errors.clone(),
            dbSizeInUse: s.db_size_in_use,
            isLearner: s.is_learner,
        },
    }
}

#[derive(Serialize)]
pub struct Health {
    pub endpoint: String,
    pub health: bool,
    pub took: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
