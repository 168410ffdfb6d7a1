"""etcd3gw (the Python client OpenStack uses, over etcd's JSON gateway) against a
meshd cluster: put/get/delete, transactions, watch, leases and locks. Every result
is asserted; the first failure raises and the script exits non-zero.

    python etcd3gw_check.py HOST:PORT [HOST:PORT ...]
"""

import sys
import threading
import time

import etcd3gw


def client(endpoint):
    host, port = endpoint.rsplit(":", 1)
    return etcd3gw.client(host=host, port=int(port), timeout=10)


def main(endpoints):
    clients = [client(e) for e in endpoints]
    c = clients[0]

    # The API path comes from /version, as etcd3gw discovers it.
    assert c.api_path == "/v3/", c.api_path
    members = c.members()
    assert len(members) == len(endpoints), members
    assert all(m["peerURLs"][0].startswith("http://") for m in members), members
    assert c.status()["version"].startswith("3."), c.status()

    # Writes on one member are read on every member (linearizable reads).
    assert c.put("greeting", "hello") is True
    for other in clients:
        assert other.get("greeting") == [b"hello"], other.get("greeting")
    assert c.create("greeting", "again") is False, "create refuses an existing key"
    assert c.create("fresh", "1") is True
    assert c.replace("greeting", "hello", "world") is True
    assert c.replace("greeting", "hello", "nope") is False
    assert c.get("greeting") == [b"world"]
    for i in range(5):
        c.put(f"dir/{i}", str(i))
    assert sorted(v for v, _ in c.get_prefix("dir/")) == [b"0", b"1", b"2", b"3", b"4"]
    assert c.delete("fresh") is True
    assert c.delete("fresh") is False
    assert c.get("fresh") == []
    assert c.delete_prefix("dir/") is True
    assert c.get_prefix("dir/") == []

    # Watch from another member: events arrive in order.
    events, cancel = clients[1].watch("watched")
    got = []

    def collect():
        for ev in events:
            got.append((ev.get("type", "PUT"), ev["kv"].get("value")))
            if len(got) == 3:
                return

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    time.sleep(0.5)
    c.put("watched", "1")
    c.put("watched", "2")
    c.delete("watched")
    reader.join(timeout=20)
    cancel()
    assert len(got) == 3, got
    assert got[0] == ("PUT", b"1"), got
    assert got[1] == ("PUT", b"2"), got
    assert got[2][0] == "DELETE", got

    # Leases: keys live with their lease.
    lease = c.lease(ttl=30)
    assert 0 < lease.ttl() <= 30
    c.put("leased", "v", lease=lease)
    assert lease.keys() == [b"leased"], lease.keys()
    assert lease.refresh() == 30
    assert lease.revoke() is True
    assert c.get("leased") == []

    # Locks: one holder at a time, across members.
    a = clients[0].lock("the-lock", ttl=30)
    b = clients[1].lock("the-lock", ttl=30)
    assert a.acquire() is True
    assert a.is_acquired()
    assert b.acquire() is False, "a second holder while the first holds the lock"
    assert a.release() is True
    assert b.acquire() is True, "the lock is free once released"
    assert b.is_acquired()
    assert b.release() is True

    print("etcd3gw: every check passed")


if __name__ == "__main__":
    main(sys.argv[1:])
