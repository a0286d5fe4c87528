"""Scale-out, applied from outside the model (the torchtitan way): the process group and DeviceMesh
(mesh.py), FSDP2 sharding, activation checkpointing and per-block compile (fsdp.py), expert
parallelism (expert_parallel.py) and Muon's whole-matrix view of sharded parameters (muon.py)."""
