"""Thin typed wrappers over the Linux interfaces graphdriver needs: mounts, loops, statfs."""
