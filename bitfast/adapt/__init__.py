"""Adapting pre-trained bitfast models cheaply: LoRA for weight-standardized convolutions.

``bitfast.adapt.lora(model, rank=8)`` wraps the model's ``StdConv2d`` layers with low-rank
updates applied before weight standardization and freezes the rest (see ``bitfast.adapt.lora``
for the math, the state-dict keys and merging).
"""

from bitfast.adapt.lora import (
    LoRAReport,
    LoRAStdConv2d,
    load_lora_state_dict,
    lora,
    lora_layers,
    lora_parameters,
    lora_report,
    lora_state_dict,
    merge,
    unmerge,
    unwrap,
)

__all__ = [
    "LoRAReport",
    "LoRAStdConv2d",
    "load_lora_state_dict",
    "lora",
    "lora_layers",
    "lora_parameters",
    "lora_report",
    "lora_state_dict",
    "merge",
    "unmerge",
    "unwrap",
]
