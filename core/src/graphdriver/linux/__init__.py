"""Thin typed wrappers over the Linux interfaces graphdriver needs: mounts, binds, loops, statfs,
quota, tree copies; ``libc.py`` holds the one libc handle they share. Drivers reach them through
:mod:`graphdriver.toolkit`."""
