"""The LiveCD image builder: image definition -> rootfs -> overlay -> client -> squashfs -> bootloader -> iso ->
hashes -> publish."""
