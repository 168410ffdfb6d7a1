//! The typed etcd-v3 client meshctl and locksmith use (implementation on the `cli` branch).
