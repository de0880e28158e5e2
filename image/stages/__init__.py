"""The build stages (image definition -> rootfs -> overlay -> client -> squashfs -> iso -> hashes).

Import rule: stages import only image.core (and each other)."""
