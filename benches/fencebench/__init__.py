"""The pieces of benches/fence_bench.py: mounts of each setup, cached fixtures, file system and
container workloads, and the printed table. Python standard library only."""
