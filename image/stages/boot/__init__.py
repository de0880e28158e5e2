"""The ISO stage's boot media: ISO9660 assembly, EFI image, GPT, boot menus, local-disk boot sector."""
