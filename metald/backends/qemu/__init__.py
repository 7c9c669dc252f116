"""The QEMU microvm backend: one QEMU process per VM, each under a small supervisor process."""
