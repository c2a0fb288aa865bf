"""Multi-task architectures as Flax Linen modules for the module pool.

Each module takes the shared input ``[batch, in]`` and returns a dict ``{task_name:
representation}``; each task's head reads its own entry with an ``(op_name, task_name)``
input. One pool entry is one set of weights, shared by every task that runs the op::

    import flax.linen as nn
    from jaxmtl import Operation, Task
    from jaxmtl.modules import MMoE

    mmoe = MMoE(("a", "b"), num_experts=4, expert_features=(32,))
    tasks = [Task(name, {"mmoe": mmoe, f"head_{name}": nn.Dense(2)},
                  [Operation("mmoe", [("_input_", "x")]),
                   Operation(f"head_{name}", [("mmoe", name)])])
             for name in ("a", "b")]

| module | paper | what is shared |
|---|---|---|
| ``SharedBottom`` | hard parameter sharing (Caruana 1997) | the whole body |
| ``MMoE`` | Ma et al., KDD 2018 | experts; a softmax gate per task |
| ``CGC`` | Tang et al., RecSys 2020 | shared experts beside per-task experts |
| ``PLE`` | Tang et al., RecSys 2020 | stacked CGC levels with a shared gate between |
| ``CrossStitch`` | Misra et al., CVPR 2016 | learned T x T mixing of per-task towers |
| ``DSelectK`` | Hazimeh et al., NeurIPS 2021 | experts; k differentiable selectors per task |

The gates are recorded with ``sow("intermediates", ...)``; ``gate_weights`` reads them.
The module's ``task_names`` fix its outputs: a task added later needs a new module.
"""

from ._common import Experts, StackedDense, gate_weights
from .cross_stitch import CrossStitch, cross_stitch_init
from .dselect_k import DSelectK, smooth_step
from .moe import MMoE
from .ple import CGC, PLE
from .shared import SharedBottom

__all__ = ["CGC", "PLE", "CrossStitch", "DSelectK", "Experts", "MMoE", "SharedBottom",
           "StackedDense", "cross_stitch_init", "gate_weights", "smooth_step"]
