"""The LiveCD image builder: image definition -> rootfs -> overlay -> squashfs -> iso -> hashes -> publish."""
