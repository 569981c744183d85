"""Adapters between eplb_jax and the serving engines, each with optional dependencies.

* :mod:`eplb_jax.contrib.vllm`: an EPLB policy with vLLM's policy interface
  (torch tensors in and out) and a ``register()`` helper for vLLM's policy
  registry. Needs torch at call time, and vLLM only to register.
* :mod:`eplb_jax.contrib.sglang`: readers of SGLang's and sglang-jax's load
  files (expert-distribution recorder dumps, ``--init-expert-location``
  files), writers of ``--init-expert-location`` placement files, and the
  fields of sglang-jax's ``ExpertLocationMetadata`` built from a placement.
  Needs torch only for ``.pt`` files.

Nothing here is imported by ``import eplb_jax``, and this package imports no
submodule itself, so the core never imports torch, vLLM or SGLang. Import
the adapter you need explicitly, e.g. ``from eplb_jax.contrib import sglang``.
"""
