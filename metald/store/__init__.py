"""Store adapters for the store ports in metald.ports (VmRecords, AddressBook, Secrets, EventLog)."""
