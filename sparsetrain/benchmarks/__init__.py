"""Benchmarks a user runs with one command (``sparsetrain bench``): the fused step against torch's
optimizers and the pruning code users write today, and training steps end to end.

Modules: :mod:`.kernels` (one optimizer step per provider, copy ceiling, global threshold),
:mod:`.e2e` (training steps of a GPT-2- and a ResNet-50-shaped model), :mod:`.steps` (the step
builders), :mod:`.shapes` / :mod:`.models` (model shapes and compact definitions), :mod:`.timing`,
:mod:`.report` and :mod:`.command` (the command line).
"""
