"""The GPUs the launch plan is checked for (tests/test_launch_plan.py) and the kernels are compiled
for (tests/compile_kernels.py): SM count and the shared memory one block may use."""

from sce_loss.fused.plan import Device

A100 = Device("A100", 108, 163 * 1024)
RTX_3090 = Device("RTX 3090", 82, 99 * 1024)
L4 = Device("L4", 58, 99 * 1024)
RTX_4090 = Device("RTX 4090", 128, 99 * 1024)
H100 = Device("H100", 132, 227 * 1024)
# One GPU per architecture compiled for, sm_XY as XY.
BY_ARCHITECTURE = {80: A100, 86: RTX_3090, 89: L4, 90: H100}
