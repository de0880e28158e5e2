"""QEMU harnesses: boots (qemu, smoke), the whole failback (e2e), conversion fixtures. May import anything."""
