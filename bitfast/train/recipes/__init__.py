"""The training recipes, thin over the training library (``bitfast.train``): ``finetune``
(BiT-HyperRule), ``pretrain`` (the upstream recipe), ``distill`` (knowledge distillation),
``fewshot`` (k-shot episodes) and ``story`` (the demo on the embedded digits)."""
