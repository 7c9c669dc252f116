"""Store adapters (SQLite, memory) for the store ports of metald/store/ports.py (VmRecords,
AddressBook, Secrets, EventLog, SnapshotRecords), which metald.ports re-exports."""
