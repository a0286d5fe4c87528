"""Accelerators the planner and the trainer's MFU know: dense bf16 peak FLOP/s and memory."""

# Dense bf16 tensor-core peaks (no 2:4 sparsity) and memory, from the vendors' datasheets:
#   H100 SXM5  989.4 TFLOP/s, 80 GB HBM3   — NVIDIA H100 Tensor Core GPU datasheet (1979 "with sparsity")
#   H200 SXM   989.4 TFLOP/s, 141 GB HBM3e — NVIDIA H200 datasheet (same compute die as H100)
#   A100 SXM   312 TFLOP/s, 80 GB HBM2e    — NVIDIA A100 datasheet (624 "with sparsity")
#   MI300X     1307.4 TFLOP/s, 192 GB HBM3 — AMD Instinct MI300X datasheet (2614.9 with sparsity)
#   H800 SXM   989.4 TFLOP/s, 80 GB HBM3   — the H100 compute die with less NVLink bandwidth (DeepSeek-V3's card)
#   MI250X     383 TFLOP/s, 128 GB HBM2e   — AMD Instinct MI250X datasheet (LUMI)
#   GH200      989.4 TFLOP/s, 96 GB HBM3   — NVIDIA GH200 datasheet, the Hopper GPU of the superchip (JUPITER)
# tdp_watts: the board's maximum power (GH200: the whole CPU+GPU module, configurable up to 1000 W);
# the planner's energy figures assume the card draws it for the whole run.
GPUS: dict[str, dict] = {
    "h100": {"name": "H100 SXM", "peak_flops": 989.4e12, "memory_bytes": 80e9, "tdp_watts": 700},
    "h200": {"name": "H200 SXM", "peak_flops": 989.4e12, "memory_bytes": 141e9, "tdp_watts": 700},
    "h800": {"name": "H800 SXM", "peak_flops": 989.4e12, "memory_bytes": 80e9, "tdp_watts": 700},
    "a100": {"name": "A100 SXM 80GB", "peak_flops": 312e12, "memory_bytes": 80e9, "tdp_watts": 400},
    "mi250x": {"name": "MI250X", "peak_flops": 383e12, "memory_bytes": 128e9, "tdp_watts": 560},
    "mi300x": {"name": "MI300X", "peak_flops": 1307.4e12, "memory_bytes": 192e9, "tdp_watts": 750},
    "gh200": {"name": "GH200 (96 GB)", "peak_flops": 989.4e12, "memory_bytes": 96e9, "tdp_watts": 1000},
}
