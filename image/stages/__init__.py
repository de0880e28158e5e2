"""The build stages (image definition -> rootfs -> overlay -> client -> squashfs -> bootloader -> iso -> hashes).

Import rule: stages import only image.core (and each other)."""
