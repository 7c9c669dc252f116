"""The host side of the guest agent: framing (protocol), one channel per VM connection (channel)
and the adapter behind metald.ports.GuestAgent (pool). Protocol and limits: docs/agent.md."""
