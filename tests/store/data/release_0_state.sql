-- A state database written by metald 8cd49b3 (before the store split and schema versions):
-- 5 VMs of 2 customers (auto and explicit NICs), their address claims, the page-token key,
-- and a deleted VM (sqlite_sequence ahead of the last seq). Loaded by tests/store/test_upgrade.py.
-- user_version 0
BEGIN TRANSACTION;
CREATE TABLE addresses (
    pool TEXT NOT NULL,
    address TEXT NOT NULL,
    owner TEXT NOT NULL,
    PRIMARY KEY (pool, address)
);
INSERT INTO "addresses" VALUES('netid','bc40afba','vm_legacy_running');
INSERT INTO "addresses" VALUES('netindex','173','customer:acme');
INSERT INTO "addresses" VALUES('net@acme','173','customer:acme');
INSERT INTO "addresses" VALUES('mac@acme','a6:5f:c0:08:a9:4b','vm_legacy_running');
INSERT INTO "addresses" VALUES('ipv4@acme','10.240.173.2','vm_legacy_running');
INSERT INTO "addresses" VALUES('ipv6@acme','fd6d:6574:616c:ad::2','vm_legacy_running');
INSERT INTO "addresses" VALUES('netid','940352ee','vm_legacy_paused');
INSERT INTO "addresses" VALUES('mac@acme','82:41:36:ee:f7:bc','vm_legacy_paused');
INSERT INTO "addresses" VALUES('ipv4@acme','10.240.173.3','vm_legacy_paused');
INSERT INTO "addresses" VALUES('ipv6@acme','fd6d:6574:616c:ad::3','vm_legacy_paused');
INSERT INTO "addresses" VALUES('netid','7d81a067','vm_legacy_explicit');
INSERT INTO "addresses" VALUES('netindex','141','customer:globex');
INSERT INTO "addresses" VALUES('net@globex','141','customer:globex');
INSERT INTO "addresses" VALUES('mac@globex','02:aa:bb:cc:dd:01','vm_legacy_explicit');
INSERT INTO "addresses" VALUES('hostnet','192.168.50.0/24','customer:globex');
INSERT INTO "addresses" VALUES('hostnet@globex','192.168.50.0/24','customer:globex');
INSERT INTO "addresses" VALUES('ipv4@globex','192.168.50.1','customer:globex');
INSERT INTO "addresses" VALUES('gw@globex','192.168.50.1','customer:globex');
INSERT INTO "addresses" VALUES('ipv4@globex','192.168.50.10','vm_legacy_explicit');
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
INSERT INTO "meta" VALUES('page_token_key',X'000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F');
CREATE TABLE vms (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    vm_id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    config TEXT NOT NULL,
    nics TEXT NOT NULL DEFAULT '[]',
    shutdown_reason TEXT NOT NULL DEFAULT '',
    pending TEXT NOT NULL DEFAULT '',
    vcpus INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
INSERT INTO "vms" VALUES(1,'vm_legacy_running','acme',2,'{"cpu": {"vcpu_count": 2, "cpu_template": "C3"}, "memory": {"size_bytes": 536870912}, "boot": {"kernel_path": "/var/lib/metald/assets/vmlinux", "kernel_args": "console=ttyS0 quiet"}, "storage": [{"device_id": "rootfs", "path_on_host": "/var/lib/metald/assets/rootfs.ext4", "is_root_device": true}], "network": [{"interface_id": "eth0", "type": "TAP", "guest_mac": "auto", "rate_limit": {"bandwidth_bytes_per_second": 1000000, "burst_bytes": 2000000, "refill_time_millis": 100}}], "console": {"type": "SERIAL"}, "metadata": {"team": "blue", "purpose": "ci"}}','[{"interface_id": "eth0", "mac": "a6:5f:c0:08:a9:4b", "guest_ipv4": "10.240.173.2/24", "gateway_ipv4": "10.240.173.1", "guest_ipv6": "fd6d:6574:616c:ad::2/64", "gateway_ipv6": "fd6d:6574:616c:ad::1"}]','','',2,536870912,'2026-11-30T12:00:00.123456+00:00','2026-11-30T12:00:00.123456+00:00');
INSERT INTO "vms" VALUES(2,'vm_legacy_paused','acme',3,'{"cpu": {"vcpu_count": 2, "cpu_template": "C3"}, "memory": {"size_bytes": 536870912}, "boot": {"kernel_path": "/var/lib/metald/assets/vmlinux", "kernel_args": "console=ttyS0 quiet"}, "storage": [{"device_id": "rootfs", "path_on_host": "/var/lib/metald/assets/rootfs.ext4", "is_root_device": true}], "network": [{"interface_id": "eth0", "type": "TAP", "guest_mac": "auto", "rate_limit": {"bandwidth_bytes_per_second": 1000000, "burst_bytes": 2000000, "refill_time_millis": 100}}], "console": {"type": "SERIAL"}, "metadata": {"team": "blue", "purpose": "ci"}}','[{"interface_id": "eth0", "mac": "82:41:36:ee:f7:bc", "guest_ipv4": "10.240.173.3/24", "gateway_ipv4": "10.240.173.1", "guest_ipv6": "fd6d:6574:616c:ad::3/64", "gateway_ipv6": "fd6d:6574:616c:ad::1"}]','','',2,536870912,'2026-11-30T12:00:00.123456+00:00','2026-11-30T12:00:00.123456+00:00');
INSERT INTO "vms" VALUES(3,'vm_legacy_shutdown','acme',4,'{"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 134217728}}','[]','guest_poweroff','',1,134217728,'2026-11-30T12:00:00.123456+00:00','2026-11-30T12:00:00.123456+00:00');
INSERT INTO "vms" VALUES(4,'vm_legacy_explicit','globex',1,'{"cpu": {"vcpu_count": 1}, "memory": {"size_bytes": 268435456}, "network": [{"interface_id": "eth0", "type": "TAP", "guest_mac": "02:aa:bb:cc:dd:01", "host_ipv4": {"address": "192.168.50.1", "prefix_length": 24}, "guest_ipv4": {"address": "192.168.50.10", "prefix_length": 24}}]}','[{"interface_id": "eth0", "mac": "02:aa:bb:cc:dd:01", "guest_ipv4": "192.168.50.10/24", "gateway_ipv4": "192.168.50.1"}]','','',1,268435456,'2026-11-30T12:00:00.123456+00:00','2026-11-30T12:00:00.123456+00:00');
INSERT INTO "vms" VALUES(5,'vm_legacy_deleting','globex',4,'{}','[]','','deleting',0,0,'2026-11-30T12:00:00.123456+00:00','2026-11-30T12:00:00.123456+00:00');
CREATE INDEX vms_by_customer ON vms (customer_id, seq);
CREATE INDEX vms_by_customer_state ON vms (customer_id, state, seq);
CREATE INDEX vms_by_customer_pending ON vms (customer_id, pending);
CREATE INDEX addresses_by_owner ON addresses (owner);
DELETE FROM "sqlite_sequence";
INSERT INTO "sqlite_sequence" VALUES('vms',6);
COMMIT;
